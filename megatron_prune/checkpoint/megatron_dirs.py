"""Megatron-LM's checkpoint directory: the tracker file, iteration and rank folders, the format.

    DIR/latest_checkpointed_iteration.txt          -> "1" (or "release")
    DIR/iter_0000001/metadata.json                 torch_dist only: {"sharded_backend": ...}
    DIR/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}]/   legacy (torch) only: one folder per rank

Shared by both formats (`legacy.py`, `torch_dist.py`), so it imports neither.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_prune.checkpoint.tensor_io import CheckpointReadError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


def iter_dir_name(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(root: Path):
    tracker = root / TRACKER
    if not tracker.is_file():
        raise CheckpointReadError(
            f"{root}: no {TRACKER}; not a Megatron checkpoint directory (or an incomplete one)")
    text = tracker.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointReadError(f"{tracker}: unreadable iteration {text!r}") from None


def checkpoint_format(root) -> str:
    """'torch' (legacy per-rank files) or 'torch_dist' (megatron-core distributed checkpoint)."""
    root = Path(root)
    it_dir = root / iter_dir_name(read_tracker(root))
    meta = it_dir / "metadata.json"
    if meta.is_file():
        backend = json.loads(meta.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointReadError(f"{it_dir}: unsupported distributed checkpoint backend {backend!r}")
        return "torch_dist"
    if not it_dir.is_dir():
        raise CheckpointReadError(f"{root}: tracker names {it_dir.name}, which does not exist")
    return "torch"


def check_megatron_input(root) -> None:
    if not Path(root).is_dir():
        raise CheckpointReadError(f"--load {root}: no such directory")
    if not (Path(root) / TRACKER).is_file():
        raise CheckpointReadError(f"{root}: no {TRACKER}; not a Megatron checkpoint (or incomplete)")


def parse_layer_count(value) -> Optional[int]:
    return None if value in (None, "", "None") else int(value)
