"""Unpickling what a checkpoint may carry from a stranger: only the classes its format is made of.

A `torch_dist` checkpoint's `.metadata` is a plain pickle, and `torch.distributed.checkpoint`'s
reader `pickle.load`s it: a hostile file runs any callable it names the moment it is opened
(Megatron-LM reads it the same way). `load_dcp_metadata` unpickles it with `find_class`
restricted to the classes DCP metadata consists of; anything else is refused with the class and
the file named, before any object is built. Legacy rank files, `common.pt` and DCP's tensor
records are read by `torch.load(weights_only=True)`, which is restricted the same way by torch.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from megatron_prune.checkpoint.tensor_io import CheckpointReadError

_DCP = "torch.distributed.checkpoint"

# What torch.distributed.checkpoint's `Metadata` pickles to (torch 2.x, as DCP and megatron-core
# 0.16.1 write it; every class found in the .metadata of our writer's, megatron-core's and
# Megatron-LM's pretrain_gpt.py's checkpoints): its dataclasses, the file locations, the cached
# save plans, torch.Size, dtypes by name, the two helpers TensorProperties is rebuilt through
# (layouts by name, memory formats as an enum), and the saved-to path. All are plain data; none
# reads, writes or runs anything.
DCP_METADATA_GLOBALS = frozenset(
    {(f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    # megatron-core 0.16.1 keeps its cached save plans in the metadata (Megatron-LM's saves)
    | {(f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")}
    | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    # StorageMeta.checkpoint_id: the path the checkpoint was saved to (built, never opened)
    | {("pathlib", name) for name in ("PosixPath", "PurePosixPath", "WindowsPath",
                                      "PureWindowsPath")}
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)})


class UnsafePickleError(CheckpointReadError):
    """A pickle names a class outside its format's list: refused, nothing built from it."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only the listed (module, name) globals and no persistent ids."""

    def __init__(self, file, allowed: frozenset, path, what: str):
        super().__init__(file)
        self.allowed, self.path, self.what = allowed, path, what

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"{self.path}: refused to unpickle {module}.{name}: not one of the classes "
                f"{self.what} is made of (a hostile checkpoint could run code this way; "
                "nothing was loaded)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path}: refused a persistent id in {self.what}")


def restricted_load(data: bytes, allowed: frozenset, path, what: str):
    """Unpickle `data` allowing only `allowed` globals; every failure is a CheckpointReadError
    naming `path`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, path, what).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt: any of pickle's and the classes' errors
        raise CheckpointReadError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e


def load_dcp_metadata(path) -> "torch.distributed.checkpoint.metadata.Metadata":
    """A DCP `.metadata` file, unpickled with only the classes DCP metadata consists of."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read ({e})") from e
    metadata = restricted_load(data, DCP_METADATA_GLOBALS, path, "DCP metadata")
    if not isinstance(metadata, Metadata):
        raise CheckpointReadError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata
