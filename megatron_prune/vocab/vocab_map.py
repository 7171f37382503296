"""The old -> new token id map `prune-vocab` writes and `prune-embeddings` applies.

`vocab_map.json`:

    {"format": "emb_pruner.vocab_map", "version": 1,
     "source_tokenizer": {"kind", "fingerprint", "vocab_size", "path"},
     "pruned_tokenizer": {"kind", "fingerprint", "vocab_size", "files": [...]},
     "selection": {criterion, kept, required, added_for_merges, coverage, ...},
     "old_to_new": [new id of old id 0, ..., -1 where dropped]}

The map is increasing on the ids it keeps, so the pruned tokenizer keeps the original's order
(merge priorities included). The fingerprints tie it to both tokenizers: applying it to a model
whose tokenizer is another one is refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.jsonfile import read_tagged

FORMAT = "emb_pruner.vocab_map"
FILE_NAME = "vocab_map.json"


def short(fingerprint: str) -> str:
    return fingerprint[:12]


@dataclass
class VocabMap:
    old_to_new: list
    source: dict
    pruned: dict
    selection: dict
    path: Optional[Path] = None

    @property
    def old_vocab_size(self) -> int:
        return len(self.old_to_new)

    @property
    def kept_old_ids(self) -> list:
        """Old ids in new-id order: new id i is old id kept_old_ids[i]."""
        return [old for old, new in enumerate(self.old_to_new) if new >= 0]

    @property
    def new_vocab_size(self) -> int:
        return sum(1 for n in self.old_to_new if n >= 0)

    def new_id(self, old: int, what: str = "token id") -> int:
        if not 0 <= old < len(self.old_to_new) or self.old_to_new[old] < 0:
            raise ConfigError(f"{what} {old} is not kept by the vocabulary map {self.path}")
        return self.old_to_new[old]

    @classmethod
    def build(cls, kept: list, old_size: int, source: dict, pruned: dict, selection: dict) -> "VocabMap":
        old_to_new = [-1] * old_size
        for new, old in enumerate(kept):
            old_to_new[old] = new
        return cls(old_to_new, source, pruned, selection)

    def save(self, path) -> None:
        obj = {"format": FORMAT, "version": 1, "source_tokenizer": self.source,
               "pruned_tokenizer": self.pruned, "selection": self.selection,
               "old_vocab_size": self.old_vocab_size, "new_vocab_size": self.new_vocab_size,
               "old_to_new": self.old_to_new}
        Path(path).write_text(json.dumps(obj, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path) -> "VocabMap":
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        obj = read_tagged(path, "vocabulary map", FORMAT, "prune-vocab")
        m = obj["old_to_new"]
        kept = [n for n in m if n >= 0]
        if kept != list(range(len(kept))):
            raise ConfigError(f"vocabulary map {path}: old_to_new is not increasing 0..n-1 on kept ids")
        if obj["source_tokenizer"].get("vocab_size") != len(m):
            raise ConfigError(f"vocabulary map {path}: old_to_new covers {len(m)} ids, the source "
                              f"tokenizer has {obj['source_tokenizer'].get('vocab_size')}")
        return cls(m, obj["source_tokenizer"], obj["pruned_tokenizer"], obj.get("selection", {}), path)

    def check_source(self, vocab, where: str) -> None:
        """Refuse a tokenizer other than the one this map was made from."""
        if vocab.fingerprint != self.source["fingerprint"]:
            raise ConfigError(
                f"the vocabulary map {self.path} was made for another tokenizer: it maps "
                f"{self.source['kind']} {self.source.get('path')} ({self.source['vocab_size']} "
                f"tokens, fingerprint {short(self.source['fingerprint'])}), but {where} is "
                f"{vocab.kind} {vocab.path} ({vocab.size} tokens, fingerprint "
                f"{short(vocab.fingerprint)})")

    def pruned_files(self) -> list:
        """Paths of the pruned tokenizer's files, next to the map."""
        base = self.path.parent if self.path else Path(".")
        return [base / f for f in self.pruned.get("files", [])]
