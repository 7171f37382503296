"""tiktoken BPE ranks files (Llama-3's `tokenizer.model`): base bytes always kept, specials renumbered.

A ranks file holds lines `base64(token bytes) rank`; the rank is the token id and the merge
priority. Meta's Llama-3 file has 128000 ranks and no special tokens: those (256 of them) and
the pre-tokenizer regex live in Meta's code. Here they come from a `tiktoken_config.json` beside
the ranks file when there is one, and otherwise are Llama-3's (`LLAMA3_PAT`, `llama3_specials`).

Pruning keeps every single-byte token (so any byte string still encodes), the kept tokens in
rank order (renumbered 0..n-1, which keeps their merge order), and all special tokens after them
(renumbered n, n+1, ...). tiktoken emits a pre-token that is itself a token directly, without
merging; a token the merge loop cannot build from its bytes is kept on its own for that reason
(`needs` = nothing), while one it can build brings its merge tree along (see `bpe.py`).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import Vocabulary
from megatron_prune.vocab.bpe import merge_tree

CONFIG_NAME = "tiktoken_config.json"
# Meta's Llama-3 pre-tokenizer (llama/tokenizer.py).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256


def llama3_specials() -> list:
    """Meta's Llama-3 special tokens, in id order after the ranks."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    return names + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL - 5)]


def parse_ranks(path: Path, data: bytes) -> list:
    """[token bytes] indexed by rank; ranks must be exactly 0..n-1."""
    tokens = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            tokens[int(rank)] = base64.b64decode(b64, validate=True)
        except ValueError as e:
            raise ConfigError(f"tiktoken ranks file {path}, line {lineno}: not 'base64 rank' ({e})") from None
    n = len(tokens)
    if sorted(tokens) != list(range(n)):
        raise ConfigError(f"tiktoken ranks file {path}: ranks are not 0..{n - 1} without gaps")
    out = [tokens[r] for r in range(n)]
    if len(set(out)) != n:
        raise ConfigError(f"tiktoken ranks file {path}: the same bytes appear under two ranks")
    return out


class TiktokenVocabulary(Vocabulary):
    kind = "tiktoken"

    def __init__(self, path: Path, data: bytes, sidecar_dir: Optional[Path] = None):
        super().__init__(path, sidecar_dir)
        self.tokens = parse_ranks(path, data)
        self.ranks = {b: r for r, b in enumerate(self.tokens)}
        cfg_file = Path(path).parent / CONFIG_NAME
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            self.pat_str = cfg["pat_str"]
            specials = sorted(cfg["special_tokens"].items(), key=lambda kv: kv[1])
            self.config_file = cfg_file
        else:
            self.pat_str = LLAMA3_PAT
            specials = [(name, len(self.tokens) + k) for k, name in enumerate(llama3_specials())]
            self.config_file = None
        self.special_tokens = dict(specials)
        if sorted(self.special_tokens.values()) != list(
                range(len(self.tokens), len(self.tokens) + len(specials))):
            raise ConfigError(f"{cfg_file}: special token ids must follow the ranks "
                              f"({len(self.tokens)}, {len(self.tokens) + 1}, ...)")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ConfigError(f"tiktoken ranks file {path}: byte tokens missing, e.g. {missing[:3]}; "
                              "a byte-level BPE needs all 256")
        self._enc = None

    @property
    def encoding(self):
        if self._enc is None:
            import tiktoken
            self._enc = tiktoken.Encoding(
                name=f"pruned:{self.path}", pat_str=self.pat_str,
                mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        return self._enc

    @property
    def size(self) -> int:
        return len(self.tokens) + len(self.special_tokens)

    def encode(self, text: str) -> list:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    @property
    def special_ids(self) -> frozenset:
        return frozenset(self.special_tokens.values())

    def token_bytes(self, i: int) -> bytes:
        return self.tokens[i]

    def required_ids(self) -> set:
        return set(self.special_ids) | {self.ranks[bytes([b])] for b in range(256)}

    def _priority(self, a: bytes, b: bytes):
        return self.ranks.get(a + b)

    def needs(self, i: int) -> Optional[frozenset]:
        if i >= len(self.tokens) or len(self.tokens[i]) == 1:
            return frozenset()
        tok = self.tokens[i]
        tree = merge_tree(tok, [bytes([c]) for c in tok], self._priority)
        if tree is None:  # only ever produced as a whole pre-token
            return frozenset()
        return frozenset(self.ranks[t] for t in tree) | {self.ranks[bytes([c])] for c in tok}

    def write_pruned(self, out: Path, kept: Sequence[int]) -> list:
        n = len(self.tokens)
        regular = [i for i in kept if i < n]
        if set(kept) - set(regular) != self.special_ids:
            raise ConfigError("tiktoken pruning must keep every special token")
        with open(out / "tokenizer.model", "wb") as f:
            for new, old in enumerate(regular):
                f.write(base64.b64encode(self.tokens[old]) + b" " + str(new).encode() + b"\n")
        specials = {name: len(regular) + k for k, (name, _) in
                    enumerate(sorted(self.special_tokens.items(), key=lambda kv: kv[1]))}
        (out / CONFIG_NAME).write_text(json.dumps(
            {"pat_str": self.pat_str, "special_tokens": specials}, indent=2))
        old_to_new = {old: new for new, old in enumerate(kept)}
        return ["tokenizer.model", CONFIG_NAME] + self.write_sidecars(out, old_to_new)
