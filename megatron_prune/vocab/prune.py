"""`prune-vocab`: frequencies + a criterion -> the pruned tokenizer and the old -> new id map."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.vocab.base import Vocabulary
from megatron_prune.vocab.freq import FreqCounts
from megatron_prune.vocab.load import load_vocabulary
from megatron_prune.vocab.select import select_tokens
from megatron_prune.vocab.vocab_map import FILE_NAME, VocabMap

log = logging.getLogger(__name__)


def read_keep_tokens(path, vocab: Vocabulary) -> set:
    """Ids to keep from a file: a JSON list of ids (int) and texts (str), or a text file whose
    every non-empty line is a text; a text keeps the tokens it encodes to."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--keep-tokens {path}: no such file")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--keep-tokens {path}: invalid JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, (int, str)) for x in items):
            raise ConfigError(f"--keep-tokens {path}: expected a JSON list of ids and strings")
    else:
        items = [line for line in path.read_text().splitlines() if line.strip()]
    ids = set()
    for x in items:
        if isinstance(x, int):
            ids.add(x)
        else:
            ids.update(vocab.encode(x))
    return ids


def check_pruned(old: Vocabulary, new: Vocabulary, kept: list) -> None:
    """The written tokenizer holds exactly the kept tokens, in order."""
    if new.size != len(kept):
        raise ConfigError(f"pruned tokenizer has {new.size} ids, expected {len(kept)}")
    for n, o in enumerate(kept):
        if (o in old.special_ids) != (n in new.special_ids) or (
                o not in old.special_ids and old.token_bytes(o) != new.token_bytes(n)):
            raise ConfigError(f"pruned tokenizer: new id {n} is not old id {o} "
                              f"({new.token_repr(n)} vs {old.token_repr(o)})")


def prune_vocab(tokenizer, freq, save, *, keep: Optional[int] = None,
                coverage: Optional[float] = None, min_count: Optional[int] = None,
                keep_tokens=None, force: bool = False) -> tuple:
    """Write the pruned tokenizer and `vocab_map.json` into `save`; return (VocabMap, Selection)."""
    check_output(save, force)
    vocab = load_vocabulary(tokenizer)
    counts = FreqCounts.load(freq)
    counts.check_tokenizer(vocab, freq)
    forced = read_keep_tokens(keep_tokens, vocab) if keep_tokens else set()
    sel = select_tokens(vocab, counts.counts, keep=keep, coverage=coverage, min_count=min_count,
                        force=forced)
    with atomic_output_dir(save, force) as tmp:
        files = vocab.write_pruned(tmp, sel.kept)
        new = load_vocabulary(tmp)
        check_pruned(vocab, new, sel.kept)
        pruned = {"kind": new.kind, "fingerprint": new.fingerprint, "vocab_size": new.size,
                  "files": files}
        summary = sel.summary()
        summary["freq"] = {"path": str(freq), "tokens": counts.tokens, "documents": counts.documents}
        vmap = VocabMap.build(sel.kept, vocab.size, vocab.describe(), pruned, summary)
        vmap.save(tmp / FILE_NAME)
    vmap.path = Path(save) / FILE_NAME
    log.debug("%s %s: %d -> %d tokens (%d required, %d kept for merges, %d unreachable dropped), "
             "coverage of the counted tokens %.5f", vocab.kind, vocab.path, vocab.size,
             len(sel.kept), sel.required, sel.added_for_merges, len(sel.unreachable), sel.coverage)
    return vmap, sel
