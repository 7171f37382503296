"""HF <-> Megatron conversion and offline resharding: short loops over the layout table.

Every checkpoint is read through a *source* that serves HF-named tensors (or row/column ranges of
them): an HF directory directly, a Megatron checkpoint by merging its TP shards. Every writer
consumes a source. So hf-to-megatron, reshard and megatron-to-hf are the same two writers fed by
different sources, and pruning plugs in as one more source.
"""
from __future__ import annotations

import argparse
import collections
import functools
import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import DTYPES, ConfigError, ModelConfig
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.checkpoint.hf import (HFCheckpoint, copy_tokenizer, keep_tokenizer,
                                          model_tokenizer_dir, write_hf_checkpoint)
from megatron_prune.checkpoint.legacy import write_legacy
from megatron_prune.checkpoint.megatron import open_megatron
from megatron_prune.checkpoint.megatron_dirs import check_megatron_input
from megatron_prune.checkpoint.tensor_io import CheckpointReadError, release_pages

log = logging.getLogger(__name__)


class MegatronSource:
    """HF-named tensors of a Megatron checkpoint, merged from its TP shards on demand.

    Legacy rank files are read as views of their memory maps: a split parameter's rows or
    columns are copied once, straight from the mapped file into what the writer needs (a
    torch.cat across ranks, or the fused tensor's rows). A parameter's pages are released when
    the next one is read, or, where a view of them was handed out (one input rank covers the
    request), a few parameters later, once the writer thread can no longer be writing from it:
    pages touched after their release would stay resident."""

    _HELD = 4  # lent parameters whose pages stay mapped: more than the writer can have queued

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.config: ModelConfig = ckpt.config
        self.dtype = ckpt.dtype
        self._where = {}
        for spec, layer in layout.iter_hf_entries(self.config):
            for j, n in enumerate(spec.hf_names(layer)):
                self._where[n] = (spec, layer, j)
        self._group_key, self._group = None, None
        self._mapped = hasattr(ckpt, "read_stored")  # legacy rank files (torch_dist: not)
        # one parameter's stored shards and their unfused pieces, by input rank
        self._stored_key, self._stored, self._pieces = None, {}, {}
        self._lent = False  # a view of the current parameter's pages was handed out
        self._held: collections.deque = collections.deque()  # (release at switch n, pages)
        self._switches = 0
        self._blocks: dict = {}

    def keys(self):
        return list(self._where)

    def shape(self, name) -> tuple:
        spec, _, j = self._where[name]
        return layout.hf_shape(spec, j, self.config)

    def group(self, spec, layer) -> dict:
        """{hf_name: tensor} of one parameter; the last one is cached (readers ask per name).
        Legacy shards are merged straight from their mapped views (one copy, in the merge)."""
        if self._group_key != (spec.key, layer):
            self._group = None  # free the previous group before merging the next
            if self._mapped:
                stored = self._load(spec, layer, range(self.ckpt.tp))
                self._group = layout.merge_to_hf(spec, [stored[r] for r in range(self.ckpt.tp)],
                                                 self.config, layer)
            else:
                self._group = self.ckpt.read_hf_group(spec, layer)
            self._group_key = (spec.key, layer)
        return self._group

    def _load(self, spec, layer, ranks) -> dict:
        """The stored shards of one parameter from the given input ranks (views of the mapped
        rank files, cached until another parameter is asked for, when the previous one's pages
        are released: at once, or `_HELD` parameters later if a view of them was lent)."""
        if self._stored_key != (spec.key, layer):
            self._switches += 1
            if self._lent:
                self._held.append((self._switches + self._HELD, list(self._stored.values())))
            else:
                for t in self._stored.values():
                    release_pages(t)
            while self._held and self._held[0][0] <= self._switches:
                for t in self._held.popleft()[1]:
                    release_pages(t)
            self._stored, self._pieces, self._stored_key = {}, {}, (spec.key, layer)
            self._lent = False
        missing = tuple(r for r in ranks if r not in self._stored)
        if missing:
            self._stored.update(self.ckpt.read_stored(spec, layer, missing))
        return self._stored

    def _cover(self, name, dim: int, start: int, end: Optional[int]) -> list:
        """[(rank, lo, hi)] of [start, end) of `name` along its split dim `dim`, with those
        ranks' stored shards mapped (only theirs)."""
        spec, layer, _ = self._where[name]
        cover = layout.ranks_covering(spec, self.shape(name)[dim], self.ckpt.tp, self.config,
                                      self.ckpt.divisible_by, start, end)
        self._load(spec, layer, [r for r, _, _ in cover])
        return cover

    def _covering(self, name, dim: int, start: int, end: Optional[int]) -> list:
        """Views of [start, end) of `name` along its split dim, one per input rank that holds
        part of it, in order."""
        spec, _, j = self._where[name]
        out = []
        for r, lo, hi in self._cover(name, dim, start, end):
            if r not in self._pieces:
                self._pieces[r] = layout.unfuse(spec, self._stored[r], self.config, self.ckpt.tp)
            out.append(self._pieces[r][j].narrow(dim, lo, hi - lo))
        return out

    def get(self, name, dim=None, start=0, end=None) -> torch.Tensor:
        spec, layer, _ = self._where[name]
        if dim is None or dim != spec.split_dim or not self._mapped:
            t = self.group(spec, layer)[name]
            end = t.shape[dim or 0] if end is None else end
            return t if dim is None else t.narrow(dim, start, end - start)
        parts = self._covering(name, dim, start, end)
        if len(parts) > 1:
            return torch.cat(parts, dim)
        # one rank covers it (a balanced prune, TP unchanged): a view, copied once by whoever
        # selects or fuses it next (or by the writer thread), not here as well
        self._lent = True
        return parts[0]

    def dtype_of(self, name) -> torch.dtype:
        return self.dtype

    def _stored_blocks(self, spec, layer) -> list:
        """`layout.fused_row_blocks` of one input rank's stored shard: where each part's rows
        sit in it (one run per part for unfused parameters)."""
        spans = [layout.chunk_range(spec, layout.hf_shape(spec, j, self.config)[0],
                                    self.ckpt.tp, 0, self.config, self.ckpt.divisible_by)
                 for j, _ in enumerate(spec.hf_names(layer))]
        return _row_blocks(self._blocks, spec, tuple(e - s for s, e in spans), self.config,
                           self.ckpt.tp)

    def read_rows_into(self, name, start: int, end: int, out: torch.Tensor) -> None:
        """Rows [start, end) of `name` copied from the input ranks' mapped shards straight into
        `out` (reshard fills fused QKV and gate/up this way: each run of rows is copied once,
        with no unfused pieces and no torch.cat in between)."""
        spec, layer, j = self._where[name]
        if spec.split_dim != 0 or not self._mapped:
            out.copy_(self.get(name, 0, start, end))
            return
        pos = 0
        for r, lo, hi in self._cover(name, 0, start, end):
            stored = self._stored[r]
            for part, row, at, n in self._stored_blocks(spec, layer):
                a, b = max(lo, row), min(hi, row + n)
                if part == j and a < b:
                    out[pos + a - lo:pos + b - lo].copy_(stored[at + a - row:at + b - row])
            pos += hi - lo


class HFSource:
    """An HF checkpoint as a source (reads ranges straight from safetensors)."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self.config = ckpt.config
        names = [n for spec, layer in layout.iter_hf_entries(self.config) for n in spec.hf_names(layer)]
        ckpt.check_complete(names)
        self.dtype = ckpt.dtype(names[0])
        self._check_shapes(names)

    def _check_shapes(self, names):
        where = {n: (spec, layer, j) for spec, layer in layout.iter_hf_entries(self.config)
                 for j, n in enumerate(spec.hf_names(layer))}
        for n in names:
            spec, _, j = where[n]
            want = layout.hf_shape(spec, j, self.config)
            if tuple(self.ckpt.shape(n)) != tuple(want):
                raise CheckpointReadError(f"{n}: shape {self.ckpt.shape(n)} does not match config {want}")

    def keys(self):
        return self.ckpt.keys()

    def shape(self, name):
        return self.ckpt.shape(name)

    def get(self, name, dim=None, start=0, end=None):
        return self.ckpt.get(name, dim, start, end)

    def group(self, spec, layer) -> dict:
        return {n: self.ckpt.get(n) for n in spec.hf_names(layer)}

    def dtype_of(self, name) -> torch.dtype:
        return self.ckpt.dtype(name)

    def read_rows_into(self, name, start: int, end: int, out: torch.Tensor) -> None:
        self.ckpt.read_rows_into(name, start, end, out)


def open_source(path):
    """An HF directory (has config.json) or a Megatron checkpoint (has the tracker file)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return HFSource(HFCheckpoint(path))
    check_megatron_input(path)
    return MegatronSource(open_megatron(path))


# ---------------------------------------------------------------------------- writers
def _owned(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes (torch.save of a view would store the whole base)."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class _Shapes:
    """A source seen through meta tensors: the same layout code, run on it, plans a rank
    file's shapes and dtypes without reading a byte."""

    def __init__(self, source):
        self.source = source

    def shape(self, name) -> tuple:
        return self.source.shape(name)

    def get(self, name, dim=None, start=0, end=None) -> torch.Tensor:
        shape = list(self.source.shape(name))
        if dim is not None:
            shape[dim] = (shape[dim] if end is None else end) - start
        return torch.empty(shape, dtype=self.source.dtype, device="meta")


def _row_blocks(cache: dict, spec, rows: tuple, cfg: ModelConfig, tp: int) -> list:
    """`layout.fused_row_blocks` of a shard whose parts have `rows` rows, worked out once per
    parameter kind and size (every layer has the same runs)."""
    if (spec.key, rows) not in cache:
        cache[spec.key, rows] = layout.fused_row_blocks(spec, rows, cfg, tp)
    return cache[spec.key, rows]


def _read_fused(source, spec, cfg: ModelConfig, tp: int, tp_rank: int, layer,
                divisible_by: int, blocks: dict) -> Optional[torch.Tensor]:
    """Rank's shard of a fused row-split parameter (QKV, gate/up) with each run of rows read
    straight into it (`layout.fused_row_blocks`), instead of reading the parts and copying them
    into one with torch.cat; None where the source cannot (not an HF directory) or the
    parameter is not such a fusion. `blocks` caches the runs (every layer has the same)."""
    names = spec.hf_names(layer)
    if not hasattr(source, "read_rows_into") or spec.split_dim != 0 or spec.vocab or \
            len(names) < 2:
        return None
    spans = [layout.chunk_range(spec, source.shape(n)[0], tp, tp_rank, cfg, divisible_by)
             for n in names]
    cols = {tuple(source.shape(n)[1:]) for n in names}
    dtypes = {source.dtype_of(n) for n in names}
    if len(cols) != 1 or len(dtypes) != 1:  # torch.cat would promote: leave it to that path
        return None
    out = torch.empty((sum(e - s for s, e in spans), *cols.pop()), dtype=dtypes.pop())
    for part, row, dst, n in _row_blocks(blocks, spec, tuple(e - s for s, e in spans), cfg, tp):
        first = spans[part][0] + row
        source.read_rows_into(names[part], first, first + n, out[dst:dst + n])
    return out


def rank_plan(source, cfg: ModelConfig, impl: str, tp: int, tp_rank: int, pp_rank: int,
              ranges, dtype: torch.dtype, divisible_by: int) -> list:
    """[(name, make)] of one legacy rank file's model state, in order: make() builds the
    tensor from `source` (None for the `_extra_state` entries, which are None)."""
    blocks: dict = {}

    def make(e):
        fused = _read_fused(source, e.spec, cfg, tp, tp_rank, e.layer, divisible_by, blocks)
        if fused is None:
            fused = layout.shard_from_hf(e.spec, source.get, source.shape, cfg, tp, tp_rank,
                                         e.layer, divisible_by)
        return fused.to(dtype)

    plan = [(e.name, functools.partial(make, e))
            for e in layout.stage_entries(cfg, impl, pp_rank, ranges)]
    # what mcore's own modules save; TE accepts None as "no FP8 state"
    return plan + [(n, None) for n in layout.extra_state_names(impl, pp_rank, ranges)]


def megatron_rank_state(source, cfg: ModelConfig, impl: str, tp: int, tp_rank: int, pp_rank: int,
                        ranges, dtype: torch.dtype, divisible_by: int) -> dict:
    """The model state dict of one legacy rank file, built from any source, in memory."""
    return {n: None if make is None else _owned(make())
            for n, make in rank_plan(source, cfg, impl, tp, tp_rank, pp_rank, ranges, dtype,
                                     divisible_by)}


def write_megatron(source, cfg: ModelConfig, out: Path, *, tp: int, pp: int, impl: str,
                   dtype: torch.dtype, divisible_by: int = 128, ckpt_format: str = "torch",
                   first: Optional[int] = None, last: Optional[int] = None, iteration=1,
                   args_base: Optional[argparse.Namespace] = None) -> argparse.Namespace:
    """Write `source` as a Megatron checkpoint into the (empty, temporary) directory `out`."""
    counts = layout.stage_layer_counts(cfg.num_layers, pp, first, last)
    layout.check_parallel(cfg, tp, counts)
    ranges = layout.stage_ranges(counts)
    args = cfg.to_megatron_args(tp=tp, pp=pp, dtype=dtype, divisible_by=divisible_by,
                                transformer_impl=impl, ckpt_format=ckpt_format,
                                first_stage_layers=first, last_stage_layers=last, base=args_base)
    if ckpt_format == "torch_dist":
        from megatron_prune.checkpoint.torch_dist import write_dist
        write_dist(source, cfg, out, args=args, dtype=dtype, impl=impl, iteration=iteration)
        return args
    if ckpt_format != "torch":
        raise ConfigError(f"unknown --ckpt-format {ckpt_format!r} (torch or torch_dist)")
    def plans(t, p):  # the tensors to make, and their shapes planned through meta tensors
        real = rank_plan(source, cfg, impl, tp, t, p, ranges, dtype, divisible_by)
        meta = rank_plan(_Shapes(source), cfg, impl, tp, t, p, ranges, dtype, divisible_by)
        return real, [(n, None if make is None else make()) for n, make in meta]

    with tqdm(total=tp * pp, desc="rank files", unit="file") as bar:
        write_legacy(out, args, tp, pp, iteration, plans, progress=bar)
    return args


def write_hf(source, cfg: ModelConfig, out: Path, dtype: torch.dtype,
             max_shard_bytes: int = 5 * 2**30) -> None:
    plan = layout.hf_plan(cfg)
    if cfg.hidden_size % cfg.num_attention_heads:
        log.warning(
            "hidden_size %d is not a multiple of num_attention_heads %d: transformers >= 5 "
            "refuses such Llama configs in from_pretrained (head_dim=%d is written explicitly, "
            "and transformers 4.x loads it); megatron_prune.checkpoint.hf_model.load_hf_model loads it "
            "with any version", cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
    with tqdm(total=len(plan), desc="tensors", unit="param") as bar:
        write_hf_checkpoint(
            out, cfg, plan, lambda g: dict(source.group(layout.SPECS_BY_KEY[g[0]], g[1])),
            dtype, max_shard_bytes, progress=bar)


# ---------------------------------------------------------------------------- commands
def _dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def hf_to_megatron(hf_dir, save, *, tp=1, pp=1, impl=layout.TE, dtype=None, divisible_by=128,
                   ckpt_format="torch", first=None, last=None, force=False) -> argparse.Namespace:
    check_output(save, force)
    source = HFSource(HFCheckpoint(hf_dir))
    cfg = source.config
    layout.check_parallel(cfg, tp, layout.stage_layer_counts(cfg.num_layers, pp, first, last))
    with atomic_output_dir(save, force) as tmp:
        args = write_megatron(source, cfg, tmp, tp=tp, pp=pp, impl=impl,
                              dtype=_dtype(dtype, source.dtype), divisible_by=divisible_by,
                              ckpt_format=ckpt_format, first=first, last=last)
        keep_tokenizer(hf_dir, tmp)
    return args


def megatron_to_hf(load, save, *, tokenizer=None, dtype=None, force=False,
                   max_shard_bytes=5 * 2**30) -> ModelConfig:
    check_output(save, force)
    source = open_source(load)
    if isinstance(source, HFSource):
        raise ConfigError(f"--load {load} is a Hugging Face directory, not a Megatron checkpoint")
    cfg = source.config
    tokenizer = tokenizer or model_tokenizer_dir(load)
    with atomic_output_dir(save, force) as tmp:
        write_hf(source, cfg, tmp, _dtype(dtype, source.dtype), max_shard_bytes)
        copy_tokenizer(tokenizer, tmp)
    return cfg


def reshard(load, save, *, tp=None, pp=None, impl=None, dtype=None, divisible_by=None,
            ckpt_format=None, first=None, last=None, force=False) -> argparse.Namespace:
    check_output(save, force)
    source = open_source(load)
    if isinstance(source, HFSource):
        raise ConfigError(f"--load {load} is a Hugging Face directory; use hf-to-megatron")
    ckpt = source.ckpt
    cfg = source.config
    tp, pp = tp or ckpt.tp, pp or ckpt.pp  # change only what is asked for
    layout.check_parallel(cfg, tp, layout.stage_layer_counts(cfg.num_layers, pp, first, last))
    with atomic_output_dir(save, force) as tmp:
        args = write_megatron(
            source, cfg, tmp, tp=tp, pp=pp, impl=impl or ckpt.impl,
            dtype=_dtype(dtype, source.dtype), divisible_by=divisible_by or ckpt.divisible_by,
            ckpt_format=ckpt_format or ckpt.format, first=first, last=last,
            iteration=ckpt.iteration, args_base=ckpt.args)
        keep_tokenizer(load, tmp)
    return args
