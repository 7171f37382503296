"""Reading megatron-core `torch_dist` checkpoints modelless, one region of one tensor at a time.

`DistCheckpoint` serves the same reads as `LegacyCheckpoint`: the args in `common.pt` (read with
weights_only=True), the DCP `.metadata` (read by `safe_pickle`, never a plain pickle.load), and
each parameter's region of the stored global tensor (DCP asked for just that region, in one
process with no process group). The format itself is described in `torch_dist.py`.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, StorageMeta,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.checkpoint.megatron_dirs import iter_dir_name, read_tracker
from megatron_prune.checkpoint.safe_pickle import load_dcp_metadata
from megatron_prune.checkpoint.tensor_io import CheckpointReadError, torch_load
from megatron_prune.checkpoint.torch_dist import (BACKEND, COMMON_FILE, _mcore, _single_process,
                                                  megatron_shape, sharded_key)


class _CachedReader(dcp.FileSystemReader):
    """FileSystemReader that unpickles `.metadata` once, with only the classes DCP metadata is
    made of (torch's own reader `pickle.load`s it: a hostile file would run code)."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            metadata = load_dcp_metadata(Path(self.path) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads regions of stored global tensors into given buffers: {key: (offsets, buffer)}."""

    def __init__(self, requests: dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, buf) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                      [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        buf = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, start, length)
        return buf

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def _cause(e: BaseException) -> str:
    """The first failure inside a DCP CheckpointException (whose own text carries every rank's
    traceback), as one line."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def _load_common(path: Path) -> dict:
    """common.pt with weights_only=True, allowing the types Megatron-LM's args hold."""
    common = torch_load(path, mmap_=False)
    if not isinstance(common, dict):
        raise CheckpointReadError(f"{path}: not a dict")
    return common


class DistCheckpoint:
    """A megatron-core torch_dist checkpoint, read one parameter (one layer) at a time."""

    format = BACKEND

    def __init__(self, root):
        self.root = Path(root)
        self.iteration = read_tracker(self.root)
        self.dir = self.root / iter_dir_name(self.iteration)
        config = _mcore().maybe_load_config(str(self.dir)) if self.dir.is_dir() else None
        if config is None:
            raise CheckpointReadError(f"{self.dir}: no metadata.json; not a distributed checkpoint")
        if config.sharded_backend != BACKEND:
            raise CheckpointReadError(f"{self.dir}: unsupported distributed checkpoint backend "
                                      f"{config.sharded_backend!r}")
        common = _load_common(self.dir / COMMON_FILE)
        if "args" not in common:
            raise CheckpointReadError(f"{self.dir / COMMON_FILE}: no 'args' entry")
        self.common = {k: v for k, v in common.items() if k != "args"}
        self.args: argparse.Namespace = common["args"]
        self.config = ModelConfig.from_megatron_args(self.args)
        content = common.get("content_metadata") or {}
        if content.get("singleton_local_shards"):
            raise CheckpointReadError(f"{self.dir}: saved with singleton_local_shards=True "
                                      "(per-layer keys), which this reader does not support")
        impl = getattr(self.args, "transformer_impl", layout.TE)
        self.impl = impl if impl in layout.IMPLS else layout.TE
        self.tp = int(getattr(self.args, "tensor_model_parallel_size", 1) or 1)
        self.pp = int(getattr(self.args, "pipeline_model_parallel_size", 1) or 1)
        self.divisible_by = int(getattr(self.args, "make_vocab_size_divisible_by", 128) or 128)
        # the stage split of the run that saved it (the format itself is split-free)
        self.stage_counts = layout.stage_layer_counts(
            self.config.num_layers, self.pp, getattr(self.args, "decoder_first_pipeline_num_layers", None),
            getattr(self.args, "decoder_last_pipeline_num_layers", None))
        self.ranges = layout.stage_ranges(self.stage_counts)
        try:
            self._reader = _CachedReader(str(self.dir))
            self.metadata = self._reader.read_metadata()
        except CheckpointReadError:
            raise
        except (OSError, EOFError, ValueError) as e:
            raise CheckpointReadError(f"{self.dir}: unreadable .metadata ({e})") from e
        self._keys = {}
        for spec, layer in layout.iter_hf_entries(self.config):
            if spec.key not in self._keys:
                self._keys[spec.key] = self._find_key(spec)
        self.dtype = self.metadata.state_dict_metadata[self._keys["embedding"]].properties.dtype

    def _find_key(self, spec) -> str:
        """The stored key of a parameter (TE names; the local names of old mcore as fallback)."""
        md = self.metadata.state_dict_metadata
        candidates = dict.fromkeys(sharded_key(spec, impl) for impl in (layout.TE, layout.LOCAL))
        for key in candidates:
            if key in md:
                if not isinstance(md[key], TensorStorageMetadata):
                    raise CheckpointReadError(f"{self.dir}: {key} is not a tensor")
                self._check_shape(spec, key, tuple(md[key].size))
                return key
        raise CheckpointReadError(f"{self.dir}: missing tensor {' or '.join(candidates)}")

    def _check_shape(self, spec, key, shape) -> None:
        want = megatron_shape(spec, self.config, 0)
        if spec.per_layer:
            want = (self.config.num_layers,) + want
        ok = len(shape) == len(want) and all(
            s == w or (spec.vocab and i == 0 and s >= self.config.vocab_size)
            for i, (s, w) in enumerate(zip(shape, want)))
        if not ok:
            need = (f"(>= {self.config.vocab_size}, {', '.join(map(str, want[1:]))})"
                    if spec.vocab else str(want))
            raise CheckpointReadError(
                f"{self.dir}: {key} has global shape {shape}, the model in its args needs {need}")

    def read_global(self, key: str, offsets: tuple, shape: tuple) -> torch.Tensor:
        """The region [offsets, offsets + shape) of one stored global tensor."""
        md = self.metadata.state_dict_metadata[key]
        buf = torch.empty(shape, dtype=md.properties.dtype)
        try:
            with _single_process():
                dcp.load({}, storage_reader=self._reader,
                         planner=_RegionLoadPlanner({key: (offsets, buf)}), no_dist=True)
        except (CheckpointException, RuntimeError, EOFError, OSError, ValueError,
                pickle.UnpicklingError) as e:
            raise CheckpointReadError(
                f"{self.dir}: cannot read {key}, truncated or corrupt? ({_cause(e)})") from e
        return buf

    def read_megatron(self, spec, layer) -> torch.Tensor:
        """The unsharded Megatron tensor of one parameter (of the real vocab rows only)."""
        key = self._keys[spec.key]
        size = tuple(self.metadata.state_dict_metadata[key].size)
        if spec.per_layer:
            return self.read_global(key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]
        if spec.vocab:  # skip the padding rows
            size = (self.config.vocab_size,) + size[1:]
        return self.read_global(key, (0,) * len(size), size)

    def read_hf_group(self, spec, layer) -> dict:
        """{hf_name: full tensor} of one parameter, read from the chunks that hold it."""
        return layout.merge_to_hf(spec, [self.read_megatron(spec, layer)], self.config, layer)
