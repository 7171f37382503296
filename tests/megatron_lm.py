"""Running the real Megatron-LM (../shared/peers/megatron-lm, tag core_v0.16.1) from tests.

Megatron-LM runs in subprocesses only, with its tree on PYTHONPATH ahead of the pip
megatron-core of the same release, and with `tests/peer_shim` first: that folder's
`sitecustomize.py` replaces the few calls that need a GPU or Transformer Engine, and works
around two upstream bugs of its checkpoint converter (each patch says which call and why).
Megatron-LM's code is never copied here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peers" / "megatron-lm"
SHIM = Path(__file__).resolve().parent / "peer_shim"
SCRIPTS = Path(__file__).resolve().parent / "peer_scripts"

requires_peer = pytest.mark.skipif(
    not (PEER / "megatron" / "training").is_dir(),
    reason=f"Megatron-LM is not at {PEER} (../shared/peers/megatron-lm)")


def peer_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SHIM), str(PEER), str(PEER / "tools" / "checkpoint"), str(ROOT)])
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron-LM's validate_args asks for it with TP > 1
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_peer(argv, cwd=None, timeout: int = 300) -> str:
    """Run a Python script under Megatron-LM's environment; its output, or a failure that
    quotes the end of it."""
    proc = subprocess.run([sys.executable, *map(str, argv)], env=peer_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}:\n{log[-4000:]}")
    return log


def convert(load, save, *, loader: str, saver: str, tp: int, pp: int, extra=()) -> Path:
    """Megatron-LM's tools/checkpoint/convert.py. It exits 0 even when its saver process
    crashed, so success is judged by the files it must have written."""
    log = run_peer([PEER / "tools" / "checkpoint" / "convert.py", "--model-type", "GPT",
                    "--loader", loader, "--saver", saver, "--load-dir", load, "--save-dir", save,
                    "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
                    *extra])
    files = sorted(Path(save).glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    if len(files) != tp * pp or not (Path(save) / "latest_checkpointed_iteration.txt").is_file():
        raise AssertionError(f"Megatron-LM's converter wrote {len(files)} of {tp * pp} rank files"
                             f":\n{log[-4000:]}")
    return Path(save)


def rank_files(ckpt) -> dict:
    """{(tp_rank, pp_rank): the torch.load'ed dict} of a legacy Megatron checkpoint."""
    from megatron_prune.megatron_checkpoint import LegacyCheckpoint
    ck = LegacyCheckpoint(ckpt)
    return {k: torch.load(f, map_location="cpu", weights_only=False) for k, f in ck.files.items()}


def assert_same_weights(a, b, vocab_size: int) -> None:
    """Two legacy checkpoints of one TP/PP hold the same tensors, bit for bit. Rows of the
    embedding and output layer past `vocab_size` are padding, which each writer fills its own
    way: they are compared only in shape."""
    fa, fb = rank_files(a), rank_files(b)
    assert fa.keys() == fb.keys()
    for rank in fa:
        ma = {k: v for k, v in fa[rank]["model"].items() if torch.is_tensor(v)}
        mb = {k: v for k, v in fb[rank]["model"].items() if torch.is_tensor(v)}
        assert ma.keys() == mb.keys(), (rank, sorted(ma.keys() ^ mb.keys()))
        for name, x in ma.items():
            y = mb[name]
            assert x.shape == y.shape and x.dtype == y.dtype, (rank, name, x.shape, y.shape)
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                rows = max(0, min(x.shape[0], vocab_size - rank[0] * x.shape[0]))
                x, y = x[:rows], y[:rows]
            assert torch.equal(x, y), (rank, name)
