"""megatron_prune.train.fusions on one GPU: each fused piece against the unfused code it replaces.

    python bench/fusions_gpu.py --out fusions.json          # bf16, the 1.1B shape, < 60 s (H100)
    python bench/fusions_gpu.py --smoke --out /tmp/f.json   # tiny shapes; runs on the CPU too

At the issue's shape (seq 2048 x micro-batch 8, hidden 2048, 32 heads / 8 groups of 64, FFN 8192):
  rope     megatron's unfused bshd RoPE (`rope_utils._apply_rotary_pos_emb_bshd`, what
           `apply_rotary_pos_emb` runs without TE) vs the compiled one, on q and on k;
  rms_norm torch.nn.RMSNorm as the local spec builds it (fp32 weight, bf16 input: torch's
           composite path) vs FusedRMSNorm; torch's own fused kernel (bf16 weight) for reference;
  wgrad    per linear layer, what megatron does without the fusion (bf16 weight-gradient GEMM,
           then DDP's `main_grad.add_(grad)`) vs the stand-in's single fp32-output addmm;
  swiglu   megatron's compiled SwiGLU backward (the cat of both halves) vs the Triton one
           (swiglu_triton), alone (with its memory rate) and under megatron's forward.
For each: (a) errors of fused and unfused against an fp32 reference from the same bf16 inputs,
forward and backward (the fused error may not exceed the unfused one by more than 5%);
(b) CUDA time per call (CUDA events, median of 3 runs of N calls after warm-up) and kernels
per call (torch.profiler); (c) the time saved per micro-batch over 16 layers. Prints a table,
writes JSON to --out, exits 1 when a correctness check fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune.train import fusions  # noqa: E402

SHAPE = dict(seq=2048, batch=8, hidden=2048, heads=32, groups=8, head_dim=64, ffn=8192)
SMOKE = dict(seq=64, batch=2, hidden=128, heads=4, groups=2, head_dim=32, ffn=256)
LAYERS = 16
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- measuring
def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def ms_per_call(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(3):
        sync()
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append(1000 * (time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def kernels_per_call(fn):
    """CUDA kernels one call launches (None on the CPU)."""
    if DEV != "cuda":
        return None
    fn()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


def errs(fused: torch.Tensor, unfused: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(fused error, unfused error, reference scale), maxima over elements."""
    return max_err(fused, ref), max_err(unfused, ref), ref.float().abs().max().item()


def row(name, what, unfused, fused, calls, **extra):
    """Times and kernel counts of two zero-argument callables."""
    r = {"name": name, "what": what, **extra}
    r["unfused_ms"], r["unfused_kernels"] = ms_per_call(unfused, calls), kernels_per_call(unfused)
    if fused is not None:
        r["fused_ms"], r["fused_kernels"] = ms_per_call(fused, calls), kernels_per_call(fused)
    return r


def checked(errors: dict, factor: float = 1.05) -> dict:
    """{part: errs(...)} -> the errors, and whether the fused one is at most `factor` x the
    unfused one (+ fp32 summation-order noise, 1e-5 of the reference's scale)."""
    out = {"ok": True}
    for part, (fused, unfused, scale) in errors.items():
        out[part] = {"fused": fused, "unfused": unfused}
        out["ok"] &= fused <= factor * unfused + 1e-5 * scale
    return out


# ---------------------------------------------------------------------------- RoPE
def bench_rope(s, calls) -> list:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    seq, b, d = s["seq"], s["batch"], s["head_dim"]
    freqs = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=10000,
                            use_cpu_initialization=True, cp_group=None).get_emb(seq).to(DEV)
    per_group = s["heads"] // s["groups"]
    g = torch.Generator(device=DEV).manual_seed(0)
    # as megatron's attention hands them over: q a copy, k a strided view of the fused QKV
    mixed = torch.randn(seq, b, s["groups"], (per_group + 2) * d, device=DEV, generator=g,
                        dtype=torch.bfloat16)
    rows = []
    for name, t in (("q", mixed[..., :per_group * d].reshape(seq, b, s["heads"], d)),
                    ("k", mixed[..., per_group * d:(per_group + 1) * d])):
        t = t.detach().requires_grad_()
        grad = torch.randn(t.shape, device=DEV, generator=g, dtype=torch.bfloat16)

        def unfused():
            return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)

        def fused():
            return fusions._ROPE(t, *fusions._cos_sin(freqs))

        ref_in = t.detach().float().requires_grad_()
        ref = rope_utils._apply_rotary_pos_emb_bshd(ref_in, freqs)
        (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.float())
        out_u = unfused()
        (grad_u,) = torch.autograd.grad(out_u, t, grad)
        out_f = fused()
        compiled = out_f is not None
        errors = {}
        if compiled:
            (grad_f,) = torch.autograd.grad(out_f, t, grad)
            errors = {"forward": errs(out_f, out_u, ref),
                      "backward": errs(grad_f, grad_u, ref_grad)}

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(), t, grad)

        rows.append(row(f"rope {name} {tuple(t.shape)}", "forward", unfused,
                        fused if compiled else None, calls,
                        check=checked(errors) if compiled else {"ok": False},
                        compiled=compiled))
        rows.append(row(f"rope {name} {tuple(t.shape)}", "forward+backward", fwd_bwd(unfused),
                        fwd_bwd(fused) if compiled else None, calls, per_micro_batch=LAYERS))
    return rows


# ---------------------------------------------------------------------------- RMSNorm
def bench_rms_norm(s, calls) -> list:
    h = s["hidden"]
    g = torch.Generator(device=DEV).manual_seed(1)
    x = (torch.randn(s["seq"], s["batch"], h, device=DEV, generator=g)
         ).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(x.shape, device=DEV, generator=g, dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(h, device=DEV, generator=g)
    torch_norm = torch.nn.RMSNorm(h, eps=1e-5, device=DEV)      # the local spec's: fp32 weight
    fused_norm = fusions.FusedRMSNorm(h, eps=1e-5, device=DEV)
    native = torch.nn.RMSNorm(h, eps=1e-5, device=DEV, dtype=torch.bfloat16)  # torch's fused
    with torch.no_grad():
        for n in (torch_norm, fused_norm, native):
            n.weight.copy_(weight)

    def grads(norm, inp, gr):
        out = norm(inp)
        gx, gw = torch.autograd.grad(out, (inp, norm.weight), gr)
        return out, gx, gw

    ref_in = x.detach().float().requires_grad_()
    ref, ref_gx, ref_gw = grads(torch_norm, ref_in, grad.float())
    out_u, gx_u, gw_u = grads(torch_norm, x, grad)
    fused_norm(x)
    compiled = fusions._RMS_NORM.state == "ok"
    out_f, gx_f, gw_f = grads(fused_norm, x, grad)
    errors = {"forward": errs(out_f, out_u, ref), "backward dx": errs(gx_f, gx_u, ref_gx),
              "backward dweight": errs(gw_f, gw_u, ref_gw)}
    check = checked(errors) if compiled else {"ok": False}  # failed: unfused fallback ran
    rows = []
    name = f"rms_norm {tuple(x.shape)}"
    for what, mk in (("forward", lambda n: (lambda: n(x))),
                     ("forward+backward", lambda n: (lambda: grads(n, x, grad)))):
        r = row(name, what, mk(torch_norm), mk(fused_norm) if compiled else None, calls,
                compiled=compiled, per_micro_batch=2 * LAYERS + 1 if "backward" in what else 0)
        r["torch_bf16_weight_ms"] = ms_per_call(mk(native), calls)
        r["torch_bf16_weight_kernels"] = kernels_per_call(mk(native))
        if what == "forward":
            r["check"] = check
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------- wgrad
def bench_wgrad(s, calls) -> list:
    tokens, h, d = s["seq"] * s["batch"], s["hidden"], s["head_dim"]
    linears = {"linear_qkv": ((s["heads"] + 2 * s["groups"]) * d, h),
               "linear_proj": (h, s["heads"] * d), "linear_fc1": (2 * s["ffn"], h),
               "linear_fc2": (h, s["ffn"])}
    g = torch.Generator(device=DEV).manual_seed(2)
    rows = []
    for name, (out_f, in_f) in linears.items():
        x = torch.randn(tokens, in_f, device=DEV, generator=g, dtype=torch.bfloat16)
        go = (0.01 * torch.randn(tokens, out_f, device=DEV, generator=g)).to(torch.bfloat16)
        start = torch.randn(out_f, in_f, device=DEV, generator=g)
        ref = start + (go.double().t() @ x.double()).float()
        mg_u, mg_f = start.clone(), start.clone()
        mg_u.add_(go.t() @ x)                      # megatron without the fusion + DDP's hook
        fusions.wgrad_gemm_accum(x, go, mg_f)      # the stand-in
        rows.append(row(f"wgrad {name} [{out_f} x {in_f}], {tokens} tokens",
                        "accumulate into fp32 main_grad",
                        lambda: mg_u.add_(go.t() @ x),
                        lambda: fusions.wgrad_gemm_accum(x, go, mg_f), max(3, calls // 4),
                        check=checked({"main_grad": errs(mg_f, mg_u, ref)}),
                        per_micro_batch=LAYERS))
    return rows


# ---------------------------------------------------------------------------- SwiGLU
def bench_swiglu(s, calls) -> list:
    """megatron's SwiGLU (compiled forward, compiled cat backward) vs the Triton backward, on the
    fused linear_fc1 output [tokens, 2 FFN] as the MLP hands it over."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, swiglu_back
    tokens, ffn = s["seq"] * s["batch"], s["ffn"]
    g = torch.Generator(device=DEV).manual_seed(3)
    y = torch.randn(tokens, 2 * ffn, device=DEV, generator=g, dtype=torch.bfloat16)
    grad = torch.randn(tokens, ffn, device=DEV, generator=g, dtype=torch.bfloat16)
    ref = swiglu_back(grad.float(), y.float())
    out_u = swiglu_back(grad, y)
    out_f = fusions._SWIGLU_BACKWARD(grad, y)
    ok = out_f is not None
    name = f"swiglu [{tokens} x {2 * ffn}]"
    moved = 5 * tokens * ffn * y.element_size()  # read gate, up, g; write both halves
    r = row(name, "backward", lambda: swiglu_back(grad, y),
            (lambda: fusions._SWIGLU_BACKWARD(grad, y)) if ok else None, calls,
            # Triton's CPU interpreter (--smoke) casts to bf16 by truncation, a GPU rounds to
            # nearest: up to twice the error there
            check=checked({"backward": errs(out_f, out_u, ref)}, 1.05 if DEV == "cuda" else 2.1)
            if ok else {"ok": False},
            per_micro_batch=LAYERS)
    r["unfused_tb_s"] = moved / r["unfused_ms"] / 1e9
    if ok:
        r["fused_tb_s"] = moved / r["fused_ms"] / 1e9
    if ok and DEV == "cuda":  # the kernel's block size, for the record
        from megatron_prune.train import swiglu_triton as st
        out = torch.empty_like(y)
        grid = lambda b: (tokens, -(-ffn // b))  # noqa: E731
        r["block_ms"] = {b: ms_per_call(lambda: st._kernel(False)[grid(b)](
            grad, y, out, ffn, BLOCK=b), calls) for b in (256, 512, 1024, 2048, 4096)}
        r["block"] = st.BLOCK
    fused_impl = fusions.make_fused_bias_swiglu_impl(bias_swiglu_impl)
    x = y.detach().requires_grad_()

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, None), x, grad)

    fwd = row(name, "forward", lambda: bias_swiglu_impl(x, None), None, calls, same=True)
    fwd["unfused_tb_s"] = 3 * tokens * ffn * y.element_size() / fwd["unfused_ms"] / 1e9
    both = row(name, "forward+backward", fwd_bwd(bias_swiglu_impl),
               fwd_bwd(fused_impl) if ok else None, calls)
    return [r, fwd, both]


# ---------------------------------------------------------------------------- report
def rate(r, which) -> str:
    return f", {r[which + '_tb_s']:.2f} TB/s" if which + "_tb_s" in r else ""


def table(rows) -> str:
    lines = ["| piece | pass | unfused ms (kernels) | fused ms (kernels) | speed-up | "
             "max err fused / unfused |", "|---|---|---|---|---|---|"]
    for r in rows:
        fused = (f"{r['fused_ms']:.3f} ({r['fused_kernels']}){rate(r, 'fused')}"
                 if "fused_ms" in r else "(megatron's)" if r.get("same") else "compile failed")
        speed = f"{r['unfused_ms'] / r['fused_ms']:.2f}x" if "fused_ms" in r else "-"
        chk = r.get("check")
        errs = "; ".join(f"{k} {v['fused']:.2e} / {v['unfused']:.2e}"
                         for k, v in (chk or {}).items() if k != "ok")
        lines.append(f"| {r['name']} {r['what']} | {'' if chk is None else chk['ok']} | "
                     f"{r['unfused_ms']:.3f} ({r['unfused_kernels']}){rate(r, 'unfused')} | "
                     f"{fused} | {speed} | {errs} |")
        if "torch_bf16_weight_ms" in r:
            lines.append(f"| (torch.nn.RMSNorm, bf16 weight: torch's fused kernel) {r['what']} "
                         f"| | {r['torch_bf16_weight_ms']:.3f} "
                         f"({r['torch_bf16_weight_kernels']}) | | | |")
    return "\n".join(lines)


def saving_per_micro_batch(rows) -> float:
    """ms saved per micro-batch (forward + backward of 16 layers)."""
    return sum((r["unfused_ms"] - r["fused_ms"]) * r.get("per_micro_batch", 0)
               for r in rows if "fused_ms" in r)


def environment() -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def megatron_version():
        from megatron.core import package_info
        return package_info.__version__
    return {"device": torch.cuda.get_device_name() if DEV == "cuda" else platform.processor(),
            "torch": torch.__version__, "triton": version("triton"),
            "megatron_core": megatron_version(),
            "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
            "python": platform.python_version(), "fusions_wanted": fusions.wanted(),
            "fp32_out_addmm": fusions.fp32_out_addmm_works(torch.device(
                DEV, torch.cuda.current_device()) if DEV == "cuda" else torch.device("cpu"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--calls", type=int, default=20, help="calls per timing run")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU works too)")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are fp32
    from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
    from megatron_prune.mcore.cpu import cpu_patches
    cpu_patches()  # --smoke on the CPU; nothing with CUDA
    with quiet_megatron_import():  # megatron's expected no-TE/Apex warnings, once
        import megatron.core.models.common.embeddings.rotary_pos_embedding  # noqa: F401
    t0 = time.time()
    env = environment()
    print(json.dumps(env), flush=True)
    s = SMOKE if a.smoke else SHAPE
    rows = []
    for part in (bench_wgrad, bench_rope, bench_rms_norm, bench_swiglu):
        rows += part(s, a.calls)
        print(f"{part.__name__} done at {time.time() - t0:.0f} s", flush=True)
    saved = saving_per_micro_batch(rows)
    ok = all(r["check"]["ok"] for r in rows if r.get("check"))
    text = table(rows) + (f"\n\nsaved per micro-batch ({LAYERS} layers, forward + backward): "
                          f"{saved:.2f} ms; all checks pass: {ok}; {time.time() - t0:.0f} s")
    print(text, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"environment": env, "shape": s, "rows": rows,
                                       "saved_ms_per_micro_batch": saved, "ok": ok},
                                      indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
