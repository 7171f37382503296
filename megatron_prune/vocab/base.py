"""What every tokenizer kind offers the pruner (`load.py` tells the kinds apart).

A `Vocabulary` is one tokenizer (SentencePiece model, tiktoken BPE ranks, or Hugging Face
`tokenizer.json` BPE) seen as what pruning needs from it:

* `encode` / `decode`            plain text <-> ids (no BOS/EOS added, special strings as text);
* `required_ids()`               ids that must survive any pruning so any text still encodes
                                 (special/control tokens, byte-fallback pieces, base bytes);
* `needs(i)`                     the ids the merge loop builds token i from (see `bpe.py`), or
                                 None if no text can ever encode to it;
* `write_pruned(out, kept)`      the same tokenizer keeping only `kept` (old ids, ascending),
                                 renumbered 0..len(kept)-1 in that order;
* `fingerprint`                  a hash of the vocabulary itself: each id's token bytes (special
                                 tokens count by position, not name), so the same vocabulary
                                 stored as a SentencePiece model or as a `tokenizer.json`, or a
                                 Llama-3 ranks file and an HF Llama-3.x `tokenizer.json`, match.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import shutil
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

# Files an HF model directory keeps beside the tokenizer proper; rewritten with new ids.
HF_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class Vocabulary(abc.ABC):
    kind: str = "?"

    def __init__(self, path: Path, sidecar_dir: Optional[Path] = None):
        self.path = Path(path)
        self.sidecar_dir = sidecar_dir

    # ------------------------------------------------------------------ required interface
    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of ids (regular and special)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list:
        ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset:
        """Special/control tokens (never produced from plain text; always kept)."""

    @abc.abstractmethod
    def token_bytes(self, i: int) -> bytes:
        """The canonical bytes of a regular token (used by the fingerprint and for messages)."""

    @abc.abstractmethod
    def required_ids(self) -> set:
        ...

    @abc.abstractmethod
    def needs(self, i: int) -> Optional[frozenset]:
        ...

    @abc.abstractmethod
    def write_pruned(self, out: Path, kept: Sequence[int]) -> list:
        """Write the pruned tokenizer into directory `out`; return the file names written."""

    # ------------------------------------------------------------------ shared
    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"emb_pruner vocabulary v1\n")
        special = self.special_ids
        for i in range(self.size):
            if i in special:
                h.update(b"S")
            else:
                b = self.token_bytes(i)
                h.update(b"T" + len(b).to_bytes(4, "little") + b)
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "vocab_size": self.size,
                "path": str(self.path)}

    def token_repr(self, i: int) -> str:
        if i in self.special_ids:
            return f"{i} (special)"
        return f"{i} {self.token_bytes(i)!r}"

    def write_sidecars(self, out: Path, old_to_new: dict) -> list:
        """tokenizer_config.json & co. of an HF model directory, with token ids renumbered."""
        if self.sidecar_dir is None:
            return []
        written = []
        for name in HF_SIDECARS:
            src = self.sidecar_dir / name
            if not src.is_file():
                continue
            if name == "tokenizer_config.json":
                cfg = json.loads(src.read_text())
                dec = cfg.get("added_tokens_decoder")
                if isinstance(dec, dict):
                    cfg["added_tokens_decoder"] = {
                        str(old_to_new[int(k)]): v for k, v in dec.items()
                        if int(k) in old_to_new}
                (out / name).write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
            elif name == "added_tokens.json":
                added = json.loads(src.read_text())
                (out / name).write_text(json.dumps(
                    {t: old_to_new[i] for t, i in added.items() if i in old_to_new}, indent=2,
                    ensure_ascii=False))
            else:
                shutil.copy2(src, out / name)
            written.append(name)
        return written
