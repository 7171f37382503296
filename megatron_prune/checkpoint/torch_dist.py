"""megatron-core distributed checkpoints (`--ckpt-format torch_dist`), written and read modelless.

What megatron-core 0.16.1 (`dist_checkpointing.save` with the `torch_dist` backend) leaves in
`DIR/iter_0000001/`, and what this module writes:

    metadata.json    {"sharded_backend": "torch_dist", ...}: marks a distributed checkpoint
    common.pt        torch.save of the non-sharded items: args, checkpoint_version, iteration,
                     content_metadata (what Megatron-LM's save puts there for a model-only state)
    .metadata        torch.distributed.checkpoint (DCP) Metadata: per key its global shape, dtype
                     and stored chunks, and where each chunk lies in the data files
    __0_0.distcp     the chunks, one torch.save record each

The keys and global shapes are those of `GPTModel.sharded_state_dict()`: one *global* tensor per
parameter kind, layers stacked on a prepended axis
(`decoder.layers.self_attention.linear_qkv.weight` is [num_layers, qkv_rows, hidden]), full (unsharded) along the TP split, embeddings/output padded
to the vocab multiple of the TP the args name (`allow_shape_mismatch`: mcore re-pads on load).
Loading at any TP/PP reads the overlap of each rank's shard with the stored chunks, which is why
the format reshards on load. Facts that shape this module (checked against mcore 0.16.1):

  * The local spec maps its norms onto the TE names in the sharded state dict
    (`input_layernorm` -> `self_attention.linear_qkv.layer_norm_weight`), so tensor keys are the
    same for both specs; only the `_extra_state` objects differ.
  * SwiGLU `linear_fc1` goes through a ShardedTensorFactory that stores gate and up as two chunks of
    one global [layers, 2*ffn, hidden] tensor (`[gate; up]`, the unsharded layout).
  * `_extra_state` entries are ShardedObjects, stored as DCP byte items under
    `{key}/shard_{layer}_{num_layers}`; GPTModel drops `output_layer._extra_state`.
  * Tied embeddings: the output layer is saved as a replica of the embedding key, i.e. not at all.

We write each parameter of each layer as one chunk (linear_fc1 as two), i.e. exactly what a TP=1
GPTModel saves; mcore's files from another TP hold smaller chunks, and both read the same.

Writing streams: the DCP plan is built from metadata-only ShardedTensors, and a chunk is produced
from the source only when the writer reaches it and dropped once written, so memory holds one
parameter group (the largest: the padded embedding) at a time. megatron-core's own
`dist_checkpointing.save` needs every tensor in memory first (and a process group). Reading
(`torch_dist_read.DistCheckpoint`) asks DCP for just the region of one layer of one key. Both run
in one process with no process group (`torch.distributed.checkpoint` with `no_dist=True`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import re
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future
from tqdm.auto import tqdm

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.checkpoint.megatron_dirs import CHECKPOINT_VERSION, TRACKER, iter_dir_name

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing import ShardedTensor


@functools.lru_cache(maxsize=None)
def _mcore() -> types.SimpleNamespace:
    """megatron-core's dist_checkpointing pieces, imported when a torch_dist checkpoint is first
    met: the import is slow and loads megatron-core whole, which the checkpoint layer otherwise
    never needs (a legacy or HF conversion runs without it)."""
    log = logging.getLogger("megatron")
    level = log.level
    log.setLevel(logging.WARNING)  # its import announces which FSDP/TE fallbacks it uses
    try:
        with quiet_megatron_import():
            from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
            from megatron.core.dist_checkpointing.core import (CheckpointingConfig,
                                                               maybe_load_config, save_config)
    finally:
        log.setLevel(level)
    return types.SimpleNamespace(ShardedObject=ShardedObject, ShardedTensor=ShardedTensor,
                                 CheckpointingConfig=CheckpointingConfig,
                                 maybe_load_config=maybe_load_config, save_config=save_config)


BACKEND, BACKEND_VERSION = "torch_dist", 1
COMMON_FILE = "common.pt"
# What Megatron-LM's save stores as `content_metadata` (it selects how sharded_state_dict() is
# built on load). `singleton_local_shards=True` would give per-layer keys; we never write that.
CONTENT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable",
                    "singleton_local_shards": False, "chained_optim_avoid_prefix": True}

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@contextlib.contextmanager
def _single_process():
    """DCP used deliberately without a process group (`no_dist=True`): silence its reminder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# ---------------------------------------------------------------------------- keys and shapes
def sharded_key(spec: layout.ParamSpec, impl: str = layout.TE) -> str:
    """The dist-checkpoint key of a parameter: its TE-spec name with the layer index removed.

    Both layer specs save under the TE names (the local spec maps its norm names onto them).
    `impl` only matters for reading checkpoints of old mcore versions that did not map them.
    """
    return _LAYER.sub("decoder.layers.", spec.name(impl, 0))


def megatron_shape(spec: layout.ParamSpec, cfg: ModelConfig, padded_vocab: int) -> tuple:
    """Shape of the full (TP=1) Megatron tensor of one parameter (one layer)."""
    parts = [torch.empty(layout.hf_shape(spec, j, cfg), device="meta") for j in range(len(spec.hf))]
    shape = list(layout.fuse(spec, parts, cfg, 1).shape)
    if spec.vocab:
        shape[0] = padded_vocab
    return tuple(shape)


def _glu_chunks(spec: layout.ParamSpec) -> int:
    # mcore's apply_swiglu_sharded_factory stores linear_fc1 as two chunks along dim 0.
    return 2 if spec is layout.FC1 else 1


def sharded_tensors(cfg: ModelConfig, dtype: torch.dtype, padded_vocab: int) -> list:
    """[(ShardedTensor without data, spec, layer, chunk index)] in GPTModel's layout at TP=1."""
    out = []
    for spec, layer in layout.iter_hf_entries(cfg):
        shape = megatron_shape(spec, cfg, padded_vocab)
        n = _glu_chunks(spec)
        local = (shape[0] // n,) + shape[1:]
        meta = torch.empty(local, dtype=dtype, device="meta")
        for k in range(n):
            # linear_fc1: chunk k of n along the rows (the axis after the stacked layer axis)
            glu = [(1 if spec.per_layer else 0, k, n)] if n > 1 else []
            if spec.per_layer:
                sh = _mcore().ShardedTensor.from_rank_offsets(sharded_key(spec), meta,
                                                     (0, layer, cfg.num_layers), *glu,
                                                     prepend_axis_num=1)
            else:
                sh = _mcore().ShardedTensor.from_rank_offsets(sharded_key(spec), meta, *glu,
                                                     allow_shape_mismatch=spec.vocab)
            out.append((sh.without_data(), spec, layer, k))
    return out


def extra_state_keys(impl: str, num_layers: int) -> list:
    """[(key, global_shape, global_offset)] of the `_extra_state` ShardedObjects a model asks for.

    Per layer: the modules `layout.extra_state_names` lists for the spec; GPTModel drops
    `output_layer._extra_state`. Plus `decoder.final_layernorm._extra_state`: wherever Transformer
    Engine is installed, mcore builds the final norm as TENorm *for either spec*, and TE >= 2 makes
    RMSNorm from fusible ops, which carry extra state. A model asking for an object the checkpoint
    lacks fails to load, while an object no module asks for is ignored (Megatron-LM's default
    `--dist-ckpt-strictness assume_ok_unexpected`), so the set errs on the side of more: it also
    keeps TE's `core_attention`, which mcore 0.16.1 no longer asks for but older versions did.
    """
    out = []
    for name in layout.extra_state_names(impl, 0, [(0, num_layers)]):
        m = _LAYER.match(name)
        if m:
            out.append((_LAYER.sub("decoder.layers.", name), (num_layers,), (int(m.group(1)),)))
    out.append(("decoder.final_layernorm._extra_state", (1,), (0,)))
    return out


def _padded_vocab(cfg: ModelConfig, args: argparse.Namespace) -> int:
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    div = int(getattr(args, "make_vocab_size_divisible_by", 128) or 128)
    padded = cfg.padded_vocab_size(tp, div)
    stored = getattr(args, "padded_vocab_size", None)
    if stored is not None and int(stored) != padded:
        raise ConfigError(f"args.padded_vocab_size={stored} but vocab {cfg.vocab_size} padded to "
                          f"{div} x TP={tp} is {padded}")
    return padded


# ---------------------------------------------------------------------------- writing
def _chunk(sh: "ShardedTensor") -> ChunkStorageMetadata:
    sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return ChunkStorageMetadata(offsets=torch.Size(sh.global_offset), sizes=torch.Size(sizes))


def _tensor_write_item(sh: "ShardedTensor") -> WriteItem:
    chunk = _chunk(sh)
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=sh.dtype),
                           size=torch.Size(sh.global_shape))
    return WriteItem(index=MetadataIndex(sh.key, chunk.offsets), type=WriteItemType.SHARD,
                     tensor_data=data)


def _none_object_bytes() -> io.BytesIO:
    # mcore serialises the ShardedObjects of one key as torch.save([data, ...]); ours are None.
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf


class _StreamingSavePlanner(DefaultSavePlanner):
    """A DCP save planner over a fixed item list whose data is produced on demand
    (`_StreamingWriter` asks for one item at a time)."""

    def __init__(self, items: list, produce: Callable[[WriteItem], object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._produce = produce

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._produce(write_item)


class _StreamingWriter(dcp.FileSystemWriter):
    """DCP's file writer, one file, each item resolved, written and dropped in plan order.

    (DCP's own loop keeps the last tensor of every key referenced until its file is closed, for
    its safetensors mode: with stacked keys that is a second copy of the embeddings and one layer.
    The record format is DCP's own `_write_item`, as in megatron-core's writer.)
    """

    def write_data(self, plan: SavePlan, planner) -> Future:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                if torch.is_tensor(data):
                    data = data.detach().cpu()
                    if data.untyped_storage().nbytes() != data.nbytes:
                        data = data.clone()  # torch.save would store the whole base
                results.append(_write_item(self.transforms, stream, data, item, file_name,
                                           self.serialization_format))
                del data
            if self.sync_files:
                os.fsync(stream.fileno())
        done: Future = Future()
        done.set_result(results)
        return done


def write_dist(source, cfg: ModelConfig, out: Path, *, args: argparse.Namespace,
               dtype: torch.dtype, impl: str, iteration=1) -> None:
    """Write `source` as a megatron-core torch_dist checkpoint into the (empty) directory `out`.

    `out/iter_{iteration:07d}/` (or `release/`), then `out/latest_checkpointed_iteration.txt` last.
    `args` (model and parallel fields as `ModelConfig.to_megatron_args` makes them; TP only decides
    the vocab padding) goes to common.pt as a copy marked `no_save_optim`/`no_save_rng`: Megatron-LM
    then builds no optimizer/RNG entries to look up and skips the RNG state. It still needs
    `--no-load-optim` (or `--finetune`) to start an optimizer, as for any model-only checkpoint.
    """
    if impl not in layout.IMPLS:
        raise ConfigError(f"unknown transformer implementation {impl!r}")
    out = Path(out)
    it_dir = out / iter_dir_name(iteration)
    it_dir.mkdir(parents=True, exist_ok=True)
    padded = _padded_vocab(cfg, args)

    tensors = sharded_tensors(cfg, dtype, padded)
    objects = extra_state_keys(impl, cfg.num_layers)
    items, what = [], {}
    for key, shape, offset in objects:
        uid = _mcore().ShardedObject(key, None, shape, offset, replica_id=0).unique_key
        items.append(WriteItem(index=MetadataIndex(uid), type=WriteItemType.BYTE_IO))
    for sh, spec, layer, k in tensors:
        item = _tensor_write_item(sh)
        items.append(item)
        what[(sh.key, tuple(item.index.offset))] = (spec, layer, k, _glu_chunks(spec))

    cache = {"key": None, "tensor": None}
    bar = tqdm(total=len(tensors), desc="tensors", unit="chunk")

    def produce(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return _none_object_bytes()
        spec, layer, k, n = what[(item.index.fqn, tuple(item.index.offset))]
        if cache["key"] != (spec.key, layer):
            cache["tensor"] = None  # free the previous group first
            full = full_megatron_tensor(source, spec, layer, cfg, args)
            cache.update(key=(spec.key, layer), tensor=full.to(dtype))
        full = cache["tensor"]
        part = full.chunk(n, dim=0)[k] if n > 1 else full
        if spec.per_layer:
            part = part.unsqueeze(0)
        want = tuple(item.tensor_data.chunk.sizes)
        if tuple(part.shape) != want:
            raise ConfigError(f"{item.index.fqn}: produced {tuple(part.shape)}, planned {want}")
        bar.update(1)
        return part.contiguous()

    writer = _StreamingWriter(str(it_dir))
    try:
        with _single_process():
            dcp.save({}, storage_writer=writer, planner=_StreamingSavePlanner(items, produce),
                     no_dist=True)
    finally:
        bar.close()
        cache.clear()

    stored = argparse.Namespace(**vars(args))
    stored.ckpt_format = BACKEND
    stored.no_save_optim = True
    stored.no_save_rng = True
    common = {"args": stored, "checkpoint_version": CHECKPOINT_VERSION,
              "iteration": 0 if iteration == "release" else int(iteration),
              "content_metadata": dict(CONTENT_METADATA)}
    torch.save(common, it_dir / COMMON_FILE)
    _mcore().save_config(_mcore().CheckpointingConfig(BACKEND, BACKEND_VERSION), str(it_dir))  # marks it complete
    (out / TRACKER).write_text(str(iteration))


def full_megatron_tensor(source, spec: layout.ParamSpec, layer: Optional[int], cfg: ModelConfig,
                         args: argparse.Namespace) -> torch.Tensor:
    """The unsharded Megatron tensor of one parameter (vocab padded as at the args' TP)."""
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    div = int(getattr(args, "make_vocab_size_divisible_by", 128) or 128)
    # One shard at TP=1, with the vocab padded to the multiple that TP=tp pads to.
    return layout.shard_from_hf(spec, source.get, source.shape, cfg, 1, 0, layer, div * tp)


__all__ = ["write_dist", "sharded_tensors",
           "extra_state_keys", "sharded_key", "CONTENT_METADATA"]
