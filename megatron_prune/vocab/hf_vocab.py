"""Hugging Face `tokenizer.json` with a BPE model: vocab, merges and added tokens kept consistent.

Always kept: every added token (special or not: they are matched before the model runs), the
unknown token, the 256 base characters of a byte-level BPE (GPT-2's bytes-to-unicode alphabet)
or the `<0xXX>` pieces of a byte-fallback one, and, when neither, every single-character token.
A kept token brings the tokens HF's merge loop builds it from (lowest merge rank first, leftmost
on ties; see `bpe.py`); with `ignore_merges` a token the loop cannot build is still produced
whole from a matching pre-token. The pruned file keeps a merge only when both of its parts and
its result are kept, and renumbers ids everywhere they appear (vocab, added tokens, the post
processor's special token ids).
"""
from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import Vocabulary
from megatron_prune.vocab.bpe import merge_tree

_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
log = logging.getLogger(__name__)
_NOT_IN_UTF8 = frozenset([0xC0, 0xC1] + list(range(0xF5, 0x100)))


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _has_type(node, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _remap_post_processor(node, old_to_new: dict):
    """Renumber the special-token ids a post processor carries (Template/Bert/Roberta, nested)."""
    if isinstance(node, list):
        return [_remap_post_processor(v, old_to_new) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "special_tokens" and isinstance(v, dict):
            out[k] = {name: {**spec, "ids": [old_to_new[i] for i in spec.get("ids", [])]}
                      for name, spec in v.items()}
        elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
            out[k] = [v[0], old_to_new[v[1]]]
        else:
            out[k] = _remap_post_processor(v, old_to_new)
    return out


class HFBPEVocabulary(Vocabulary):
    kind = "hf-bpe"

    def __init__(self, path: Path, obj: dict, sidecar_dir: Optional[Path] = None):
        super().__init__(path, sidecar_dir)
        self.obj = obj
        model = obj["model"]
        mtype = model.get("type")
        if mtype != "BPE":
            raise ConfigError(f"tokenizer {path}: tokenizer.json model type {mtype!r} is not "
                              "supported (only BPE)")
        for field in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(field):
                raise ConfigError(f"tokenizer {path}: BPE with {field}={model[field]!r} is not supported")
        self.vocab: dict = dict(model["vocab"])
        self.merges_as_lists = bool(model["merges"]) and isinstance(model["merges"][0], list)
        self.merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
                       for m in model["merges"]]
        self.merge_rank = {}
        for r, pair in enumerate(self.merges):
            self.merge_rank.setdefault(pair, r)
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.byte_level = _has_type(obj.get("pre_tokenizer"), "ByteLevel")
        self.unk = model.get("unk_token")
        self.added = {t["id"]: t for t in obj.get("added_tokens", [])}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        ids = set(self.id_to_token) | set(self.added)
        n = max(ids) + 1 if ids else 0
        if len(ids) != n:
            raise ConfigError(f"tokenizer {path}: ids are not 0..{n - 1} without gaps")
        self._size = n
        self._special = frozenset(i for i, t in self.added.items() if t.get("special"))
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        if self.byte_level:
            # Bytes that never occur in UTF-8 (C0, C1, F5..FF) may be missing, as in GPT-NeoX's.
            missing = [b for b, c in bytes_to_unicode().items()
                       if c not in self.vocab and b not in _NOT_IN_UTF8]
            if missing:  # SmolLM2's lacks 0x04, 0xf1, 0xf2: text with them did not encode
                # before either, so the pruned tokenizer loses nothing the original had
                log.warning("tokenizer %s: byte-level BPE has no base character for bytes %s; "
                            "text containing them cannot be encoded by it (pruned or not)",
                            path, [hex(b) for b in missing])
        self._tk = None

    @property
    def tokenizer(self):
        if self._tk is None:
            from tokenizers import Tokenizer
            self._tk = Tokenizer.from_str(json.dumps(self.obj))
        return self._tk

    @property
    def size(self) -> int:
        return self._size

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def special_ids(self) -> frozenset:
        return self._special

    def token_bytes(self, i: int) -> bytes:
        if i in self.added and i not in self.id_to_token:
            return self.added[i]["content"].encode()
        tok = self.id_to_token[i]
        if self.byte_level and all(c in self._byte_decoder for c in tok):
            return bytes(self._byte_decoder[c] for c in tok)
        if self.byte_fallback and _BYTE_PIECE.match(tok):
            return tok.encode()
        return tok.replace("\u2581", " ").encode()

    def required_ids(self) -> set:
        keep = set(self.added)
        if self.unk is not None and self.unk in self.vocab:
            keep.add(self.vocab[self.unk])
        if self.byte_level:
            keep |= {self.vocab[c] for c in self._byte_decoder if c in self.vocab}
        if self.byte_fallback:
            keep |= {i for t, i in self.vocab.items() if _BYTE_PIECE.match(t)}
        if not self.byte_level and not self.byte_fallback:
            keep |= {i for t, i in self.vocab.items() if len(t) == 1}
        return keep

    def _priority(self, a: str, b: str):
        return self.merge_rank.get((a, b))

    def needs(self, i: int) -> Optional[frozenset]:
        if i not in self.id_to_token or i in self.added:
            return frozenset()
        tok = self.id_to_token[i]
        if len(tok) == 1:
            return frozenset()
        if any(c not in self.vocab for c in tok):
            return frozenset() if self.ignore_merges else None
        tree = merge_tree(tok, list(tok), self._priority)
        if tree is None:
            return frozenset() if self.ignore_merges else None
        return frozenset(self.vocab[t] for t in tree) | {self.vocab[c] for c in tok}

    def write_pruned(self, out: Path, kept: Sequence[int]) -> list:
        old_to_new = {old: new for new, old in enumerate(kept)}
        obj = copy.deepcopy(self.obj)
        model = obj["model"]
        model["vocab"] = {t: old_to_new[i] for t, i in sorted(self.vocab.items(), key=lambda x: x[1])
                          if i in old_to_new}
        kept_tokens = model["vocab"]
        merges = [m for m in self.merges
                  if m[0] in kept_tokens and m[1] in kept_tokens and m[0] + m[1] in kept_tokens]
        model["merges"] = [list(m) for m in merges] if self.merges_as_lists else \
            [" ".join(m) for m in merges]
        missing = [t["content"] for i, t in self.added.items() if i not in old_to_new]
        if missing:
            raise ConfigError(f"added tokens must be kept, dropped: {missing[:3]}")
        obj["added_tokens"] = [{**t, "id": old_to_new[t["id"]]} for t in obj.get("added_tokens", [])]
        if obj.get("post_processor") is not None:
            obj["post_processor"] = _remap_post_processor(obj["post_processor"], old_to_new)
        (out / "tokenizer.json").write_text(json.dumps(obj, ensure_ascii=False, indent=1))
        return ["tokenizer.json"] + self.write_sidecars(out, old_to_new)
