"""`load_vocabulary`: which tokenizer kind a file is, opened as that kind's `Vocabulary`.

Kept apart from `base.py` so that the kinds (`sp_vocab`, `hf_vocab`, `tiktoken_vocab`) import the
base class and this factory imports them, with no circle between.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import HF_SIDECARS, Vocabulary
from megatron_prune.vocab.hf_vocab import HFBPEVocabulary
from megatron_prune.vocab.sp_vocab import SentencePieceVocabulary
from megatron_prune.vocab.tiktoken_vocab import TiktokenVocabulary

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


def _looks_like_tiktoken(head: bytes) -> bool:
    lines = head.split(b"\n")[:-1] or head.split(b"\n")
    return bool(lines) and all(_TIKTOKEN_LINE.match(line) for line in lines[:20] if line)


def _sentencepiece_proto(data: bytes):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    try:
        m.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return None
    if len(m.pieces) == 0 or not m.HasField("trainer_spec"):
        return None
    return m


def _open_vocabulary(path) -> Vocabulary:
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return _open_vocabulary(path / name)
        raise ConfigError(f"tokenizer {path}: no tokenizer.model or tokenizer.json in this directory")
    if not path.is_file():
        raise ConfigError(f"tokenizer {path}: no such file or directory")
    sidecars = path.parent if any((path.parent / n).is_file() for n in HF_SIDECARS) else None
    data = path.read_bytes()
    if data[:1] == b"{":
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"unknown tokenizer type: {path} is not valid JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            return HFBPEVocabulary(path, obj, sidecars)
        raise ConfigError(f"unknown tokenizer type: {path} is JSON but not a Hugging Face "
                          "tokenizer.json (no 'model' entry)")
    if _looks_like_tiktoken(data[:4096]):
        return TiktokenVocabulary(path, data, sidecars)
    proto = _sentencepiece_proto(data)
    if proto is not None:
        vocab = SentencePieceVocabulary(path, proto, sidecars)
        vocab.processor  # sentencepiece checks a model only when it loads it: fail here, not mid-count
        return vocab
    raise ConfigError(
        f"unknown tokenizer type: {path} is not a SentencePiece model, a tiktoken BPE ranks file "
        "(lines 'base64 rank') or a Hugging Face tokenizer.json")


def load_vocabulary(path) -> Vocabulary:
    """A tokenizer file, or an HF model directory (tokenizer.model before tokenizer.json).

    Raises ConfigError for anything that is not a SentencePiece model, a tiktoken BPE ranks file
    or a Hugging Face tokenizer.json with a BPE model, and for a file of one of those kinds that
    is damaged (the kinds' parsers fail in their own ways: named here, with the file).
    """
    try:
        return _open_vocabulary(path)
    except ConfigError:
        raise
    except (RuntimeError, TypeError, AttributeError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"tokenizer {path}: damaged or malformed ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e


def find_tokenizer(directory) -> Optional[Path]:
    """The tokenizer file kept with a checkpoint directory, if any."""
    d = Path(directory)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (d / name).is_file():
            return d / name
    return None

