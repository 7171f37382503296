"""megatron_prune.train.fusions on the CPU: each fused piece against the megatron-core / torch code
it replaces (fp32, values and gradients), and a real training run with all of them forced on
(inductor's C++ backend stands in for Triton, the wgrad stand-in takes its CPU path) against the
same run with --no-fused-kernels."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_prune.train import fusions

pytest.importorskip("megatron.core")

from test_train import ENV, ROOT, common, ok, records, shakespeare, stories_tp1  # noqa: E402,F401


@pytest.fixture(scope="module")
def rope_utils():
    from megatron_prune.mcore.cpu import cpu_patches
    cpu_patches()
    from megatron.core.models.common.embeddings import rope_utils
    return rope_utils


def megatron_freqs(seq: int, head_dim: int) -> torch.Tensor:
    """The rotary angles GPTModel hands every attention layer: [seq, 1, 1, head_dim], fp32."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    return RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=10000,
                           cp_group=None).get_emb(seq)


def tiny_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **kw)


# ---------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("heads", [8, 2])  # query heads and GQA key groups
def test_rope_equals_megatron_values_and_gradients(rope_utils, heads):
    """The compiled RoPE (and the same function uncompiled) equals megatron's unfused bshd
    rotate-half RoPE in fp32, forward and backward, on a strided view like megatron's q/k."""
    seq, batch, dim = 24, 3, 16
    freqs = megatron_freqs(seq, dim)
    g = torch.Generator().manual_seed(heads)
    t = torch.randn(batch, seq, heads, dim, generator=g).requires_grad_()
    view = t.transpose(0, 1)  # [seq, batch, heads, dim], not contiguous
    grad = torch.randn(seq, batch, heads, dim, generator=g)

    ref = rope_utils._apply_rotary_pos_emb_bshd(view, freqs, rotary_interleaved=False)
    (ref_grad,) = torch.autograd.grad(ref, t, grad)
    compiled = fusions._CompiledOnce(fusions.rope_rotate_half)
    for fn in (fusions.rope_rotate_half, compiled):
        out = fn(view, torch.cos(freqs), torch.sin(freqs))
        (out_grad,) = torch.autograd.grad(out, t, grad)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert compiled.state == "ok"


def test_rope_wrapper_takes_only_the_case_it_covers(rope_utils):
    """megatron's apply_rotary_pos_emb patched: the plain bshd case is computed by the fused
    function (equal to megatron's); interleaved, packed (cu_seqlens), mscale != 1 and partial
    rotary are left to megatron's own code."""
    seq, dim = 10, 8
    freqs = megatron_freqs(seq, dim)
    t = torch.randn(seq, 2, 4, dim)
    config = tiny_config()
    calls = []

    def original(*args, **kwargs):  # megatron's function, recording that it was reached
        calls.append(kwargs)
        return rope_utils._apply_rotary_pos_emb_bshd(args[0], args[1], rotary_interleaved=False)

    fused = fusions.make_fused_apply_rotary_pos_emb(original)
    torch.testing.assert_close(fused(t, freqs, config),
                               rope_utils._apply_rotary_pos_emb_bshd(t, freqs), rtol=1e-6,
                               atol=1e-6)
    assert calls == [] and fused.unfused is original

    assert fusions.rope_fusable(t, freqs, config, None, 1.0)
    assert not fusions.rope_fusable(t, freqs, tiny_config(rotary_interleaved=True), None, 1.0)
    assert not fusions.rope_fusable(t, freqs, config, torch.tensor([0, seq]), 1.0)
    assert not fusions.rope_fusable(t, freqs, config, None, 1.2)
    assert not fusions.rope_fusable(t, freqs[..., :dim // 2], config, None, 1.0)
    fused(t, freqs, config, mscale=1.2)
    assert calls and calls[-1]["mscale"] == 1.2


# ---------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch(dtype):
    """FusedRMSNorm (compiled) equals torch.nn.RMSNorm with the same fp32 weight, for fp32
    inputs and for bf16 inputs (the local spec's mixed case): values and both gradients."""
    hidden, eps = 48, 1e-5
    g = torch.Generator().manual_seed(0)
    ref_norm = torch.nn.RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        ref_norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    fused_norm = torch.nn.Sequential(torch.nn.RMSNorm(hidden, eps=eps))
    fused_norm.load_state_dict({"0.weight": ref_norm.weight.detach().clone()})
    weight = fused_norm[0].weight
    assert fusions.use_fused_rms_norm(fused_norm) == 1
    assert type(fused_norm[0]) is fusions.FusedRMSNorm and fused_norm[0].weight is weight
    assert list(fused_norm.state_dict()) == ["0.weight"]

    x = (0.05 * torch.randn(5, 7, hidden, generator=g)).to(dtype)  # eps matters at this scale
    grad = torch.randn(5, 7, hidden, generator=g).to(dtype)
    outs = []
    for norm in (ref_norm, fused_norm):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        outs.append((y, xi.grad, norm.weight.grad if norm is ref_norm else weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert y1.dtype == y0.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-4)
    if dtype == torch.bfloat16:  # one rounding each: at most one bf16 step apart
        assert ((y1.float() - y0.float()).abs() <= y0.float().abs() * 2 ** -7 + 1e-6).all()


# ---------------------------------------------------------------------------- wgrad
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_stand_in_accumulates_into_main_grad(dtype):
    """The stand-in's `wgrad_gemm_accum_fp32(input, grad_output, main_grad)` (here its CPU path)
    adds exactly grad_output^T @ input to the fp32 main_grad, in place, for 2-D and 3-D inputs."""
    module = fusions._wgrad_module()
    assert module.wgrad_gemm_accum_fp32 is module.wgrad_gemm_accum_fp16
    assert not fusions.fp32_out_addmm_works(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 32, generator=g).to(dtype)     # [s, b, in]
    go = torch.randn(6, 5, 24, generator=g).to(dtype)    # [s, b, out]
    main_grad = torch.randn(24, 32, generator=g)
    want = main_grad.clone()
    want += go.reshape(-1, 24).t().float() @ x.reshape(-1, 32).float()
    ptr = main_grad.data_ptr()
    assert module.wgrad_gemm_accum_fp32(x, go, main_grad) is None
    assert main_grad.data_ptr() == ptr
    torch.testing.assert_close(main_grad, want, rtol=1e-6, atol=1e-5)
    module.wgrad_gemm_accum_fp32(x.reshape(-1, 32), go.reshape(-1, 24), main_grad)
    want += go.reshape(-1, 24).t().float() @ x.reshape(-1, 32).float()
    torch.testing.assert_close(main_grad, want, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("ffn", [40, 2500])  # under one block; three blocks, the last partial
def test_swiglu_backward_kernel(ffn):
    """The Triton backward (here in Triton's CPU interpreter) equals megatron's `swiglu_back` and
    the fp64 gradient in fp32 and, in bf16, is one rounding of the exact gradient at the rounded
    inputs."""
    pytest.importorskip("triton")
    from megatron.core.fusions.fused_bias_swiglu import swiglu_back
    from megatron_prune.train.swiglu_triton import swiglu_backward
    rows = 6
    gen = torch.Generator().manual_seed(ffn)
    y = 3 * torch.randn(rows, 2 * ffn, generator=gen)
    g = torch.randn(rows, ffn, generator=gen)
    y64 = y.double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.nn.functional.silu(y64[:, :ffn]) * y64[:, ffn:], y64,
                                 g.double())
    out = swiglu_backward(g, y)
    torch.testing.assert_close(out, swiglu_back(g, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    bf = swiglu_backward(g.bfloat16(), y.bfloat16())
    assert bf.dtype == torch.bfloat16
    y_bf = y.bfloat16().double().requires_grad_()  # the gradient at the rounded inputs
    (ref_bf,) = torch.autograd.grad(torch.nn.functional.silu(y_bf[:, :ffn]) * y_bf[:, ffn:],
                                    y_bf, g.bfloat16().double())
    # one bf16 step: Triton's CPU interpreter casts to bf16 by truncation (GPUs round to
    # nearest, half a step; bench/fusions_gpu.py checks that against megatron's kernel)
    assert ((bf.double() - ref_bf).abs() <= ref_bf.abs() * 2 ** -7).all()
    with pytest.raises(ValueError, match="does not match"):
        swiglu_backward(g[:, 1:], y)


def test_swiglu_impl_equals_megatron():
    """The patched `bias_swiglu_impl` gives megatron's values and input gradients (fp32, 2-D and
    megatron's 3-D [s, b, 2F]) and passes biased and fp8 calls to megatron's own."""
    pytest.importorskip("triton")
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    calls = []

    def original(*args):
        calls.append(args)
        return bias_swiglu_impl(*args)

    fused = fusions.make_fused_bias_swiglu_impl(original)
    gen = torch.Generator().manual_seed(0)
    for shape in ((10, 96), (5, 2, 96)):
        x = torch.randn(shape, generator=gen)
        grad = torch.randn(*shape[:-1], 48, generator=gen)
        outs = []
        for fn in (bias_swiglu_impl, fused):
            xi = x.clone().requires_grad_()
            y = fn(xi, None)
            y.backward(grad)
            outs.append((y, xi.grad))
        assert outs[1][0].shape == (*shape[:-1], 48)
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)
    assert calls == []
    bias = torch.zeros(96)
    fused(x.reshape(-1, 96), bias)
    fused(x.reshape(-1, 96), None, True)  # fp8 storage of the input
    assert [c[1:3] for c in calls] == [(bias, False), (None, True)]


def test_swiglu_falls_back_to_megatron_when_triton_fails(monkeypatch):
    """A Triton kernel that fails on its first launch warns once, and the backward is
    megatron's from then on (the same gradient)."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    def broken(g, y):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(fusions, "_SWIGLU_BACKWARD", fusions._CompiledOnce(broken, compile=False))
    fused = fusions.make_fused_bias_swiglu_impl(bias_swiglu_impl)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (bias_swiglu_impl, fused, fused):
        xi = x.clone().requires_grad_()
        if len(grads) == 1:
            with pytest.warns(UserWarning, match="compiling broken failed"):
                fn(xi, None).sum().backward()
        else:
            fn(xi, None).sum().backward()
        grads.append(xi.grad)
    assert fusions._SWIGLU_BACKWARD.state == "failed"
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])


# ---------------------------------------------------------------------------- a real run
RUN_SCRIPT = textwrap.dedent("""
    import collections, json, sys
    from megatron_prune.train import fusions

    if __name__ == "__main__":
        fusions.ON_CPU_TOO = True  # as on a GPU without Transformer Engine / Apex
        calls = collections.Counter()
        from megatron_prune.train import loss
        compiled = {"rope": fusions._ROPE, "rms_norm": fusions._RMS_NORM,
                    "swiglu_backward": fusions._SWIGLU_BACKWARD,
                    **{"loss" + k: v for k, v in loss.COMPILED.items()}}

        def counted(name, fn):
            def call(*args):
                calls[name] += 1
                return fn(*args)
            return call

        fusions.wgrad_gemm_accum = counted("wgrad", fusions.wgrad_gemm_accum)
        fusions._ROPE = counted("rope", fusions._ROPE)
        fusions._RMS_NORM = counted("rms_norm", fusions._RMS_NORM)
        fusions._SWIGLU_BACKWARD = counted("swiglu_backward", fusions._SWIGLU_BACKWARD)
        from megatron_prune.train.__main__ import main
        rc = main(sys.argv[1:])
        print("FUSIONS", json.dumps({"calls": calls,
                                     "compiled": {k: v.state for k, v in compiled.items()}}))
        sys.exit(rc)
""")


ITERS = 4  # past the 2 warm-up iterations (suite time: 6 took 64 s for the two runs, 4 take 40)


def test_training_with_fusions_equals_without(stories_tp1, shakespeare, tmp_path):
    """A real 1-process gloo training run (stories260K, fp32, 4 micro-batches of accumulation)
    with every fusion on — megatron's linear layers with gradient_accumulation_fusion through the
    stand-in module, the patched RoPE, FusedRMSNorm, the Triton SwiGLU backward — gives the loss
    curve and grad norms of the same run with --no-fused-kernels (which installs nothing), to
    ~1e-7 (fp32 sum order)."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    stats = {}
    for name, extra in (("off", ["--no-fused-kernels"]), ("on", [])):
        proc = ok(subprocess.run(
            [sys.executable, str(script), *map(str, common(stories_tp1, shakespeare, tmp_path,
                                                            name, iters=ITERS)), *extra],
            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300))
        stats[name] = json.loads(proc.stdout.split("FUSIONS ", 1)[1].splitlines()[0])
    assert stats["off"]["calls"] == {}
    # ITERS iterations x 4 micro-batches through 5 layers: q and k, 2 norms + the final one,
    # 4 linear layers' weight gradients, one SwiGLU backward (Triton's CPU interpreter here)
    n = ITERS * 4
    assert stats["on"]["calls"] == {"rope": n * 5 * 2, "rms_norm": n * 11, "wgrad": n * 5 * 4,
                                    "swiglu_backward": n * 5}
    assert stats["on"]["compiled"] == {"rope": "ok", "rms_norm": "ok", "swiglu_backward": "ok",
                                       "loss_stats": "ok", "loss_sums": "ok", "loss_grad": "ok"}
    assert set(stats["off"]["compiled"].values()) == {"new"}  # the eager loss passes
    off, on = records(tmp_path / "off.jsonl"), records(tmp_path / "on.jsonl")
    assert len(off) == len(on) == ITERS
    for a, b in zip(off, on):
        assert a["batch_checksum"] == b["batch_checksum"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert on[-1]["loss"] < on[0]["loss"] - 0.1  # it trains


def test_no_fused_kernels_flag():
    from megatron_prune.train.arguments import flag_names, parse_args
    assert "--no-fused-kernels" in flag_names()
    assert parse_args([]).model.fused_kernels is True
    assert parse_args(["--no-fused-kernels"]).model.fused_kernels is False
    if not torch.cuda.is_available():
        assert not fusions.wanted()  # the CPU keeps megatron-core's own code
