"""A GGUF file (llama.cpp's format) -> a Hugging Face Llama directory, through transformers.

transformers reads and dequantizes GGUF itself (`from_pretrained(dir, gguf_file=NAME)`, with the
`gguf` package): no parser of ours. What this adds around it:

* the file is checked first with the `gguf` package's reader (a header, `general.architecture`
  = llama, every tensor inside the file), so a truncated file or another architecture is refused
  with a clear message before transformers builds anything;
* the dequantized model is written tensor by tensor through the project's HF writer (config.json
  from `ModelConfig`, safetensors shards), with the tokenizer transformers rebuilds from the GGUF
  (`tokenizer.json` + its config), into a directory renamed into place only when complete.

The dequantized weights are the model: a Q4 file imports as the fp32 (or bf16) numbers its
blocks decode to. transformers holds the whole model while it dequantizes (1x the fp32 model).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import DTYPES, ConfigError, ModelConfig
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.checkpoint.hf import write_hf_checkpoint
from megatron_prune.checkpoint.tensor_io import CheckpointReadError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)


def check_gguf(path) -> dict:
    """The GGUF header's facts ({architecture, tensors, name}); refuses a file that is not a
    complete GGUF of a supported architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ConfigError("reading GGUF needs the `gguf` package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
        arch = _field_text(reader, "general.architecture")
        name = _field_text(reader, "general.name", default="")
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, KeyError, IndexError, TypeError, OSError, EOFError) as e:
        raise CheckpointReadError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from e
    if end > size:
        raise CheckpointReadError(f"{path}: truncated ({size} bytes, its tensors need {end})")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (only "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}: Llama-family models)")
    return {"architecture": arch, "name": name, "tensors": len(reader.tensors)}


def _field_text(reader, key: str, default=None) -> str:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"no {key} in the GGUF header")
        return default
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _load(path: Path, dtype: torch.dtype):
    """transformers' GGUF loader: the dequantized model and the tokenizer it rebuilds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _llama_fields(config) -> dict:
    """The config's own fields: without the quantization (the weights are written dequantized)
    and without every PretrainedConfig field still at its default (id2label, return_dict, ...)."""
    from transformers import PretrainedConfig
    generic = PretrainedConfig().to_dict()
    return {k: v for k, v in config.to_dict().items()
            if k != "quantization_config" and not (k in generic and generic[k] == v)}


def import_gguf(gguf_file, save, *, dtype: str = "fp32", force: bool = False) -> ModelConfig:
    """GGUF file -> an HF Llama directory at `save` (config, safetensors, tokenizer)."""
    check_output(save, force)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose from {sorted(DTYPES)}")
    path = Path(gguf_file).absolute()
    facts = check_gguf(path)
    log.info("GGUF %s: %s, %d tensors", path.name, facts["name"] or facts["architecture"],
             facts["tensors"])
    model, tokenizer = _load(path, torch.float32)
    cfg = ModelConfig.from_hf(_llama_fields(model.config))
    state = model.state_dict()
    plan = layout.hf_plan(cfg)
    names = {group: [name for name, _ in tensors] for group, tensors in plan}
    missing = [n for ns in names.values() for n in ns if n not in state]
    if missing:
        raise CheckpointReadError(f"{path}: the model transformers built lacks {missing[:3]}")
    with atomic_output_dir(save, force) as tmp:
        write_hf_checkpoint(tmp, cfg, plan, lambda g: {n: state[n] for n in names[g]},
                            DTYPES[dtype])
        tokenizer.save_pretrained(tmp)
    return cfg
