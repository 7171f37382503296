"""Support for tests/test_megatron_lm_training.py: run the real Megatron-LM (../shared/peers/
megatron-lm, core_v0.16.1, unmodified) on the CPU, and read what it wrote independently of the
project's readers.

Megatron-LM runs in a subprocess with its tree first on PYTHONPATH (ahead of the pip
megatron-core of the same release) through tests/megatron_lm_train_shim/mlm_cpu.py, which applies
the CPU stand-ins listed there and then runs `pretrain_gpt.py` (runpy), or mlm_logits.py (its
model builder + checkpoint loader + one forward). Training needs a driver that patches inside
the process it runs in; Megatron-LM's checkpoint converter builds its own argv and forks its
own processes, so tests/megatron_lm.py reaches it through a sitecustomize instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lm import PEER as MEGATRON_LM, ROOT

SHIM = Path(__file__).resolve().parent / "megatron_lm_train_shim"

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
    if not (MEGATRON_LM / "pretrain_gpt.py").is_file():
        pytest.skip(f"Megatron-LM is not at {MEGATRON_LM}")
    return MEGATRON_LM


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(MEGATRON_LM), CUDA_DEVICE_MAX_CONNECTIONS="1",
                OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")


def launch(nproc: int, script: Path, flags, cwd: Path,
           timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script)] + [str(f) for f in flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pretrain(save: Path, nproc: int = 1, *extra, tokenizer=None) -> str:
    """Megatron-LM's pretrain_gpt.py: 3 iterations on mock data, checkpoint at iteration 3.
    Returns its stdout, after checking that it trained and saved (not only its exit code)."""
    require_megatron_lm()
    tokenizer = tokenizer or ["--tokenizer-type", "NullTokenizer", "--vocab-size", NULL_VOCAB]
    flags = ([SHIM / "mlm_cpu.py", MEGATRON_LM / "pretrain_gpt.py"] + MODEL_FLAGS + CPU_FLAGS
             + TRAIN_FLAGS + ["--mock-data", "--save", save] + list(tokenizer) + list(extra))
    proc = launch(nproc, flags[0], flags[1:], cwd=save.parent)
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
    launch(nproc, SHIM / "mlm_logits.py", flags, cwd=tmp)
    return torch.load(out)


# ---------------------------------------------------------------------------- reading
def legacy_model_states(root: Path) -> dict:
    """{(tp, pp): model state dict} of Megatron-LM's own rank files (torch.load, no project
    code)."""
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    out = {}
    for f in sorted((root / f"iter_{int(it):07d}").glob("mp_rank_*/model_optim_rng.pt")):
        parts = f.parent.name.split("_")
        out[(int(parts[2]), int(parts[3]) if len(parts) > 3 else 0)] = torch.load(
            f, weights_only=False)
    return out


def merge_tp(states: list) -> dict:
    """Full tensors from the TP rank files of one stage (each rank holds whole query groups;
    each rank's linear_fc1 is [gate_r; up_r])."""
    out = {}
    for name, t0 in states[0].items():
        if not torch.is_tensor(t0):
            continue
        parts = [s[name] for s in states]
        if "linear_fc1" in name:
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
            out[name] = torch.cat(parts, dim=0)
        elif any(k in name for k in ("linear_proj", "linear_fc2")):
            out[name] = torch.cat(parts, dim=1)
        else:
            assert all(torch.equal(p, t0) for p in parts), name
            out[name] = t0
    return out


def merge_pp(stages: list) -> dict:
    """One state dict from the PP stages' (each numbers its layers from 0)."""
    out, offset = {}, 0
    for state in stages:
        layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
        for name, t in state.items():
            if name.startswith("decoder.layers."):
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + offset)
                name = ".".join(parts)
            assert name not in out, name
            out[name] = t
        offset += len(layers)
    return out


def dist_model_state(root: Path) -> dict:
    """Full model tensors of a torch_dist checkpoint, read by torch.distributed.checkpoint
    (dcp_to_torch_save) — not by megatron-core or the project."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    flat = root.parent / f"{root.name}_dcp_flat.pt"
    dcp_to_torch_save(root / f"iter_{int(it):07d}", flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    out = {}
    for name, t in state.items():
        # mcore saves each per-layer tensor of the decoder stacked over layers:
        # decoder.layers.<rest> [num_layers, ...] -> decoder.layers.<i>.<rest>
        if name.startswith("decoder.layers.") and torch.is_tensor(t):
            rest = name[len("decoder.layers."):]
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i]
        else:
            out[name] = t
    return out


def hf_reference(full: dict, *, heads: int, groups: int, head_dim: int, vocab: int) -> dict:
    """The HF Llama tensors a correct export of Megatron's full tensors gives (written here from
    the layout rules, independently of megatron_prune.layout)."""
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in full:
        out["lm_head.weight"] = full["output_layer.weight"][:vocab]
    per = heads // groups
    layers = sorted({int(k.split(".")[2]) for k in full if k.startswith("decoder.layers.")})
    for i in layers:
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[m + "self_attention.linear_qkv.weight"]
        g = qkv.view(groups, (per + 2) * head_dim, -1)
        out[h + "self_attn.q_proj.weight"] = g[:, :per * head_dim].reshape(-1, qkv.shape[1])
        out[h + "self_attn.k_proj.weight"] = g[:, per * head_dim:(per + 1) * head_dim].reshape(
            -1, qkv.shape[1])
        out[h + "self_attn.v_proj.weight"] = g[:, (per + 1) * head_dim:].reshape(-1, qkv.shape[1])
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
        # local spec names; Megatron-LM's torch_dist files name them as Transformer Engine does
        # (the local layer's sharded_state_dict_keys_map), fused into the next linear
        out[h + "input_layernorm.weight"] = full.get(
            m + "input_layernorm.weight", full.get(m + "self_attention.linear_qkv.layer_norm_weight"))
        out[h + "post_attention_layernorm.weight"] = full.get(
            m + "pre_mlp_layernorm.weight", full.get(m + "mlp.linear_fc1.layer_norm_weight"))
    return out
