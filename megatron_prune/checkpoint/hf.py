"""Hugging Face checkpoint directories: lazy reading and streaming, sharded writing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.tensor_io import (CheckpointReadError, SafetensorsReader,
                                                 SafetensorsWriter, TorchFileReader)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


class HFCheckpoint:
    """An HF model directory: config plus tensors from (sharded) safetensors or .bin files."""

    def __init__(self, path):
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointReadError(f"missing {cfg_file}: not a Hugging Face model directory")
        try:
            self.hf_config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointReadError(f"{cfg_file}: invalid JSON ({e})") from e
        if not isinstance(self.hf_config, dict):
            raise CheckpointReadError(f"{cfg_file}: not a JSON object")
        try:
            self.config = ModelConfig.from_hf(self.hf_config)
        except ConfigError as e:
            raise ConfigError(f"{cfg_file}: {e}") from e
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ConfigError(f"{cfg_file}: missing or malformed field ({type(e).__name__}: "
                              f"{e})") from e
        self._files = {}
        self.where = self._index()

    def _index(self) -> dict:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.path / index_name
            if index.is_file():
                return dict(json.loads(index.read_text())["weight_map"])
            if (self.path / single).is_file():
                return {k: single for k in self._reader(single).keys()}
        raise CheckpointReadError(f"{self.path}: no model.safetensors[.index.json] or pytorch_model.bin")

    def _reader(self, file):
        if file not in self._files:
            p = self.path / file
            if not p.is_file():
                raise CheckpointReadError(f"missing checkpoint file: {p}")
            self._files[file] = (SafetensorsReader(p) if file.endswith(".safetensors")
                                 else TorchFileReader(p))
        return self._files[file]

    def _lookup(self, name):
        if name not in self.where:
            raise CheckpointReadError(f"{self.path}: tensor {name} not found")
        return self._reader(self.where[name])

    def keys(self):
        return list(self.where)

    def shape(self, name) -> tuple:
        return self._lookup(name).shape(name)

    def dtype(self, name) -> torch.dtype:
        return self._lookup(name).dtype(name)

    def get(self, name, dim=None, start=0, end=None) -> torch.Tensor:
        return self._lookup(name).get(name, dim, start, end)

    def read_rows_into(self, name, start: int, end: int, out: torch.Tensor) -> None:
        """Rows [start, end) of `name` into `out`: straight from a safetensors file, else
        (a .bin) read and copied."""
        reader = self._lookup(name)
        if hasattr(reader, "read_rows_into"):
            reader.read_rows_into(name, start, end, out)
        else:
            out.copy_(reader.get(name, 0, start, end))

    def check_complete(self, names: Iterable[str]) -> None:
        """Every needed tensor exists, and every file holding one is present and readable."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise CheckpointReadError(f"{self.path}: missing tensors, e.g. {missing[:3]}")
        for file in sorted(set(self.where.values())):
            self._reader(file)


def write_hf_checkpoint(out: Path, cfg: ModelConfig, plan: list, produce: Callable,
                        dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30,
                        progress=None) -> None:
    """Write an HF checkpoint tensor by tensor.

    plan: [(group, [(hf_name, shape), ...])] in write order; a group's tensors land in one shard.
    produce(group) -> {hf_name: tensor} is called once per group, just before it is written.
    """
    shards, current, size = [], [], 0
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for group, tensors in plan:
        nbytes = sum(int(torch.Size(s).numel()) * itemsize for _, s in tensors)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((group, tensors))
        size += nbytes
    if current:
        shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tplan = [(n, s, dtype) for _, ts in shard for n, s in ts]
        with SafetensorsWriter(out / fname, tplan, metadata={"format": "pt"}) as w:
            for group, tensors in shard:
                made = produce(group)
                for n, _ in tensors:
                    w.write(n, made.pop(n).to(dtype))
                    weight_map[n] = fname
                if progress is not None:
                    progress.update(1)
            total += w.total
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    gen = {k: cfg.hf_extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if cfg.hf_extra.get(k) is not None}
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


MEGATRON_TOKENIZER_DIR = "tokenizer"


def model_tokenizer_dir(model) -> Optional[Path]:
    """The tokenizer that belongs to a model: an HF directory holds its own files; a Megatron
    checkpoint written by this project keeps a copy in DIR/tokenizer (Megatron ignores it)."""
    p = Path(model)
    if (p / "config.json").is_file():
        return p
    tok = p / MEGATRON_TOKENIZER_DIR
    return tok if tok.is_dir() else None


def keep_tokenizer(model, out: Path) -> None:
    """Store the tokenizer of `model` (HF directory or Megatron checkpoint) as out/tokenizer, so
    later tools (export, eval, training) find it next to the Megatron checkpoint."""
    src = model_tokenizer_dir(model)
    if src is None:
        return
    tok = out / MEGATRON_TOKENIZER_DIR
    tok.mkdir()
    if not copy_tokenizer(src, tok):
        tok.rmdir()


def copy_tokenizer(src: Optional[Path], out: Path) -> list:
    """Copy tokenizer files from a model dir (or a single tokenizer file) next to a checkpoint."""
    if src is None:
        return []
    src = Path(src)
    if src.is_file():
        shutil.copy2(src, out / src.name)
        return [src.name]
    if not src.is_dir():
        raise ConfigError(f"--tokenizer {src}: no such file or directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
