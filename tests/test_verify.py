"""`megatron-prune verify` and mcore/: real megatron-core GPTModels on CPU over gloo.

Every run is a real launch (torchrun with 2 gloo processes, or one plain process), building the
model from the converted checkpoint and comparing its logits with transformers' in fp32.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from megatron_prune.checkpoint import convert

from hf_models import make_hf_llama

pytest.importorskip("megatron.core")

TOL = 1e-4
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_verify(nproc: int, hf, load, *extra, timeout: int = 180) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "megatron_prune"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "megatron_prune"]
    cmd = launcher + ["verify", "--hf-dir", str(hf), "--load", str(load), "--tokens", "64", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def max_abs(proc: subprocess.CompletedProcess) -> float:
    found = re.findall(r"^  max abs error (\S+)$", proc.stdout, re.M)
    assert len(found) == 1, f"expected one report (from one rank):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return float(found[0])


def assert_matches(proc, *, tp: int, pp: int, ckpt_impl: str) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert max_abs(proc) < TOL
    assert f"checkpoint names {ckpt_impl}, TP={tp} PP={pp}" in proc.stdout
    assert "top-1 agreement 1.0000" in proc.stdout
    assert "PASS" in proc.stdout


@pytest.fixture(scope="module")
def gqa_hf(tmp_path_factory):
    """A random GQA Llama: 8 query heads in 4 KV groups, 4 layers, vocab 300 (padded by Megatron)."""
    return make_hf_llama(tmp_path_factory.mktemp("gqa") / "hf")


def test_tp2_te_names_two_processes(gqa_hf, tmp_path):
    convert.hf_to_megatron(gqa_hf, tmp_path / "tp2", tp=2)  # Transformer Engine names (default)
    proc = run_verify(2, gqa_hf, tmp_path / "tp2", "--tolerance", str(TOL))
    assert_matches(proc, tp=2, pp=1, ckpt_impl="transformer_engine")


def test_pp2_local_names_two_processes(gqa_hf, tmp_path):
    convert.hf_to_megatron(gqa_hf, tmp_path / "pp2", pp=2, impl="local")
    proc = run_verify(2, gqa_hf, tmp_path / "pp2", "--tolerance", str(TOL))
    assert_matches(proc, tp=1, pp=2, ckpt_impl="local")


def test_torch_dist_checkpoint_loads_through_megatron_core(gqa_hf, tmp_path):
    """verify loads a torch_dist checkpoint through megatron-core's own dist_checkpointing
    loader (the path Megatron-LM takes) and gives the HF logits."""
    convert.hf_to_megatron(gqa_hf, tmp_path / "dist", tp=2, ckpt_format="torch_dist")
    proc = run_verify(2, gqa_hf, tmp_path / "dist", "--tolerance", str(TOL))
    assert_matches(proc, tp=2, pp=1, ckpt_impl="transformer_engine")


def test_tp1_single_process_and_tolerance_failure(gqa_hf, tmp_path):
    convert.hf_to_megatron(gqa_hf, tmp_path / "tp1")
    proc = run_verify(1, gqa_hf, tmp_path / "tp1", "--tolerance", str(TOL))
    assert_matches(proc, tp=1, pp=1, ckpt_impl="transformer_engine")

    # Same shapes, other weights: verify must see the difference and exit 1.
    other = make_hf_llama(tmp_path / "other", seed=1)
    proc = run_verify(1, other, tmp_path / "tp1", "--tolerance", str(TOL))
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert max_abs(proc) > 1e-2
    assert "FAIL" in proc.stdout


def test_tied_uneven_pipeline_llama3_rope(tmp_path):
    """Tied embeddings across 2 stages (mcore's shared output copy), an uneven 3+2 split, and
    llama3 RoPE scaling with non-default low/high/original parameters."""
    hf = make_hf_llama(tmp_path / "hf", tie_word_embeddings=True, num_hidden_layers=5,
                       rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 2.0,
                                     "original_max_position_embeddings": 32})
    convert.hf_to_megatron(hf, tmp_path / "pp2", pp=2, first=3)
    proc = run_verify(2, hf, tmp_path / "pp2", "--tolerance", str(TOL))
    assert_matches(proc, tp=1, pp=2, ckpt_impl="transformer_engine")


def test_stories260k_tp2_local_spec_two_processes(stories260k_hf, tmp_path):
    """The trained stories260K (GQA 8/4, tied, vocab 512) at TP=2 with local names, loaded into
    a local-spec megatron-core GPTModel on 2 gloo processes, gives HF's logits."""
    convert.hf_to_megatron(stories260k_hf, tmp_path / "tp2", tp=2, impl="local")
    proc = run_verify(2, stories260k_hf, tmp_path / "tp2", "--tolerance", str(TOL))
    assert_matches(proc, tp=2, pp=1, ckpt_impl="local")
    assert "(local spec," in proc.stdout


def test_user_errors_exit_2(gqa_hf, tmp_path):
    convert.hf_to_megatron(gqa_hf, tmp_path / "tp2", tp=2)
    proc = run_verify(1, gqa_hf, tmp_path / "tp2")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert "--nproc_per_node 2" in proc.stderr

    other = make_hf_llama(tmp_path / "small", num_hidden_layers=2)
    proc = run_verify(1, other, tmp_path / "tp2")
    assert proc.returncode == 2
    assert "different models" in proc.stderr and "num_layers" in proc.stderr


def test_load_reshards_and_renames(gqa_hf, tmp_path):
    """load_legacy_into_model: a TP=2 Transformer-Engine-named checkpoint into a TP=1 local-spec
    model (other vocab padding too), strictly; and refused when resharding is turned off."""
    convert.hf_to_megatron(gqa_hf, tmp_path / "tp2", tp=2)
    script = textwrap.dedent(f"""
        import torch
        from megatron_prune.mcore.cpu import cpu_patches
        from megatron_prune.mcore.load import load_legacy_into_model
        from megatron_prune.mcore.model import build_gpt_model
        from megatron_prune.mcore.parallel import destroy_distributed, gather_tp_logits, init_distributed, pipeline_forward
        from megatron_prune.checkpoint.config import ConfigError
        from megatron_prune.checkpoint.legacy import LegacyCheckpoint
        from megatron_prune.eval.verify import hf_logits, random_tokens
        if __name__ == "__main__":
            device = init_distributed(1, 1)["device"]
            cfg = LegacyCheckpoint({str(tmp_path / "tp2")!r}).config
            model = build_gpt_model(cfg, impl="local").eval()
            load_legacy_into_model(model, {str(tmp_path / "tp2")!r})
            x = random_tokens(cfg.vocab_size, 2, 32, 0).to(device)
            with torch.no_grad():
                out = gather_tp_logits(pipeline_forward(model, x), cfg.vocab_size)
            print("MAXABS", (out - hf_logits({str(gqa_hf)!r}, x)).abs().max().item())
            try:
                load_legacy_into_model(model, {str(tmp_path / "tp2")!r}, reshard=False)
            except ConfigError as e:
                print("REFUSED", e)
            destroy_distributed()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert float(re.search(r"MAXABS (\S+)", proc.stdout).group(1)) < TOL
    assert "REFUSED" in proc.stdout and "TP=2" in proc.stdout


def test_cpu_patches_idempotent_and_only_without_cuda():
    script = textwrap.dedent("""
        import torch
        from megatron_prune.mcore.cpu import cpu_patches
        from megatron_prune.mcore.load import load_legacy_into_model
        from megatron_prune.mcore.model import build_gpt_model
        from megatron_prune.mcore.parallel import destroy_distributed, gather_tp_logits, init_distributed, pipeline_forward
        first = cpu_patches()
        import megatron.core.transformer.utils as tutils
        mask_fn = tutils.get_default_causal_mask
        assert cpu_patches() == first and tutils.get_default_causal_mask is mask_fn
        if not torch.cuda.is_available():
            assert first
            m = mask_fn(3)
            assert m.device.type == "cpu" and m.tolist() == [[False, True, True],
                                                             [False, False, True],
                                                             [False, False, False]]
        else:
            assert not first
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
