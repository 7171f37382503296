"""One place that builds a tokenizer from Megatron-LM's `--tokenizer-type` / `--tokenizer-model`.

Every tool of the project that turns text into token ids (preprocess, the trainer, evaluation)
builds its tokenizer here, so the same flags give the same ids everywhere. A `Tokenizer` exposes
`encode(text) -> list[int]`, `decode(ids) -> str`, `bos`, `eod` and `vocab_size`.

`encode` never adds special tokens (no BOS, no EOS), as megatron-core's tokenizers do
(`MegatronTokenizer.tokenize`); the caller appends `eod` where a document ends.

| --tokenizer-type | --tokenizer-model | eod |
|---|---|---|
| GPTSentencePieceTokenizer, Llama2Tokenizer | a SentencePiece `.model` | the model's EOS |
| HuggingFaceTokenizer | a directory (`AutoTokenizer`; a bare `vocab.json` + `merges.txt` directory is read as GPT-2 byte-level BPE), a `tokenizer.json` file, or a hub name | `eos_token`, else `<|endoftext|>` / `</s>` / `<|end_of_text|>` / `<eos>` when in the vocab |
| TikTokenizer | a tiktoken ranks file (`base64-token rank` per line, as Llama-3's `tokenizer.model`) | `<|end_of_text|>` |

TikTokenizer follows Meta's Llama-3 reference tokenizer: its split pattern and
`--tiktoken-num-special-tokens` (default 256) special tokens numbered from the first id after the
ranks (128000 for Llama-3: `<|begin_of_text|>` = 128000, `<|end_of_text|>` = 128001,
`<|eot_id|>` = 128009, vocab 128256). Text is encoded as plain text: a special token's spelling in
the input is not turned into the special id. Megatron-LM's own JSON tiktoken vocabularies (special
tokens first, then the ranks) are not supported.
"""
from __future__ import annotations

import argparse
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_prune.checkpoint.config import ConfigError

SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "TikTokenizer")

# Meta's Llama-3 split pattern (llama3/tokenizer.py, `pat_str`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Meta's encode() cuts the text into pieces of at most this many characters, and runs of
# whitespace or of non-whitespace into pieces of at most MAX_RUN, before the BPE (tiktoken's
# regex is slow on very long runs).
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def llama3_special_tokens(count: int = LLAMA3_NUM_SPECIAL_TOKENS) -> List[str]:
    """Meta's special-token names in id order (the first ten are named, the rest reserved)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, 5 + max(0, count - len(named)))]
    return (named + reserved)[:count]


class Tokenizer(ABC):
    """Text <-> token ids. `encode` adds no special tokens."""

    tokenizer_type: str
    vocab_size: int
    bos: Optional[int]
    eod: Optional[int]

    @abstractmethod
    def encode(self, text: str) -> List[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.tokenizer_type}, vocab_size={self.vocab_size}, "
                f"bos={self.bos}, eod={self.eod})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: Path, tokenizer_type: str):
        import sentencepiece as spm
        self.tokenizer_type = tokenizer_type
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(model))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"--tokenizer-model {model} is not a SentencePiece model "
                              f"(needed by {tokenizer_type}): {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, model: str):
        self._tok = _load_hf_tokenizer(model)
        # Documents are whole books: silence "sequence longer than model_max_length".
        self._tok.model_max_length = 1 << 62
        self.vocab_size = len(self._tok)
        self.bos = self._tok.bos_token_id
        self.eod = self._tok.eos_token_id
        if self.eod is None:
            vocab = self._tok.get_vocab()
            self.eod = next((vocab[t] for t in _HF_EOD_CANDIDATES if t in vocab), None)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _load_hf_tokenizer(model: str):
    import transformers
    path = Path(model)
    try:
        if path.is_file():
            if path.suffix != ".json":
                raise ConfigError(f"--tokenizer-model {model}: HuggingFaceTokenizer needs a "
                                  "directory, a tokenizer.json file or a hub name")
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        if path.is_dir() and not (path / "tokenizer.json").exists() \
                and not (path / "tokenizer_config.json").exists() \
                and (path / "vocab.json").exists() and (path / "merges.txt").exists():
            # A bare GPT-2 style directory: AutoTokenizer cannot tell the class without a config.
            return transformers.GPT2TokenizerFast.from_pretrained(str(path))
        return transformers.AutoTokenizer.from_pretrained(str(model))
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"--tokenizer-model {model}: cannot load a Hugging Face tokenizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


class TikTokenizer(Tokenizer):
    tokenizer_type = "TikTokenizer"

    def __init__(self, model: Path, pattern: Optional[str] = None,
                 num_special_tokens: Optional[int] = None):
        import tiktoken
        ranks = _read_tiktoken_ranks(model)
        pattern = _tiktoken_pattern(pattern)
        count = LLAMA3_NUM_SPECIAL_TOKENS if num_special_tokens is None else int(num_special_tokens)
        if count < 2:
            raise ConfigError(f"--tiktoken-num-special-tokens {count}: need at least 2 "
                              "(<|begin_of_text|>, <|end_of_text|>)")
        first = len(ranks)
        specials = {name: first + i for i, name in enumerate(llama3_special_tokens(count))}
        self._enc = tiktoken.Encoding(name=Path(model).name, pat_str=pattern,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self._enc.n_vocab
        self.bos = specials["<|begin_of_text|>"]
        self.eod = specials["<|end_of_text|>"]

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for start in range(0, len(text), _TIKTOKEN_MAX_CHARS):
            for piece in _split_long_runs(text[start:start + _TIKTOKEN_MAX_CHARS]):
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def _tiktoken_pattern(pattern: Optional[str]) -> str:
    if pattern in (None, "", "llama3"):
        return LLAMA3_PATTERN
    if pattern in ("v1", "v2"):
        raise ConfigError(f"--tiktoken-pattern {pattern} is Megatron-LM's pattern for its JSON "
                          "tiktoken vocabularies, which are not supported; with a ranks file use "
                          "'llama3' (the default) or give the regex itself")
    try:
        import regex
        regex.compile(pattern)
    except ImportError:
        pass
    except Exception as e:  # regex.error
        raise ConfigError(f"--tiktoken-pattern is not a valid regex: {e}") from e
    return pattern


def _split_long_runs(text: str, max_run: int = _TIKTOKEN_MAX_RUN):
    """Meta's `_split_whitespaces_or_nonwhitespaces`: cut runs of more than max_run consecutive
    whitespace or non-whitespace characters."""
    if len(text) <= max_run or not re.search(r"\s{%d}|\S{%d}" % (max_run + 1, max_run + 1), text):
        yield text
        return
    start, run, in_space = 0, 0, text[0].isspace() if text else False
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != in_space:
            run, in_space = 1, is_space
        else:
            run += 1
            if run > max_run:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


def _read_tiktoken_ranks(model: Path) -> dict:
    import base64
    import binascii
    ranks = {}
    try:
        with open(model, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except FileNotFoundError:
        raise ConfigError(f"--tokenizer-model {model}: no such file")
    except (ValueError, binascii.Error) as e:
        raise ConfigError(f"--tokenizer-model {model}:{n}: not a tiktoken ranks file (expected "
                          "lines 'base64-token rank', as Llama-3's tokenizer.model)") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"--tokenizer-model {model}: ranks are not 0..{len(ranks) - 1}")
    return ranks


@dataclass(frozen=True)
class TokenizerSpec:
    """What builds a tokenizer: small and picklable, so worker processes build their own."""
    tokenizer_type: str
    tokenizer_model: str
    tiktoken_pattern: Optional[str] = None
    tiktoken_num_special_tokens: Optional[int] = None

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.tokenizer_model,
                               tiktoken_pattern=self.tiktoken_pattern,
                               tiktoken_num_special_tokens=self.tiktoken_num_special_tokens)


def build_tokenizer(tokenizer_type: str, tokenizer_model, *, tiktoken_pattern: Optional[str] = None,
                    tiktoken_num_special_tokens: Optional[int] = None) -> Tokenizer:
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                          f"supported: {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise ConfigError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(str(tokenizer_model))
    path = Path(tokenizer_model)
    if not path.is_file():
        raise ConfigError(f"--tokenizer-model {tokenizer_model}: no such file")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(path, tokenizer_type)
    return TikTokenizer(path, tiktoken_pattern, tiktoken_num_special_tokens)


def add_tokenizer_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Megatron-LM's tokenizer flags, for every command that tokenizes."""
    g = parser.add_argument_group("tokenizer (Megatron-LM flag names)")
    g.add_argument("--tokenizer-type", required=required, choices=TOKENIZER_TYPES,
                   help="which tokenizer library reads --tokenizer-model")
    g.add_argument("--tokenizer-model", required=required,
                   help="SentencePiece .model, tiktoken ranks file, or Hugging Face tokenizer "
                        "directory / tokenizer.json / hub name")
    g.add_argument("--tiktoken-pattern", default=None,
                   help="TikTokenizer split regex (default 'llama3': Meta's Llama-3 pattern)")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=None,
                   help="TikTokenizer special tokens appended after the ranks "
                        f"(default {LLAMA3_NUM_SPECIAL_TOKENS}, as Llama-3)")


def spec_from_args(args: argparse.Namespace) -> TokenizerSpec:
    return TokenizerSpec(args.tokenizer_type, args.tokenizer_model,
                         getattr(args, "tiktoken_pattern", None),
                         getattr(args, "tiktoken_num_special_tokens", None))


def tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    return spec_from_args(args).build()
