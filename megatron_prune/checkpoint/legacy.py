"""Megatron-LM's legacy checkpoints (`--ckpt-format torch`): one torch.save file per rank.

Legacy layout (what `pretrain_gpt.py --ckpt-format torch` reads and writes):

    DIR/latest_checkpointed_iteration.txt          -> "1" (or "release")
    DIR/iter_0000001/mp_rank_{tp:02d}/model_optim_rng.pt            (PP = 1)
    DIR/iter_0000001/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   (PP > 1)

each a torch.save dict {args, checkpoint_version: 3.0, iteration, model: state dict}.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.checkpoint.megatron_dirs import (CHECKPOINT_VERSION, TRACKER, iter_dir_name,
                                                     rank_dir_name, read_tracker)
from megatron_prune.checkpoint.tensor_io import (CheckpointReadError, TorchFileReader,
                                                 save_streamed, torch_load)

_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


class LegacyCheckpoint:
    """A legacy Megatron checkpoint, read rank file by rank file."""

    def __init__(self, root):
        self.root = Path(root)
        self.iteration = read_tracker(self.root)
        self.dir = self.root / iter_dir_name(self.iteration)
        ranks = {}
        for d in self.dir.iterdir() if self.dir.is_dir() else []:
            m = _RANK_RE.match(d.name)
            if m:
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = d / "model_optim_rng.pt"
        if not ranks:
            raise CheckpointReadError(f"{self.dir}: no mp_rank_* directories")
        first_file = ranks.get((0, 0))
        if first_file is None or not first_file.is_file():
            raise CheckpointReadError(f"{self.dir}: missing rank file of TP rank 0, PP rank 0")
        first = torch_load(first_file)
        if "model" not in first or "args" not in first:
            raise CheckpointReadError(f"{first_file}: no 'model'/'args' entries")
        self.args: argparse.Namespace = first["args"]
        # The sizes come from the args, so a missing last rank is reported, not mistaken for
        # a smaller TP.
        self.tp = getattr(self.args, "tensor_model_parallel_size", None) or max(t for t, _ in ranks) + 1
        self.pp = getattr(self.args, "pipeline_model_parallel_size", None) or max(p for _, p in ranks) + 1
        for t in range(self.tp):
            for p in range(self.pp):
                if (t, p) not in ranks or not ranks[(t, p)].is_file():
                    raise CheckpointReadError(
                        f"{self.dir}: missing rank file {rank_dir_name(t, p, self.pp)}/model_optim_rng.pt")
        extra = sorted(k for k in ranks if k[0] >= self.tp or k[1] >= self.pp)
        if extra:
            raise CheckpointReadError(
                f"{self.dir}: rank directories {extra} beyond TP={self.tp} PP={self.pp} of the args")
        self.files = ranks
        self.config = ModelConfig.from_megatron_args(self.args)
        self.impl = layout.detect_impl(first["model"].keys())
        self.dtype = next(v.dtype for v in first["model"].values() if torch.is_tensor(v))
        self.divisible_by = getattr(self.args, "make_vocab_size_divisible_by", 128)
        del first
        counts = [layout.count_layers(self.open(0, p).keys()) for p in range(self.pp)]
        if sum(counts) != self.config.num_layers:
            raise CheckpointReadError(
                f"{self.root}: rank files hold {sum(counts)} layers, args say {self.config.num_layers}")
        self.stage_counts = counts
        self.ranges = layout.stage_ranges(counts)

    format = "torch"

    def open(self, tp_rank: int, pp_rank: int) -> TorchFileReader:
        return TorchFileReader(self.files[(tp_rank, pp_rank)], key="model")

    def _stage_readers(self, pp_rank: int) -> list:
        # One stage's rank files stay open (memory-mapped, pages released after each read).
        if getattr(self, "_open_stage", None) != pp_rank:
            self._readers = None
            self._readers = [self.open(t, pp_rank) for t in range(self.tp)]
            self._open_stage = pp_rank
        return self._readers

    def _locate(self, spec, layer):
        if spec is layout.EMBEDDING:
            stage, name = 0, spec.name(self.impl)
        elif not spec.per_layer:
            stage, name = self.pp - 1, spec.name(self.impl)
        else:
            stage = self.stage_of_layer(layer)
            name = spec.name(self.impl, layer - self.ranges[stage][0])
        readers = self._stage_readers(stage)
        if name not in readers[0].state:
            raise CheckpointReadError(f"{self.files[(0, stage)]}: missing tensor {name}")
        return readers, name

    def read_stored(self, spec, layer, ranks) -> dict:
        """{rank: that rank's stored (fused) shard} for the given TP ranks, as views of the
        mapped rank files: nothing is copied until the caller copies what it needs, and the
        caller releases the pages (`tensor_io.release_pages`) when it is done."""
        readers, name = self._locate(spec, layer)
        return {r: readers[r].raw(name) for r in ranks}

    def stage_of_layer(self, layer: int) -> int:
        for p, (s, e) in enumerate(self.ranges):
            if s <= layer < e:
                return p
        raise IndexError(layer)


def write_rank_file(path: Path, args: argparse.Namespace, state: dict, iteration,
                    extra: Optional[dict] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
           "iteration": 0 if iteration == "release" else int(iteration), "model": state}
    if extra:
        obj.update(extra)
    crc = torch.serialization.get_crc32_options()
    # CRC32 over every byte costs more than the write itself; torch.load does not check it.
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(crc)


def write_legacy(out: Path, args: argparse.Namespace, tp: int, pp: int, iteration,
                 make_plans: Callable[[int, int], tuple], progress=None) -> None:
    """Write every rank file tensor by tensor (`tensor_io.save_streamed`: at most about two
    tensors in memory), then the tracker file last. `make_plans(tp_rank, pp_rank)` gives the
    file's [(name, make)] (make None: the entry is None) and [(name, meta tensor)]."""
    it_dir = out / iter_dir_name(iteration)
    head = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0 if iteration == "release" else int(iteration)}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            plan, shapes = make_plans(tp_rank, pp_rank)
            makers = dict(plan)
            save_streamed(it_dir / rank_dir_name(tp_rank, pp_rank, pp) / "model_optim_rng.pt",
                          head, "model", shapes, lambda name: makers[name]())
            if progress is not None:
                progress.update(1)
    (out / TRACKER).write_text(str(iteration))


