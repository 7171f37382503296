"""Running the real Megatron-LM (../shared/peers/megatron-lm, tag core_v0.16.1) from tests and
benchmarks: its checkpoint converter (`convert`), `pretrain_gpt.py` (`pretrain`) and its model
builder + checkpoint loader (`megatron_lm_logits`).

Megatron-LM runs in subprocesses only, with its tree on PYTHONPATH ahead of the pip
megatron-core of the same release, and with `tests/megatron_lm_harness` first: that folder's
`sitecustomize.py` applies, in every process of the run, the patch set `peer_env(mode)` names
(each patch says which call it replaces and why). Megatron-LM's code is never copied here.
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
HARNESS = Path(__file__).resolve().parent / "megatron_lm_harness"
SCRIPTS = Path(__file__).resolve().parent / "peer_scripts"

requires_peer = pytest.mark.skipif(
    not (PEER / "megatron" / "training").is_dir(),
    reason=f"Megatron-LM is not at {PEER} (../shared/peers/megatron-lm)")


def peer_env(mode: str = "convert") -> dict:
    """The environment of a Megatron-LM subprocess: the harness's `mode` ("convert" for
    tools/checkpoint, "train" for pretrain_gpt.py and mlm_logits.py)."""
    paths = [HARNESS, PEER] + ([PEER / "tools" / "checkpoint", ROOT] if mode == "convert" else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)), MEGATRON_LM_HARNESS=mode,
                # Megatron-LM's validate_args asks for it with TP > 1
                CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore",
                **({"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
                   if mode == "train" else {}))


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


# ---------------------------------------------------------------------------- pretrain_gpt.py
# The tiny Llama-shaped GPT: RMSNorm, SwiGLU, no biases, RoPE, GQA 8 heads / 4 groups, untied.
MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
    "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "4",
    "--seq-length", "32", "--max-position-embeddings", "64",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
]
# What a CPU run needs: the local (torch) layer spec, no fused CUDA kernels, gloo.
CPU_FLAGS = [
    "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
    # torch_norm.py:30 asserts `not config.persist_layer_norm` for the local spec's torch norms
    "--no-persist-layer-norm",
    "--use-cpu-initialization", "--distributed-backend", "gloo",
    # rerun_state_machine.py:957 _save_state calls torch.cuda.get_rng_state() every iteration
    "--rerun-mode", "disabled",
]
TRAIN_FLAGS = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--clip-grad", "1.0",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--log-interval", "1",
    "--eval-interval", "3", "--eval-iters", "1", "--save-interval", "3",
]
NULL_VOCAB = 300  # NullTokenizer --vocab-size: 301 tokens (0..299 and EOD 300), padded to 384


def require_megatron_lm() -> Path:
    if not (PEER / "pretrain_gpt.py").is_file():
        pytest.skip(f"Megatron-LM is not at {PEER}")
    return PEER


def launch(nproc: int, script: Path, flags, cwd: Path,
           timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script)] + [str(f) for f in flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=peer_env("train"),
                          cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pretrain(save: Path, nproc: int = 1, *extra, tokenizer=None) -> str:
    """Megatron-LM's pretrain_gpt.py: 3 iterations on mock data, checkpoint at iteration 3.
    Returns its stdout, after checking that it trained and saved (not only its exit code)."""
    require_megatron_lm()
    tokenizer = tokenizer or ["--tokenizer-type", "NullTokenizer", "--vocab-size", NULL_VOCAB]
    flags = (MODEL_FLAGS + CPU_FLAGS + TRAIN_FLAGS + ["--mock-data", "--save", save]
             + list(tokenizer) + list(extra))
    proc = launch(nproc, PEER / "pretrain_gpt.py", flags, cwd=save.parent)
    out = proc.stdout
    for it in (1, 2, 3):
        assert f"iteration        {it}/       3" in out, out[-3000:]
    assert "successfully saved checkpoint from iteration       3" in out, out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    return out


def megatron_lm_logits(load: Path, tokens: torch.Tensor, tmp: Path, nproc: int = 1,
                       *extra) -> torch.Tensor:
    """Megatron-LM's model (gpt_builder via model_provider, --use-checkpoint-args), loaded by
    its load_checkpoint, on `tokens`: the full logits [batch, seq, padded vocab]."""
    require_megatron_lm()
    torch.save(tokens, tmp / "tokens.pt")
    out = tmp / "logits.pt"
    flags = CPU_FLAGS + [
        "--use-checkpoint-args", "--load", load, "--no-load-optim", "--no-load-rng",
        # load_args_from_checkpoint (checkpointing.py:1456) would take the tokenizer of the
        # checkpoint's args (HuggingFaceTokenizer without a local model): one that pads to the
        # same vocab is given instead.
        "--no-use-tokenizer-model-from-checkpoint-args",
        "--micro-batch-size", tokens.shape[0], "--tokens", tmp / "tokens.pt",
        "--logits-out", out] + list(extra)
    launch(nproc, HARNESS / "mlm_logits.py", flags, cwd=tmp)
    return torch.load(out)


# ---------------------------------------------------------------------------- converter checkpoints
def rank_files(ckpt) -> dict:
    """{(tp_rank, pp_rank): the torch.load'ed dict} of a legacy Megatron checkpoint."""
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
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
