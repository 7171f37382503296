"""Calibration samples: text or jsonl files -> fixed-length token sequences."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megatron_prune.checkpoint.config import ConfigError


def iter_documents(files: Iterable, json_key: str = "text") -> Iterator[str]:
    """Documents of .jsonl files (one JSON object per line, text under `json_key`) or plain
    text files (blank-line separated paragraphs are kept together: one file = one document)."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"--data {f}: no such file")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[json_key]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ConfigError(f"{path}:{n}: not a JSON object with {json_key!r} ({e})")
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def calibration_batches(tokenizer, files, samples: int, seq_length: int,
                        json_key: str = "text") -> torch.Tensor:
    """[samples, seq_length] token ids: documents tokenized (BOS first, EOS between documents),
    concatenated and cut into consecutive windows. Fails if the data is too short."""
    need = samples * seq_length
    stream = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for doc in iter_documents(files, json_key):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if bos is not None:
            stream.append(bos)
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConfigError(f"calibration data gives {len(stream)} tokens; {samples} samples x "
                          f"{seq_length} need {need}: pass more --data or fewer --samples")
    return torch.tensor(stream[:need], dtype=torch.long).reshape(samples, seq_length)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    if path is None:
        raise ConfigError("the model keeps no tokenizer (no tokenizer/ folder beside the "
                          "checkpoint): pass --tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path} ({e}); pass --tokenizer") from e
