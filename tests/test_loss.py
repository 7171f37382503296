"""The fused output layer + loss (`megatron_prune.train.loss`) beyond its full-logits check in
test_train.py: its compiled passes (the CUDA fast path; inductor's C++ backend stands in for
Triton here) against the eager ones, and vocab-parallel TP=2 over gloo against TP=1, for the
loss and both gradients."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_prune.train import loss as L

# (teacher?, kd_alpha, temperature): CE alone, then KD with a temperature mixed with CE, which
# between them take every branch of the passes
CASES = [(False, 0.0, 1.0), (True, 0.5, 2.0), (True, 1.0, 1.0)]


def inputs(dtype, kd, n=64, h=32, vocab=100, padded=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(padded, h, generator=g) * 0.3).to(dtype)
    w[vocab:] = 0
    th = torch.randn(n, h, generator=g).to(dtype) if kd else None
    tw = (torch.randn(padded, h, generator=g) * 0.3).to(dtype) if kd else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.2).float()
    return hid, w, th, tw, labels, mask


def run(hid, w, th, tw, labels, mask, spec, scale=1.3):
    """(loss, ce, kd) and the gradients of scale * loss w.r.t. hidden and weight."""
    hid, w = hid.clone().requires_grad_(), w.clone().requires_grad_()
    out = L.fused_output_loss(hid, w, labels, mask, spec, th, tw)
    (scale * out[0]).backward()
    return [o.item() for o in out], hid.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32,  # (bf16, the GPU's case: slow on CPUs)
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_compiled_passes_equal_eager(dtype):
    """The compiled passes give the eager passes' loss and gradients: bit for bit in bf16 (the
    gradient is rounded to bf16 in both), to fp32 summation order in fp32."""
    for kd, alpha, temp in CASES:
        args = inputs(dtype, kd)
        got = {}
        for compiled in (False, True):
            spec = L.LossSpec(vocab_start=0, real_rows=100, chunk_tokens=32, kd_alpha=alpha,
                              temperature=temp, compiled=compiled)
            got[compiled] = run(*args, spec)
        (eager, gh, gw), (comp, ch, cw) = got[False], got[True]
        assert comp == pytest.approx(eager, rel=1e-6, abs=1e-6)
        tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ch, gh, **tol)
        torch.testing.assert_close(cw, gw, **tol)
        assert cw[100:].abs().max() == 0  # padding rows are no tokens
    assert {k: c.state for k, c in L.COMPILED.items()} == dict.fromkeys(L.COMPILED, "ok")


def _tp_worker(rank, world, init, vocab, padded, case, compiled, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    kd, alpha, temp = case
    hid, w, th, tw, labels, mask = inputs(torch.float32, kd, vocab=vocab, padded=padded)
    shard = padded // world
    rows = max(0, min(vocab - rank * shard, shard))  # the last shard may be all padding
    spec = L.LossSpec(vocab_start=rank * shard, real_rows=rows, chunk_tokens=24, kd_alpha=alpha,
                      temperature=temp, group=dist.group.WORLD, compiled=compiled)
    sl = slice(rank * shard, (rank + 1) * shard)
    sums, gh, gw = run(hid, w[sl], th, None if tw is None else tw[sl], labels, mask, spec)
    # the hidden states are replicated over TP: their gradient is the ranks' sum, as megatron's
    # copy-to-TP region all-reduces it in the backward
    dist.all_reduce(gh)
    parts = [torch.empty_like(gw) for _ in range(world)]
    dist.all_gather(parts, gw)
    if rank == 0:
        torch.save((sums, gh, torch.cat(parts)), out)
    dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=["ce", "kd-t2-mixed", "kd"])
@pytest.mark.parametrize("vocab", [100, 40])  # 40 of 128 rows: TP rank 1 holds padding only
def test_tp2_equals_tp1(tmp_path, case, vocab):
    """Vocab-parallel TP=2 (softmax statistics all-reduced over gloo) gives TP=1's loss, ce and
    kd sums and both gradients, to fp32 summation order."""
    padded = 128
    out = tmp_path / "tp2.pt"
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_tp_worker, args=(2, init, vocab, padded, case, False, str(out)), nprocs=2)
    sums2, gh2, gw2 = torch.load(out)
    kd, alpha, temp = case
    spec = L.LossSpec(vocab_start=0, real_rows=vocab, chunk_tokens=24, kd_alpha=alpha,
                      temperature=temp)
    sums1, gh1, gw1 = run(*inputs(torch.float32, kd, vocab=vocab, padded=padded), spec)
    assert sums2 == pytest.approx(sums1, rel=1e-6, abs=1e-5)
    torch.testing.assert_close(gh2, gh1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw2, gw1, rtol=1e-5, atol=1e-6)
    assert gw2[vocab:].abs().max() == 0
