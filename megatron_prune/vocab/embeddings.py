"""Apply a vocabulary map to a checkpoint: the embedding and output rows of the kept tokens.

`VocabMappedSource` wraps any checkpoint source of `megatron_prune.checkpoint.convert` (HF directory or
Megatron checkpoint at any TP/PP, either format): it serves `model.embed_tokens.weight` and
`lm_head.weight` with only the kept rows, in new-id order, read run by run (never the whole
matrix), and passes every other tensor through. The existing writers then write it in the
checkpoint's own format: HF safetensors shards, or Megatron rank files at the same TP/PP and
layer spec, where the vocab-parallel tensors are re-padded by Megatron's rule for the new size.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_prune.checkpoint import convert, layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.checkpoint.hf import HFCheckpoint, model_tokenizer_dir
from megatron_prune.vocab.load import find_tokenizer, load_vocabulary
from megatron_prune.vocab.vocab_map import FILE_NAME, VocabMap

log = logging.getLogger(__name__)

VOCAB_TENSORS = tuple(n for spec in (layout.EMBEDDING, layout.OUTPUT) for n in spec.hf_names())
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def runs(ids: Sequence[int]) -> list:
    """[(start, end)) ranges of consecutive values in an ascending id list."""
    out = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [tuple(r) for r in out]


class VocabMappedSource:
    """A source whose vocab tensors hold rows `old_ids` (ascending) of the wrapped source's."""

    def __init__(self, source, old_ids: Sequence[int], config: ModelConfig):
        self.source = source
        self.old_ids = list(old_ids)
        if self.old_ids != sorted(set(self.old_ids)):
            raise ConfigError("kept ids must be ascending and distinct")
        self.config = config
        self.dtype = source.dtype

    def keys(self):
        return self.source.keys()

    def shape(self, name) -> tuple:
        if name in VOCAB_TENSORS:
            return (len(self.old_ids),) + tuple(self.source.shape(name)[1:])
        return self.source.shape(name)

    def _rows(self, name, ids) -> torch.Tensor:
        """Rows `ids` (ascending), read run by run into one preallocated tensor."""
        out, at = None, 0
        for a, b in runs(ids):
            part = self.source.get(name, 0, a, b)
            if out is None:
                out = torch.empty((len(ids),) + tuple(part.shape[1:]), dtype=part.dtype)
            out[at:at + b - a] = part
            at += b - a
        if out is None:
            return torch.empty((0,) + tuple(self.source.shape(name)[1:]), dtype=self.dtype)
        return out

    def get(self, name, dim=None, start=0, end=None) -> torch.Tensor:
        if name not in VOCAB_TENSORS:
            return self.source.get(name, dim, start, end)
        if dim == 0:
            end = len(self.old_ids) if end is None else end
            return self._rows(name, self.old_ids[start:end])
        full = self._rows(name, self.old_ids)
        if dim is None:
            return full
        end = full.shape[dim] if end is None else end
        return full.narrow(dim, start, end - start)

    def group(self, spec, layer) -> dict:
        if spec.vocab:
            return {n: self.get(n) for n in spec.hf_names(layer)}
        return self.source.group(spec, layer)


# ---------------------------------------------------------------------------- config ids
def remap_token_ids(fields: dict, vmap: VocabMap, where: str) -> dict:
    """bos/eos/pad (int or list) ids of a config dict, renumbered; a dropped one is an error."""
    out = dict(fields)
    for k in TOKEN_ID_FIELDS:
        v = fields.get(k)
        if v is None:
            continue
        if isinstance(v, list):
            out[k] = [vmap.new_id(int(x), f"{where} {k}") for x in v]
        else:
            out[k] = vmap.new_id(int(v), f"{where} {k}")
    return out


def _check_model(vmap: VocabMap, cfg: ModelConfig, tokenizer: Optional[Path], what: str) -> None:
    if cfg.vocab_size != vmap.old_vocab_size:
        raise ConfigError(
            f"tokenizer and model vocab sizes disagree: the map {vmap.path} is for a "
            f"{vmap.old_vocab_size}-token tokenizer, {what} has vocab_size {cfg.vocab_size}")
    if tokenizer is None:
        log.warning("%s keeps no tokenizer: only its vocab size was checked against the map", what)
        return
    vmap.check_source(load_vocabulary(tokenizer), f"the tokenizer of {what}")


def _stage_split(ckpt) -> tuple:
    """(first, last) stage layer counts that reproduce an uneven PP split, else (None, None)."""
    counts = getattr(ckpt, "stage_counts", None)
    if counts is None:  # torch_dist: the args say
        return (getattr(ckpt.args, "decoder_first_pipeline_num_layers", None),
                getattr(ckpt.args, "decoder_last_pipeline_num_layers", None))
    if len(set(counts)) <= 1:
        return None, None
    first, last = counts[0], counts[-1]
    for f, l in ((first, last), (first, None), (None, last)):
        try:
            if layout.stage_layer_counts(sum(counts), len(counts), f, l) == list(counts):
                return f, l
        except ConfigError:
            pass
    raise ConfigError(f"cannot reproduce the pipeline split {counts} of the checkpoint")


def _copy_tokenizer(vmap: VocabMap, out: Path) -> list:
    files = [f for f in vmap.pruned_files() if f.is_file()]
    if not files:
        log.warning("no pruned tokenizer files next to %s: the output has no tokenizer", vmap.path)
        return []
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, out / f.name)
    return [f.name for f in files]


def prune_embeddings(map_path, save, *, hf_dir=None, load=None, tokenizer=None,
                     force: bool = False, max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
    """Write the checkpoint at `hf_dir` (HF) or `load` (Megatron) with its vocabulary pruned by
    the map, in the same format (and TP/PP/layer spec for Megatron) into `save`."""
    if (hf_dir is None) == (load is None):
        raise ConfigError("give exactly one of --hf-dir and --load")
    vmap = VocabMap.load(map_path)
    check_output(save, force)
    old_ids = vmap.kept_old_ids
    if hf_dir is not None:
        source = convert.HFSource(HFCheckpoint(hf_dir))
        found = Path(tokenizer) if tokenizer else find_tokenizer(hf_dir)
        what = f"--hf-dir {hf_dir}"
    else:
        source = convert.open_source(load)
        if isinstance(source, convert.HFSource):
            raise ConfigError(f"--load {load} is a Hugging Face directory; use --hf-dir")
        found = Path(tokenizer) if tokenizer else find_tokenizer(model_tokenizer_dir(load) or load)
        what = f"--load {load}"
    cfg = source.config
    _check_model(vmap, cfg, found, what)
    new_cfg = cfg.replace(vocab_size=len(old_ids),
                          hf_extra=remap_token_ids(cfg.hf_extra, vmap, f"{what} config"))
    mapped = VocabMappedSource(source, old_ids, new_cfg)
    with atomic_output_dir(save, force) as tmp:
        if hf_dir is not None:
            convert.write_hf(mapped, new_cfg, tmp, source.dtype, max_shard_bytes)
            gen = Path(hf_dir) / "generation_config.json"
            if gen.is_file():
                g = json.loads(gen.read_text())
                (tmp / "generation_config.json").write_text(
                    json.dumps(remap_token_ids(g, vmap, "generation_config.json"), indent=2))
            _copy_tokenizer(vmap, tmp)
        else:
            ckpt = source.ckpt
            first, last = _stage_split(ckpt)
            convert.write_megatron(
                mapped, new_cfg, tmp, tp=ckpt.tp, pp=ckpt.pp, impl=ckpt.impl, dtype=source.dtype,
                divisible_by=ckpt.divisible_by, ckpt_format=ckpt.format, first=first, last=last,
                iteration=ckpt.iteration, args_base=ckpt.args)
            _copy_tokenizer(vmap, tmp / "tokenizer")
        shutil.copy2(vmap.path, tmp / FILE_NAME)
    log.debug("vocabulary %d -> %d tokens; %s", cfg.vocab_size, new_cfg.vocab_size,
             "embedding and output layer" if not cfg.tie_embeddings else "tied embedding")
    return new_cfg
