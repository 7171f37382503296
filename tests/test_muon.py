"""`--optimizer muon`: the optimizer's math against its definition and torch's AdamW, and the
trainer with it on CPU over gloo (TP=2 and DP=2 against one process, resume against an
uninterrupted run), on stories260K converted to Megatron as in test_train.py."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.train.muon import MuonAdamW, matrix_role, orthogonalize

pytest.importorskip("megatron.core")
from test_train import (assert_same_curve, common, ok, records, run_train,  # noqa: E402
                        shakespeare, stories_tp1)

__all__ = ["shakespeare", "stories_tp1"]  # fixtures, imported for pytest to find


def test_orthogonalize_keeps_singular_vectors_and_flattens_values():
    g = torch.Generator().manual_seed(0)
    for shape in [(48, 20), (20, 48), (32, 32)]:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
        m = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T   # condition number 100
        o = orthogonalize(m)
        vh = v.T
        # o = U diag(s') V^T with every s' pushed near 1: Jordan's quintic gives ~[0.68, 1.13]
        inner = u.T @ o @ vh.T
        s = torch.diagonal(inner)
        assert torch.allclose(inner, torch.diag(s), atol=1e-4), shape
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s)


def test_batched_orthogonalization_equals_one_at_a_time(monkeypatch):
    from megatron_prune.train import muon
    monkeypatch.setattr(muon, "PENDING_ELEMENTS", 64 * 32 * 2)  # batches of 2 of one shape
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(*s, generator=g) for s in [(64, 32), (32, 64), (64, 32), (64, 32),
                                                    (16, 16), (64, 32)]]
    for a, m in zip(muon.orthogonalize_all(mats), mats):
        torch.testing.assert_close(a, orthogonalize(m), rtol=0, atol=1e-6)


def test_matmul_precision_is_scoped_to_newton_schulz():
    """--muon-fp32-matmul-prec sets torch's fp32 matmul precision for Newton-Schulz only: it is
    restored after the step, and a reduced one moves the weights almost as fp32 does."""
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    init, grad = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    moved = {}
    torch.set_float32_matmul_precision("highest")
    for prec in ("highest", "high", "medium"):
        w = torch.nn.Parameter(init.clone())
        w.grad = grad.clone()
        MuonAdamW([{"params": [w]}], [["matrix"]], cfg=cfg, lr=0.01, weight_decay=0.0,
                  fp32_matmul_prec=prec).step()
        assert torch.get_float32_matmul_precision() == "highest"
        moved[prec] = w.data - init
    for prec in ("high", "medium"):  # bf16 inside where the CPU has it: within 2% of fp32
        err = (moved[prec] - moved["highest"]).norm() / moved["highest"].norm()
        assert err < 0.02, (prec, err)


def test_muon_step_bench_smoke(tmp_path):
    """bench/muon_step.py's plumbing on a tiny shape: every kind steps, batched and one at a
    time agree, and PENDING_ELEMENTS is left as it was."""
    import json
    import sys
    from pathlib import Path

    from megatron_prune.train import muon
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import muon_step
    before = muon.PENDING_ELEMENTS
    assert muon_step.main(["--smoke", "--out", str(tmp_path / "m.json"), "--steps", "1"]) == 0
    (row,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    # bf16 Newton-Schulz rounds each of its 5 iterations to 2^-8: its weights after one step (lr
    # 1e-3) differ from fp32 by 2.5e-5 on one CPU, under 1e-5 on another (bf16 kernels vary).
    # A wrong step would differ by the update itself, about the lr.
    assert row["muon_max_abs_diff"] < 1e-7 and row["muon_bf16_max_abs_diff"] < 1e-4
    assert all(row[f"{k}_ms"] > 0 for k in ("adamw", "muon_1", "muon", "muon_tf32", "muon_bf16"))
    assert muon.PENDING_ELEMENTS == before


def test_dp_ranks_share_newton_schulz_work():
    """Over DP, each matrix goes to the least-loaded rank by Newton-Schulz cost: a model's
    layers (QKV parts, output, FC1, FC2) spread over 2 and 4 ranks, no two ranks' loads
    apart by more than the largest matrix's cost."""
    cfg = ModelConfig(num_layers=9, hidden_size=512, ffn_hidden_size=1024,
                      num_attention_heads=8, num_query_groups=4, head_dim=64, vocab_size=32)
    opt = MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], [[None]], cfg=cfg,
                    lr=0.1, weight_decay=0.0)
    layer = [[(512, 512), (256, 512), (256, 512)], [(512, 512)], [(2048, 512)], [(512, 1024)]]
    for dp in (2, 4):
        opt._load = [0] * dp
        owners = [opt._owner(shapes) for _ in range(cfg.num_layers) for shapes in layer]
        assert set(owners) == set(range(dp))
        assert max(opt._load) - min(opt._load) <= 2048 * 512 * 512, opt._load


def test_matrix_roles_follow_the_layout():
    assert matrix_role("decoder.layers.3.self_attention.linear_qkv.weight") == "qkv"
    for n in ("decoder.layers.0.self_attention.linear_proj.weight",
              "decoder.layers.10.mlp.linear_fc1.weight",
              "decoder.layers.1.mlp.linear_fc2.weight"):
        assert matrix_role(n) == "matrix", n
    for n in ("embedding.word_embeddings.weight", "output_layer.weight",
              "decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight",
              "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"):
        assert matrix_role(n) is None, n


def _cfg():
    return ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=24, num_attention_heads=4,
                       num_query_groups=2, head_dim=4, vocab_size=32)


@pytest.mark.parametrize("pending", [None, 1])
def test_adamw_part_equals_torch_adamw_and_muon_step_is_its_definition(pending, monkeypatch):
    """Three steps: a norm-like vector and an embedding-like matrix (role None) move exactly as
    torch's AdamW moves them; a matrix moves by -lr * (0.2 sqrt(max dim) orthogonalized
    momentum) after decoupled decay; a fused QKV orthogonalizes its q, k and v apart. With
    `pending` 1, every matrix is orthogonalized and applied on its own."""
    if pending is not None:
        from megatron_prune.train import muon
        monkeypatch.setattr(muon, "PENDING_ELEMENTS", pending)
    cfg = _cfg()
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(16, generator=g), torch.randn(32, 16, generator=g),
            torch.randn(24, 16, generator=g), torch.randn((4 + 2 + 2) * 4, 16, generator=g)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init[:2]]
    lr, wd, mom = 0.01, 0.1, 0.9
    opt = MuonAdamW([{"params": ours[1:], "wd_mult": 1.0}, {"params": ours[:1], "wd_mult": 0.0}],
                    [[None, "matrix", "qkv"], [None]], cfg=cfg, lr=lr, weight_decay=wd,
                    momentum=mom)
    opt.param_groups[1]["weight_decay"] = 0.0  # as the scheduler sets it from wd_mult
    adamw = torch.optim.AdamW([{"params": ref[1:]}, {"params": ref[:1], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    w, q = init[2].clone(), init[3].clone()
    buf_w, buf_q = torch.zeros_like(w), torch.zeros_like(q)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in init]
        for p, gr in zip(ours, grads):
            p.grad = gr.clone()
        for p, gr in zip(ref, grads[:2]):
            p.grad = gr.clone()
        opt.step()
        adamw.step()
        buf_w = mom * buf_w + grads[2]
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(24) * orthogonalize(buf_w)
        buf_q = mom * buf_q + grads[3]
        # 2 KV groups of [q (2 heads of 4 rows); k (4 rows); v (4 rows)]
        parts = [t.reshape(-1, 16) for t in buf_q.reshape(2, 16, 16).split([8, 4, 4], dim=1)]
        upd = [orthogonalize(m) * 0.2 * math.sqrt(max(m.shape)) for m in parts]
        fused = torch.cat([u.reshape(2, -1, 16) for u in upd], dim=1).reshape(-1, 16)
        q = q * (1 - lr * wd) - lr * fused
    for a, b in zip(ours[:2], ref):
        torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[2].data, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[3].data, q, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- the trainer
# fp32 Newton-Schulz: the default "medium" lets torch run fp32 matmuls at reduced precision
# where the hardware has it (TF32 on GPUs, bf16 on CPUs with AMX or AVX512-BF16, as this
# machine's), and then TP/DP orders of summation no longer agree to CURVE_RTOL.
MUON = ["--optimizer", "muon", "--muon-use-nesterov", "--muon-fp32-matmul-prec", "highest"]


@pytest.fixture(scope="module")
def muon_run(stories_tp1, shakespeare, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muon")
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp, "base"), *MUON,
                 "--save", tmp / "save", "--save-interval", 4))
    return tmp


def test_muon_trains_and_differs_from_adamw(muon_run, stories_tp1, shakespeare, tmp_path):
    recs = records(muon_run / "base.jsonl")
    assert [r["iteration"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp_path, "adam")))
    adam = records(tmp_path / "adam.jsonl")
    assert recs[1]["loss"] == adam[1]["loss"]  # the first step (at LR 0 in warmup) is shared
    assert recs[-1]["loss"] != pytest.approx(adam[-1]["loss"], rel=1e-3)


@pytest.mark.parametrize("name, nproc, flags", [
    ("tp2", 2, ["--tensor-model-parallel-size", 2]),
    pytest.param("dp2", 2, [], marks=pytest.mark.slow),  # (suite time: TP=2 runs by default)
    pytest.param("tp2dp2", 4, ["--tensor-model-parallel-size", 2], marks=pytest.mark.slow)])
def test_muon_tp2_and_dp2_match_single_process(muon_run, stories_tp1, shakespeare, tmp_path,
                                               name, nproc, flags):
    """TP=2 gathers each sharded update, orthogonalizes the whole matrix (q, k, v apart) and
    keeps its block: the curve is the 1-process one. DP=2 splits the orthogonalizations
    between its ranks and broadcasts the updates; TP=2 x DP=2 does both."""
    base = records(muon_run / "base.jsonl")
    ok(run_train(nproc, *common(stories_tp1, shakespeare, tmp_path, name), *MUON, *flags))
    assert_same_curve(base, records(tmp_path / f"{name}.jsonl"))


def test_muon_resume_reproduces_uninterrupted_run(muon_run, stories_tp1, shakespeare, tmp_path):
    """Resuming the iteration-4 checkpoint restores Muon's momentum and AdamW's moments:
    iterations 5 and 6 are bit-identical to the uninterrupted run's."""
    resume = tmp_path / "resume"
    resume.mkdir()
    shutil.copytree(muon_run / "save" / "iter_0000004", resume / "iter_0000004")
    (resume / "latest_checkpointed_iteration.txt").write_text("4")
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp_path, "resumed"), *MUON,
                 "--load", resume))
    base = {r["iteration"]: r for r in records(muon_run / "base.jsonl")}
    again = records(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in again] == [5, 6]
    for r in again:
        for key in ("loss", "grad_norm", "lr", "batch_checksum"):
            assert r[key] == base[r["iteration"]][key], (key, r)

    # AdamW cannot take over Muon's state, and says so
    proc = run_train(1, *common(stories_tp1, shakespeare, tmp_path, "adam"), "--load", resume)
    assert proc.returncode == 2 and "--optimizer muon" in proc.stderr
    assert "--no-load-optim" in proc.stderr
