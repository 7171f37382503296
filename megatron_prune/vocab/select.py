"""Which tokens to keep: a frequency criterion, the required tokens, and merge-tree closure."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class Selection:
    kept: list                        # old ids, ascending: new id i is kept[i]
    required: int                     # specials, byte pieces, base bytes ...
    added_for_merges: int             # kept only because a kept token is built from them
    unreachable: list = field(default_factory=list)  # requested, but no text encodes to them
    skipped_for_size: int = 0         # frequent tokens whose merge tree did not fit in --keep
    coverage: float = 1.0             # share of counted tokens whose id is kept
    criterion: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"criterion": self.criterion, "kept": len(self.kept), "required": self.required,
                "added_for_merges": self.added_for_merges,
                "dropped_unreachable": len(self.unreachable),
                "unreachable_examples": self.unreachable[:10],
                "skipped_for_size": self.skipped_for_size, "coverage": self.coverage}


def select_tokens(vocab: Vocabulary, counts: np.ndarray, *, keep: Optional[int] = None,
                  coverage: Optional[float] = None, min_count: Optional[int] = None,
                  force: Iterable[int] = ()) -> Selection:
    """Kept ids for exactly one criterion: at most `keep` tokens in all, the most frequent tokens
    covering `coverage` of the counted tokens, or every token counted at least `min_count` times.
    `force` ids are kept whatever their count. Required ids and merge trees always come along."""
    given = [(n, v) for n, v in (("keep", keep), ("coverage", coverage), ("min_count", min_count))
             if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --keep, --coverage, --min-count")
    name, value = given[0]
    if name == "coverage" and not 0 < value <= 1:
        raise ConfigError(f"--coverage must be in (0, 1], got {value}")
    if name in ("keep", "min_count") and value < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (vocab.size,):
        raise ConfigError(f"frequency counts cover {counts.shape[0]} ids, the tokenizer has {vocab.size}")

    required = set(vocab.required_ids())
    if keep is not None and keep < len(required):
        raise ConfigError(
            f"--keep {keep} is smaller than the {len(required)} tokens that must always be kept "
            f"({len(vocab.special_ids)} special/control tokens, the rest byte-fallback, base-byte or "
            "single-character tokens so that any text still encodes)")
    kept = set(required)
    unreachable, skipped = [], 0
    chosen = set()  # kept for their own sake (criterion or --keep-tokens)

    def add(i: int, forced: bool) -> bool:
        nonlocal skipped
        if i in kept:
            chosen.add(i)
            return True
        needs = vocab.needs(i)
        if needs is None:
            unreachable.append(i)
            return False
        new = ({i} | needs) - kept
        if keep is not None and len(kept) + len(new) > keep:
            if forced:
                raise ConfigError(
                    f"--keep {keep} is smaller than the required tokens plus the --keep-tokens "
                    f"and what they are built from ({len(kept) + len(new)} and more)")
            skipped += 1
            return False
        kept.update(new)
        chosen.add(i)
        return True

    for i in sorted(set(force)):
        if not 0 <= i < vocab.size:
            raise ConfigError(f"--keep-tokens: id {i} is outside the tokenizer's 0..{vocab.size - 1}")
        add(i, forced=True)

    order = np.lexsort((np.arange(vocab.size), -counts))  # by count desc, then id
    order = order[counts[order] > 0]
    if name == "coverage":
        total = counts.sum()
        cum = np.cumsum(counts[order])
        n = int(np.searchsorted(cum, value * total - 1e-9 * total, side="left")) + 1
        candidates = order[:n]
    elif name == "min_count":
        candidates = order[counts[order] >= value]
    else:
        candidates = order
    for i in candidates:
        if keep is not None and len(kept) >= keep:
            break
        add(int(i), forced=False)

    ordered = sorted(kept)
    total = counts.sum()
    covered = float(counts[ordered].sum() / total) if total else 1.0
    merge_only = kept - required - chosen
    sel = Selection(kept=ordered, required=len(required), added_for_merges=len(merge_only),
                    unreachable=sorted(set(unreachable)), skipped_for_size=skipped,
                    coverage=covered, criterion={name: value})
    if sel.unreachable:
        log.warning("dropped %d tokens no text can encode to (their bytes do not merge back into "
                    "them), e.g. %s", len(sel.unreachable),
                    ", ".join(vocab.token_repr(i) for i in sel.unreachable[:5]))
    return sel
