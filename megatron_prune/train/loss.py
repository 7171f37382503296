"""Output layer + cross-entropy (+ logit distillation), fused over token chunks, vocab-parallel.

The model's last stage returns hidden states (its output layer is bypassed, see `model.py`);
`fused_output_loss` multiplies them by this TP rank's vocab shard of the output weight one chunk
of tokens at a time and computes, per token,

    LM loss   ce  = logsumexp(z) - z[label]
    KD loss   kd  = T^2 * KL(softmax(zt / T) || softmax(z / T))        (with a teacher)
    loss          = alpha * kd + (1 - alpha) * ce                       (alpha = 1 without KD: ce)

with every softmax taken across the TP ranks' vocab shards by all-reducing the per-token max and
the sums (never gathering the vocab). The gradients w.r.t. the hidden states and the weight are
computed in the same pass (the loss is a sum, so the backward only scales them), so neither the
[tokens x vocab] logits nor their softmax exist beyond one chunk. Megatron's vocab padding rows
are left out of every softmax (they are no tokens), which also makes the loss that of the
exported Hugging Face model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_prune.train.fusions import _CompiledOnce, addmm_into


@dataclass(frozen=True)
class LossSpec:
    vocab_start: int          # first vocab id of this TP rank's shard
    real_rows: int            # rows of this shard that are real tokens (the rest is padding)
    chunk_tokens: int = 2048
    kd_alpha: float = 1.0
    temperature: float = 1.0
    group: Optional[object] = None  # TP process group (None: TP = 1)
    compiled: bool = False    # the per-chunk passes through torch.compile (CUDA fast path)


def _reduced(op, group, *ts):
    """`ts` all-reduced over the TP group in one call (None stays None; no group: as given)."""
    if group is None:
        return ts
    live = torch.stack([t for t in ts if t is not None])
    dist.all_reduce(live, op=op, group=group)
    out = iter(live.unbind())
    return tuple(None if t is None else next(out) for t in ts)


# ------------------------------------------------------------------ the three per-chunk passes
# Each pass reads the chunk's bf16 logits once; between passes the per-token statistics are
# all-reduced over TP. On CUDA (`LossSpec.compiled`) each pass is one `torch.compile`d
# function, which inductor turns into one or two Triton kernels that upcast in registers, so no
# [chunk x vocab] fp32 tensor is ever written; elsewhere they run eagerly (same math).

def _stats(z, zt, local, mine, temp: float):
    """Per token: the max logit, the label's logit (0 where another rank holds the label), and
    the teacher's max of zt / T (-inf on a shard of padding rows only)."""
    if z.shape[1] == 0:
        m = torch.full(z.shape[:1], float("-inf"), device=z.device)
        return m, torch.zeros_like(m), (m.clone() if zt is not None else None)
    zf = z.float()
    picked = zf.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    mt = (zt.float() / temp).amax(1) if zt is not None else None
    return zf.amax(1), torch.where(mine, picked, 0.0), mt


def _sums(z, zt, m, mt, temp: float):
    """Per token: sum exp(z - m); with a teacher also sum exp(zt/T - mt) and, for T != 1,
    sum exp(z/T - m/T)."""
    zf = z.float()
    s_p = torch.exp(zf - m.unsqueeze(1)).sum(1)
    if zt is None:
        return s_p, None, None
    s_t = torch.exp(zt.float() / temp - mt.unsqueeze(1)).sum(1)
    s_q = torch.exp((zf - m.unsqueeze(1)) / temp).sum(1) if temp != 1.0 else None
    return s_p, s_t, s_q


def _grad(z, zt, lse, lse_t, lse_q, local, mine, mask, alpha: float, temp: float,
          want_grad: bool):
    """d loss / d z for the chunk (in z's dtype; None unless want_grad), and this rank's part
    of the per-token KL(pt || q), where p = softmax(z), pt = softmax(zt/T), q = softmax(z/T):

        d ce / dz = p - onehot,   d (T^2 KL) / dz = T (q - pt)."""
    zf = z.float()
    p = torch.exp(zf - lse.unsqueeze(1))
    kl, g = None, None
    if zt is not None:
        log_pt = zt.float() / temp - lse_t.unsqueeze(1)
        pt = torch.exp(log_pt)
        log_q = zf / temp - lse_q.unsqueeze(1)
        kl = (pt * (log_pt - log_q)).sum(1)
        if want_grad:
            g = (torch.exp(log_q) - pt) * (alpha * temp) + p * (1.0 - alpha)
    elif want_grad:
        g = p
    if want_grad:
        if alpha != 1.0:
            cols = torch.arange(z.shape[1], device=z.device)
            hit = (cols.unsqueeze(0) == local.unsqueeze(1)) & mine.unsqueeze(1)
            g = g - hit.to(g.dtype) * (1.0 - alpha)
        g = (g * mask.unsqueeze(1)).to(z.dtype)
    return g, kl


class _FusedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, mask, spec):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows, kd = spec.real_rows, teacher_hidden is not None
        alpha = spec.kd_alpha if kd else 0.0
        w, wt = weight[:rows], (teacher_weight[:rows] if kd else None)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(rows, hidden.shape[1], dtype=torch.float32,
                             device=hidden.device) if need_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)  # loss, ce, kd
        mask = mask.float()
        run = _FAST if spec.compiled else _EAGER
        for s in range(0, hidden.shape[0], spec.chunk_tokens):
            e = min(s + spec.chunk_tokens, hidden.shape[0])
            hc, mc = hidden[s:e], mask[s:e]
            z = hc @ w.t()                        # [c, rows] in the weights' dtype, as megatron
            zt = teacher_hidden[s:e] @ wt.t() if kd else None
            local = labels[s:e] - spec.vocab_start
            mine = (local >= 0) & (local < rows)
            g, tok = _chunk(run, spec, z, zt, local, mine, mc, alpha, need_grad)
            sums += torch.stack([(t * mc).sum() for t in tok])
            if need_grad:
                grad_h[s:e] = g @ w
                addmm_into(grad_w, g.t(), hc)   # fp32 accumulation, no bf16 chunk partials
        ctx.save_for_backward(grad_h, grad_w, weight)
        loss_sum, ce_sum, kd_sum = sums.unbind()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss_sum, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kd):
        grad_h, grad_w, weight = ctx.saved_tensors
        gh = gw = None
        if grad_h is not None:
            gh = grad_h * grad_loss.to(grad_h.dtype)
            gw = _weight_grad(weight, grad_w, grad_loss)
        return gh, gw, None, None, None, None, None


def _chunk(run, spec, z, zt, local, mine, mask, alpha, need_grad):
    """One chunk: the logits' gradient (None unless need_grad) and the per-token
    (loss, ce, kd), with every softmax taken over the TP ranks' vocab shards."""
    temp, group = spec.temperature, spec.group
    m, target, mt = run.stats(z, zt, local, mine, temp)
    m, mt = _reduced(dist.ReduceOp.MAX, group, m, mt)
    s_p, s_t, s_q = run.sums(z, zt, m, mt, temp)
    s_p, target, s_t, s_q = _reduced(dist.ReduceOp.SUM, group, s_p, target, s_t, s_q)
    lse = m + torch.log(s_p)
    ce = lse - target
    lse_t = mt + torch.log(s_t) if zt is not None else None
    lse_q = m / temp + torch.log(s_q) if s_q is not None else lse
    g, kl = run.grad(z, zt, lse, lse_t, lse_q, local, mine, mask, alpha, temp, need_grad)
    if zt is None:
        return g, (ce, ce, torch.zeros_like(ce))
    kd_tok = temp * temp * _reduced(dist.ReduceOp.SUM, group, kl)[0]
    return g, (alpha * kd_tok + (1.0 - alpha) * ce, ce, kd_tok)


@dataclass(frozen=True)
class _Passes:
    stats: Callable
    sums: Callable
    grad: Callable


_EAGER = _Passes(_stats, _sums, _grad)


# one compiled function per pass (each compiles on first use, for the chunk shapes it meets)
COMPILED = {fn.__name__: _CompiledOnce(fn) for fn in (_stats, _sums, _grad)}


def _or_eager(fn):
    """The compiled `fn`, or `fn` itself where compiling failed (`_CompiledOnce` warns once)."""
    compiled = COMPILED[fn.__name__]

    def call(*args):
        out = compiled(*args)
        return fn(*args) if out is None else out
    return call


_FAST = _Passes(_or_eager(_stats), _or_eager(_sums), _or_eager(_grad))


def _weight_grad(weight: torch.Tensor, grad_w: torch.Tensor, grad_loss: torch.Tensor):
    """The output weight's gradient from its fp32 accumulator `grad_w` (real rows only).

    Under megatron's DDP the weight has an fp32 `main_grad`: the gradient goes straight into it,
    as megatron's linear layers do with gradient-accumulation fusion, and the weight is flagged
    `grad_added_to_main_grad` so that DDP's hook does not add the returned (unfilled) tensor
    again. Otherwise the gradient comes back in the weight's dtype, as autograd expects. The
    first path skips rounding the gradient to bf16 and a second pass over it."""
    rows = grad_w.shape[0]
    main = getattr(weight, "main_grad", None)
    if main is not None and hasattr(weight, "grad_added_to_main_grad"):
        main[:rows].addcmul_(grad_w, grad_loss.to(main.dtype))
        weight.grad_added_to_main_grad = True
        zero = getattr(weight, "zero_out_wgrad", False)
        return (torch.zeros_like if zero else torch.empty_like)(weight)
    gw = torch.zeros_like(weight)
    gw[:rows] = (grad_w * grad_loss).to(weight.dtype)
    return gw


def fused_output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor, spec: LossSpec,
                      teacher_hidden: Optional[torch.Tensor] = None,
                      teacher_weight: Optional[torch.Tensor] = None):
    """(loss_sum, ce_sum, kd_sum) over the tokens of `hidden` [..., h] (masked by loss_mask).

    `hidden` must already be replicated on the TP ranks with the right backward (see
    `model.output_hidden`); `weight` is this rank's vocab shard [V/TP, h]. Only `loss_sum`
    carries gradients; the other two are for logging.
    """
    h = hidden.shape[-1]
    th = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    return _FusedOutputLoss.apply(hidden.reshape(-1, h), weight, th, teacher_weight,
                                  labels.reshape(-1), loss_mask.reshape(-1), spec)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   teacher_logits: Optional[torch.Tensor] = None, kd_alpha: float = 1.0,
                   temperature: float = 1.0):
    """The same per-token loss from full logits [..., V] (tests and small models)."""
    import torch.nn.functional as F
    logits = logits.float().reshape(-1, logits.shape[-1])
    mask = loss_mask.reshape(-1).float()
    ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none")
    if teacher_logits is None:
        return (ce * mask).sum(), (ce * mask).sum(), torch.zeros(())
    t = temperature
    lt = F.log_softmax(teacher_logits.float().reshape(-1, logits.shape[-1]) / t, -1)
    ls = F.log_softmax(logits / t, -1)
    kd = t * t * (lt.exp() * (lt - ls)).sum(-1)
    loss = kd_alpha * kd + (1 - kd_alpha) * ce
    return (loss * mask).sum(), (ce * mask).sum(), (kd * mask).sum()
