"""Reading and writing tensors one at a time, so no tool ever holds a whole model.

* `SafetensorsReader` reads single tensors, or a row/column range of one, through a short-lived
  memory map: only the pages of that tensor are touched, and they are unmapped right after.
* `SafetensorsWriter` writes a safetensors file tensor by tensor (the header is planned from
  shapes first), so an export never holds more than one tensor.
* `TorchFileReader` opens a `torch.save` file with `mmap=True, weights_only=True` and releases
  each tensor's pages after it was copied out (`madvise(DONTNEED)`), so reading a 3 GB rank file
  keeps resident only what is in use; `raw` gives a tensor as a view of the map instead, for a
  caller that copies only the rows it needs and releases the pages itself (`MegatronSource`).
* `save_streamed` writes what `torch.save` would, tensor by tensor: torch itself lays the file
  out (`torch.serialization.skip_data`, from untouched placeholder tensors), and each tensor's
  bytes go to its record's offset from a writer thread while the next tensor is being built.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import pickle
import queue
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointReadError(OSError):
    """A checkpoint file is missing, truncated or not what it claims to be."""


# ---------------------------------------------------------------------------- safetensors
def _check_entry(path: Path, name: str, entry) -> None:
    """One header entry is a known dtype, a shape of whole sizes, and a byte range that holds
    exactly that many elements: anything else (a damaged or hand-made header) is refused here,
    not met later as a KeyError or a wrong-sized read."""
    try:
        dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = (dtype in ST_DTYPES and isinstance(shape, list)
              and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi)
    except (TypeError, KeyError, ValueError):
        ok = False
    if ok:
        itemsize = torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
        ok = hi - lo == itemsize * int(np.prod(shape, dtype=np.int64))
    if not ok:
        raise CheckpointReadError(f"{path}: damaged safetensors header entry {name!r}: {entry!r}"[:300])


class SafetensorsReader:
    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise CheckpointReadError(f"{self.path}: header length {n} exceeds file size")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointReadError(f"{self.path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointReadError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries = header
        for name, entry in header.items():
            _check_entry(self.path, name, entry)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.base + end > size:
            raise CheckpointReadError(
                f"{self.path}: truncated ({size} bytes, tensors need {self.base + end})")

    def keys(self):
        return list(self.entries)

    def shape(self, name) -> tuple:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name) -> torch.dtype:
        return ST_DTYPES[self.entries[name]["dtype"]]

    def get(self, name, dim: Optional[int] = None, start: int = 0, end: Optional[int] = None):
        """The tensor, or rows (dim 0) / columns (dim 1) [start, end) of it, as a fresh copy."""
        e = self.entries[name]
        dtype, shape = ST_DTYPES[e["dtype"]], list(e["shape"])
        lo, hi = e["data_offsets"]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if dim == 0 and len(shape) >= 1:
            row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
            end = shape[0] if end is None else end
            lo, hi = lo + start * row, lo + end * row
            shape[0] = end - start
            dim = None  # already sliced
        if hi == lo:
            return torch.empty(shape, dtype=dtype)
        off = self.base + lo
        if dim != 1:  # contiguous bytes: one read into the result (kernel readahead, as cp)
            out = torch.empty(shape, dtype=dtype)
            with open(self.path, "rb", buffering=0) as f:
                _pread_into(f.fileno(), out, off)
            return out
        # Columns: a fresh, page-aligned map per read, unmapped when we return (nothing stays
        # resident), read ahead as a whole since every row of it is touched.
        aligned = off - off % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f, \
                mmap.mmap(f.fileno(), hi - lo + off - aligned, offset=aligned,
                          access=mmap.ACCESS_READ) as m:
            if hasattr(m, "madvise"):
                m.madvise(mmap.MADV_WILLNEED)
            raw = np.frombuffer(m, dtype=np.uint8, count=hi - lo, offset=off - aligned)
            if dim == 1:  # copy only the wanted columns' bytes of each row
                end = shape[1] if end is None else end
                width = (hi - lo) // (shape[0] * shape[1])
                raw_part = raw.reshape(shape[0], -1)[:, start * width:end * width].copy()
                shape[1] = end - start
            else:
                raw_part = raw.copy()
            del raw
        return torch.from_numpy(raw_part).view(dtype).reshape(shape)

    def read_rows_into(self, name, start: int, end: int, out: torch.Tensor) -> None:
        """Rows [start, end) of a tensor read straight into `out` (contiguous, of their shape
        and dtype): the fused tensors of hf-to-megatron are filled this way, run by run."""
        e = self.entries[name]
        shape = list(e["shape"])
        if (not out.is_contiguous() or out.dtype != ST_DTYPES[e["dtype"]]
                or list(out.shape) != [end - start] + shape[1:]):
            raise ValueError(f"{name}: rows {start}:{end} cannot fill {tuple(out.shape)} "
                             f"{out.dtype}")
        if out.numel():
            row = out.element_size() * int(np.prod(shape[1:], dtype=np.int64))
            with open(self.path, "rb", buffering=0) as f:
                _pread_into(f.fileno(), out, self.base + e["data_offsets"][0] + start * row)


class SafetensorsWriter:
    """Write tensors in a planned order; the header is written first from (name, shape, dtype).
    A writer thread writes each tensor's bytes (no copy of them) while the caller builds the
    next one; at most two tensors wait for it."""

    def __init__(self, path, plan: Iterable[tuple], metadata: Optional[dict] = None):
        header, offset = {}, 0
        self.order = []
        for name, shape, dtype in plan:
            n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self.order.append(name)
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
        self.header = header
        self.total = offset
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0
        self._queue: "queue.Queue" = queue.Queue(maxsize=2)
        self._failed: list = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        while (t := self._queue.get()) is not None:
            if not self._failed and t.numel():
                try:
                    self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                except Exception as e:  # kept draining: write() must never block on put
                    self._failed.append(e)

    def write(self, name, tensor: torch.Tensor):
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"safetensors writer: expected {self.order[self.next:self.next+1]}, got {name}")
        e = self.header[name]
        if list(tensor.shape) != e["shape"] or ST_NAMES[tensor.dtype] != e["dtype"]:
            raise RuntimeError(f"{name}: planned {e['shape']} {e['dtype']}, got "
                               f"{list(tensor.shape)} {tensor.dtype}")
        if self._failed:
            raise self._failed[0]
        self._queue.put(tensor.detach().contiguous().cpu())
        self.next += 1

    def _finish(self):
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self):
        self._finish()
        if self._failed:
            self.f.close()
            raise self._failed[0]
        if self.next != len(self.order):
            self.f.close()
            raise RuntimeError(f"safetensors writer closed after {self.next}/{len(self.order)} tensors")
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._finish()
            self.f.close()


# ---------------------------------------------------------------------------- torch.save files
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages behind a tensor that lives in a private file mapping."""
    if _libc is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = start - start % _PAGE
    hi = end + (-end % _PAGE)
    # Pages at the edges may hold a neighbour's bytes: that is fine, a private read-only mapping
    # simply faults them back in from the file when touched again.
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _pread_into(fd: int, t: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor `t` with the file's bytes from `offset` (short reads: retried)."""
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise CheckpointReadError(f"unexpected end of file at byte {offset}")
        buf, offset = buf[n:], offset + n


def _pwrite_all(fd: int, t: torch.Tensor, offset: int) -> None:
    buf = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    while len(buf):  # one write moves at most ~2 GiB on Linux
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def save_streamed(path, head: dict, key: str, plan: List[Tuple[str, Optional[torch.Tensor]]],
                  produce: Callable[[str], torch.Tensor]) -> None:
    """`torch.save({**head, key: {name: produce(name)}}, path)` (with None for plan entries
    whose meta tensor is None), holding about two tensors instead of the whole dict.

    `plan` gives each name's shape and dtype as a meta tensor, in the dict's order. torch.save
    writes the file from placeholder tensors under `skip_data` (no bytes of theirs are touched,
    so they take no memory): the pickle, the records and their alignment are torch's own, and
    the data records hold nothing yet. Storage keys are numbered in the order the pickler meets
    the tensors, i.e. `plan`'s order, so record `data/i` belongs to the i-th tensor. Then each
    tensor is produced and a writer thread puts its bytes at its record's offset, overlapping
    building the next tensor (reading, fusing) with writing this one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not hasattr(torch.serialization, "skip_data"):  # torch < 2.6: the whole dict at once
        torch.save({**head, key: {n: None if m is None else produce(n) for n, m in plan}}, path)
        return
    placeholders = {n: (None if m is None else torch.empty(m.shape, dtype=m.dtype))
                    for n, m in plan}
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with torch.serialization.skip_data():
            torch.save({**head, key: placeholders}, path)
    finally:
        torch.serialization.set_crc32_options(crc)
    del placeholders
    with open(path, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        tensors = [(n, m) for n, m in plan if m is not None]
        offsets = [reader.get_record_offset(f"data/{i}") for i in range(len(tensors))]
    pending: "queue.Queue" = queue.Queue(maxsize=2)
    failed: list = []

    def writer(fd):
        while (item := pending.get()) is not None:
            if not failed:
                try:
                    _pwrite_all(fd, *item)
                except Exception as e:  # kept draining: the producer must never block on put
                    failed.append(e)

    fd = os.open(path, os.O_WRONLY)
    thread = threading.Thread(target=writer, args=(fd,), daemon=True)
    thread.start()
    try:
        for (name, meta), offset in zip(tensors, offsets):
            t = produce(name)
            if t.shape != meta.shape or t.dtype != meta.dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned "
                                 f"{tuple(meta.shape)} {meta.dtype}")
            if failed:
                break
            pending.put((t, offset))
            del t
    finally:
        pending.put(None)
        thread.join()
        os.close(fd)
    if failed:
        raise failed[0]


def _megatron_arg_types() -> list:
    """megatron-core enums that Megatron-LM stores in `args` (imported only when needed:
    importing megatron.core is slow and noisy)."""
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType
    return [AttnBackend, AttnMaskType]


def torch_load(path, mmap_: bool = True):
    """torch.load with weights_only=True (Megatron args types allowed) and clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"missing checkpoint file: {path}")
    types = [argparse.Namespace]
    for attempt in range(2):
        # safe_globals() removes its types again on exit, even ones allowed before (e.g. by
        # megatron-core's own loader): add only what is missing.
        have = set(map(id, torch.serialization.get_safe_globals()))
        try:
            with torch.serialization.safe_globals([t for t in types if id(t) not in have]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_)
        except pickle.UnpicklingError as e:
            if attempt == 0 and "megatron" in str(e):
                types += _megatron_arg_types()
                continue
            raise CheckpointReadError(f"{path}: holds objects a weights-only load refuses ({e})") from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path}: cannot be read, truncated or corrupt? ({e})") from e


class TorchFileReader:
    """Tensors of a `torch.save` dict (`state` or `state[key]`), copied out one at a time."""

    def __init__(self, path, key: Optional[str] = None):
        self.path = Path(path)
        self.obj = torch_load(path)
        self.state = self.obj[key] if key else self.obj
        if not isinstance(self.state, dict):
            raise CheckpointReadError(f"{path}: no state dict under {key!r}")

    def keys(self):
        return list(self.state)

    def shape(self, name) -> tuple:
        return tuple(self.state[name].shape)

    def dtype(self, name) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name, dim: Optional[int] = None, start: int = 0, end: Optional[int] = None):
        t = self.state[name]
        if dim is not None:
            end = t.shape[dim] if end is None else end
            part = t.narrow(dim, start, end - start)
        else:
            part = t
        out = part.clone(memory_format=torch.contiguous_format)
        release_pages(t)
        return out

    def raw(self, name):
        """The stored value as is (e.g. `_extra_state` objects), or a tensor as a view of the
        mapped file: no copy, its pages are read when touched (`release_pages` drops them)."""
        return self.state[name]
