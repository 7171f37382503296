"""Fused kernels for megatron-core's local layer spec on GPUs without Transformer Engine or Apex.

With TE or Apex, megatron-core fuses three things that the local spec otherwise runs as chains of
small memory-bound kernels (issue #4: together ~30% of an H100 step at the 1.1B shape):

1. **Weight-gradient accumulation into the fp32 `main_grad`.** `gradient_accumulation_fusion`
   makes megatron's linear layers call Apex's `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`
   (`main_grad += grad_output^T @ input`, one GEMM with fp32 output) instead of writing a bf16
   weight gradient that DDP's hook then adds to `main_grad` (a second full pass over it).
   `install()` registers a stand-in module under that name whose function is one cuBLAS call,
   `torch.addmm(main_grad, g^T, x, torch.float32, out=main_grad)` (aten::addmm.dtype_out: bf16
   inputs, fp32 accumulation and output; CUDA only), and tells megatron's `tensor_parallel.layers`
   that the module is there.
2. **RoPE.** megatron's unfused `apply_rotary_pos_emb` (bshd, rotate-half) runs cos, sin, casts,
   two multiplies, chunk, negate, two concatenations and an add per call. The replacement is one
   `torch.compile`d function (inductor: one Triton kernel forward, one backward) over cos/sin
   computed once per forward; it is patched in under the name megatron's attention module calls
   and hands every case it does not cover (packed sequences, interleaved, mscale != 1, partial
   rotary, TE fusion requested) to the original.
3. **RMSNorm.** The local spec's `WrappedTorchNorm` builds `torch.nn.RMSNorm` with fp32 weights
   while the activations are bf16; for mixed dtypes torch's `rms_norm` leaves its fused CUDA kernel
   (`_fused_rms_norm`) for the composite one (torch warns "Mismatch dtype between input and
   weight ... Cannot dispatch to fused implementation", aten/src/ATen/native/layer_norm.cpp;
   the composite runs pow, mean, add, rsqrt, three multiplies and casts, and as many kernels
   again backward). `FusedRMSNorm` is the
   same module (same `weight`, so state dicts do not change) whose forward is one compiled
   kernel with the composite's numerics: fp32 statistics and scaling, one rounding at the end.
4. **SwiGLU's backward.** megatron's fused SwiGLU (`bias_swiglu_impl`, used with
   `bias_activation_fusion`) is compiled forward and backward, but the backward computes a
   `torch.cat` of the two halves' gradients, which inductor turns into a kernel that loads every
   input twice (2.26 TB/s inside a training step on an H100, against the forward's 3.1).
   `swiglu_triton` writes both halves from one load of each input (2.9 TB/s there); the forward
   stays megatron's compiled one. Patched in under the name megatron's MLP calls, for the
   bias-free, non-fp8, non-offloaded case only.

Everything is off unless `wanted()`: CUDA, and neither Transformer Engine nor Apex importable
(`ON_CPU_TOO` lets tests run the same paths on the CPU). If compiling fails at run time (no C
compiler or Triton on the machine), the compiled pieces warn once and call megatron's / torch's
originals from then on.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import types
import warnings
from typing import Optional

import torch

log = logging.getLogger(__name__)

APEX_WGRAD_MODULE = "fused_weight_gradient_mlp_cuda"
ON_CPU_TOO = False  # tests: run the fused paths on the CPU as well (inductor's C++ backend)


def wanted() -> bool:
    """True where these fusions are the fast path: CUDA without Transformer Engine or Apex."""
    if ON_CPU_TOO:
        return True
    if not torch.cuda.is_available():
        return False
    from megatron_prune.mcore.model import have_transformer_engine
    return not have_transformer_engine() and importlib.util.find_spec("apex") is None


class _CompiledOnce:
    """`torch.compile(fn)` (or `fn` itself, `compile=False`: a kernel that compiles on its own,
    like Triton's), compiled on first use. Until a first call has succeeded, a failure (no C
    compiler, no Triton, an unsupported torch) warns once and makes every call return None,
    which tells the caller to run the unfused original instead."""

    def __init__(self, fn, compile: bool = True):
        self.fn, self.compiled, self.state = fn, None, "new"
        self.compile = compile

    def __call__(self, *args) -> Optional[torch.Tensor]:
        if self.state == "ok":
            return self.compiled(*args)
        if self.state == "failed":
            return None
        self.compiled = (torch.compile(self.fn, dynamic=False, fullgraph=True) if self.compile
                         else self.fn)
        try:
            out = self.compiled(*args)
        except Exception as e:  # compile errors come as several exception types
            warnings.warn(f"fusions: compiling {self.fn.__name__} failed ({e!r:.300}); "
                          "using the unfused original")
            self.state = "failed"
            return None
        self.state = "ok"
        return out


# ======================================================================== 1. wgrad into main_grad
@functools.lru_cache(maxsize=None)
def fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether `torch.addmm(acc_fp32, a_bf16, b_bf16, torch.float32, out=acc_fp32)` runs here and
    accumulates correctly (CUDA in recent torch; never on the CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
    b = torch.randn(48, 32, device=device, generator=g).to(torch.bfloat16)
    acc = torch.randn(64, 32, device=device, generator=g)
    want = acc.double() + a.double() @ b.double()  # fp64: immune to allow_tf32
    try:
        torch.addmm(acc, a, b, torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc.double(), want, rtol=1e-3, atol=1e-3))


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in one GEMM that accumulates and writes in acc's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and acc.is_cuda and fp32_out_addmm_works(acc.device):
        torch.addmm(acc, a, b, torch.float32, out=acc)
    else:  # the CPU (no aten::addmm.dtype_out there): upcast the operands
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def wgrad_gemm_accum(input: torch.Tensor, grad_output: torch.Tensor,
                     main_grad: torch.Tensor) -> None:
    """Apex's `wgrad_gemm_accum_fp32/fp16(input, d_output, d_weight)`: d_weight += d_output^T @
    input, in place, returning nothing. Inputs of more than two dimensions are flattened to
    [tokens, features] as Apex does (megatron passes them 2-D already)."""
    x = input.reshape(-1, input.shape[-1])
    g = grad_output.reshape(-1, grad_output.shape[-1])
    addmm_into(main_grad, g.t(), x)


def _wgrad_module() -> types.ModuleType:
    module = types.ModuleType(APEX_WGRAD_MODULE, "Stand-in for Apex's fused_weight_gradient_mlp_"
                              "cuda (megatron_prune.train.fusions): one addmm into main_grad.")
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum
    module.is_stand_in = True
    return module


def install_wgrad_fusion() -> bool:
    """Make `gradient_accumulation_fusion=True` usable with megatron's local linear layers.

    Registers the stand-in (unless a real module of that name imports) and, as megatron's
    `tensor_parallel.layers` resolved `import fused_weight_gradient_mlp_cuda` when it was
    imported (usually before this runs), sets its module-level name and its
    `_grad_accum_fusion_available` flag, which its linear layers check at construction.
    On CUDA, only when the fp32-output addmm works there (else there is nothing to gain).
    """
    if torch.cuda.is_available() and not ON_CPU_TOO and not fp32_out_addmm_works(
            torch.device("cuda", torch.cuda.current_device())):
        log.warning("fusions: torch.addmm with out_dtype=float32 is unavailable on this torch; "
                    "weight-gradient accumulation stays unfused")
        return False
    module = sys.modules.get(APEX_WGRAD_MODULE)
    if module is None:
        try:
            module = importlib.import_module(APEX_WGRAD_MODULE)
        except ImportError:
            module = sys.modules[APEX_WGRAD_MODULE] = _wgrad_module()
    from megatron.core.tensor_parallel import layers
    layers.fused_weight_gradient_mlp_cuda = module
    layers._grad_accum_fusion_available = True
    return True


# ============================================================================ 2. RoPE
def rope_rotate_half(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin for t [s, b, h, d] and cos/sin [s, 1|b, 1, d] (fp32),
    rotate_half(x) = [-x2, x1]: megatron's `_apply_rotary_pos_emb_bshd` (non-interleaved, full
    rotary, mscale 1), computed in fp32 and rounded once to t's dtype."""
    x = t.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(t.dtype)


_ROPE = _CompiledOnce(rope_rotate_half)
_cos_sin_cache: list = []  # [(freqs, its version, cos, sin)]: the running forward's angles


def _cos_sin(freqs: torch.Tensor):
    """cos/sin of the rotary angles, once per forward: every layer's q and k get the same
    `freqs` tensor from GPTModel (kept alive here, so identity is a safe key)."""
    if _cos_sin_cache:
        f, version, cos, sin = _cos_sin_cache[0]
        if f is freqs and version == freqs._version:
            return cos, sin
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    _cos_sin_cache[:] = [(freqs, freqs._version, cos, sin)]
    return cos, sin


def rope_fusable(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens, mscale) -> bool:
    """The case `rope_rotate_half` covers; everything else goes to megatron's own code."""
    return (cu_seqlens is None and mscale == 1.0 and not config.apply_rope_fusion
            and not config.rotary_interleaved and not config.multi_latent_attention
            and t.dim() == 4 and freqs.dim() == 4 and freqs.dtype == torch.float32
            and freqs.shape[0] == t.shape[0] and freqs.shape[-1] == t.shape[-1]
            and t.shape[-1] % 2 == 0)


def make_fused_apply_rotary_pos_emb(original):
    """megatron's `apply_rotary_pos_emb(t, freqs, config, cu_seqlens, mscale, cp_group)` with
    the common case compiled and every other case (or a failed compile) passed to `original`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if rope_fusable(t, freqs, config, cu_seqlens, mscale):
            out = _ROPE(t, *_cos_sin(freqs))
            if out is not None:
                return out
        return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                        cp_group=cp_group)

    apply_rotary_pos_emb.unfused = original
    return apply_rotary_pos_emb


def install_rope_fusion() -> bool:
    """Patch the name megatron's attention module calls (it imported the function by name)."""
    from megatron.core.transformer import attention
    if not hasattr(attention.apply_rotary_pos_emb, "unfused"):
        attention.apply_rotary_pos_emb = make_fused_apply_rotary_pos_emb(
            attention.apply_rotary_pos_emb)
    return True


# ============================================================================ 3. RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's composite rms_norm: x / sqrt(mean(x^2) + eps) * weight over the last dimension,
    in fp32, rounded once to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


_RMS_NORM = _CompiledOnce(rms_norm)


class FusedRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameter, same numerics) whose forward is one compiled kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.eps is not None and len(self.normalized_shape) == 1:
            out = _RMS_NORM(x, self.weight, float(self.eps))
            if out is not None:
                return out
        return super().forward(x)


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Replace every torch.nn.RMSNorm in a built model (the layers' norms and the final one,
    which megatron's TransformerBlock builds outside the layer spec) by a FusedRMSNorm holding
    the same weight Parameter. Call before wrapping in DDP. Returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.RMSNorm:
                continue
            fused = FusedRMSNorm(child.normalized_shape, eps=child.eps,
                                 elementwise_affine=child.elementwise_affine, device="meta")
            fused.weight = child.weight
            setattr(parent, name, fused)
            n += 1
    return n


# ============================================================================ 4. SwiGLU
def triton_swiglu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`swiglu_triton.swiglu_backward`, imported on first use (Triton is optional)."""
    from megatron_prune.train.swiglu_triton import swiglu_backward
    return swiglu_backward(g, y)


_SWIGLU_BACKWARD = _CompiledOnce(triton_swiglu_backward, compile=False)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of y = [gate | up] ([rows, 2F]): megatron's compiled forward, the
    one-pass Triton backward (megatron's backward where that is unavailable)."""

    @staticmethod
    def forward(ctx, y):
        from megatron.core.fusions.fused_bias_swiglu import swiglu
        ctx.save_for_backward(y)
        return swiglu(y)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        dy = _SWIGLU_BACKWARD(g, y)
        if dy is None:
            from megatron.core.fusions.fused_bias_swiglu import swiglu_back
            dy = swiglu_back(g, y)
        return dy


def make_fused_bias_swiglu_impl(original):
    """megatron's `bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input)` with the
    bias-free case going through `SwiGLU`; biases, fp8 storage and activation offloading go to
    `original`."""

    @functools.wraps(original)
    def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
        if bias is None and not fp8_input_store and not cpu_offload_input and \
                input.dim() in (2, 3):
            out = SwiGLU.apply(input.reshape(-1, input.shape[-1]))
            return out.view(*input.shape[:-1], -1)
        return original(input, bias, fp8_input_store, cpu_offload_input)

    bias_swiglu_impl.unfused = original
    return bias_swiglu_impl


def install_swiglu_fusion() -> bool:
    """Patch the name megatron's MLP calls (it imported the function by name). The MLP calls it
    only with `bias_activation_fusion` on (the default on CUDA)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from megatron.core.transformer import mlp
    if not hasattr(mlp.bias_swiglu_impl, "unfused"):
        mlp.bias_swiglu_impl = make_fused_bias_swiglu_impl(mlp.bias_swiglu_impl)
    return True


# ============================================================================ all of them
_INSTALLED: dict = {}


def install() -> dict:
    """Install the process-wide pieces once (wgrad stand-in, RoPE and SwiGLU patches); returns
    which are on: {"wgrad": bool, "rope": bool, "rms_norm": bool, "swiglu": bool}. `rms_norm` is
    applied per model by `use_fused_rms_norm`. Call only where `wanted()`."""
    if not _INSTALLED:
        _INSTALLED.update(wgrad=install_wgrad_fusion(), rope=install_rope_fusion(),
                          rms_norm=True, swiglu=install_swiglu_fusion())
        log.info("fused kernels (no Transformer Engine / Apex): %s",
                 ", ".join(k for k, on in _INSTALLED.items() if on) or "none")
    return dict(_INSTALLED)
