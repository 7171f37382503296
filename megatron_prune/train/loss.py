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
from typing import Optional

import torch
import torch.distributed as dist

from .fusions import addmm_into


@dataclass(frozen=True)
class LossSpec:
    vocab_start: int          # first vocab id of this TP rank's shard
    real_rows: int            # rows of this shard that are real tokens (the rest is padding)
    chunk_tokens: int = 2048
    kd_alpha: float = 1.0
    temperature: float = 1.0
    group: Optional[object] = None  # TP process group (None: TP = 1)


def _all_reduce(t: torch.Tensor, op, group):
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _row_max(z: torch.Tensor) -> torch.Tensor:
    if z.shape[-1] == 0:
        return torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    return z.max(dim=-1).values


class _FusedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, mask, spec):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_tok, _ = hidden.shape
        rows = spec.real_rows
        w = weight[:rows]
        kd = teacher_hidden is not None
        alpha = spec.kd_alpha if kd else 0.0
        temp = spec.temperature
        wt = teacher_weight[:rows] if kd else None
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(rows, hidden.shape[1], dtype=torch.float32,
                             device=hidden.device) if need_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros_like(loss_sum)
        kd_sum = torch.zeros_like(loss_sum)
        mask = mask.float()
        for s in range(0, n_tok, spec.chunk_tokens):
            e = min(s + spec.chunk_tokens, n_tok)
            hc, mc = hidden[s:e], mask[s:e]
            # At most four [chunk, rows] fp32 buffers live at once (z, p; zt, pt with KD);
            # everything else is done in place.
            z = (hc @ w.t()).float()                                   # [c, rows]
            local = labels[s:e] - spec.vocab_start
            mine = (local >= 0) & (local < rows)
            target = torch.zeros_like(mc)
            if rows:
                picked = z.gather(1, local.clamp(0, rows - 1).unsqueeze(1)).squeeze(1)
                target = torch.where(mine, picked, target)
            if kd:
                zt = (teacher_hidden[s:e] @ wt.t()).float().div_(temp)
                maxes = _all_reduce(torch.stack([_row_max(z), _row_max(zt)]),
                                    dist.ReduceOp.MAX, spec.group)
                m, mt = maxes[0], maxes[1]
            else:
                m = _all_reduce(_row_max(z), dist.ReduceOp.MAX, spec.group)
            if not kd:
                p = z.sub_(m.unsqueeze(1)).exp_()                      # z's buffer, unnormalised
                s_p, target = _all_reduce(torch.stack([p.sum(1), target]), dist.ReduceOp.SUM,
                                          spec.group)
                q = None
            else:
                p = torch.exp(z - m.unsqueeze(1))
                pt = torch.exp(zt - mt.unsqueeze(1))
                parts = [p.sum(1), target, pt.sum(1)]
                if temp != 1.0:
                    q = torch.exp(z.div_(temp).sub_((m / temp).unsqueeze(1)))  # softmax(z/T)
                    parts.append(q.sum(1))
                sums = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, spec.group)
                s_p, target, s_t = sums[0], sums[1], sums[2]
            lse = m + torch.log(s_p)
            ce = lse - target
            p.div_(s_p.unsqueeze(1))                                   # softmax(z)
            tok_loss = ce * (1.0 - alpha)
            if kd:
                pt.div_(s_t.unsqueeze(1))                              # softmax(zt / T)
                log_pt = zt.sub_((mt + torch.log(s_t)).unsqueeze(1))
                if temp == 1.0:
                    q, log_q = p, z.sub_(lse.unsqueeze(1))             # log softmax(z)
                else:
                    s_q = sums[3]
                    q.div_(s_q.unsqueeze(1))
                    log_q = z.sub_(torch.log(s_q).unsqueeze(1))       # z/T - m/T - log s_q
                # KL = sum pt (log pt - log q): log pt is finite, so 0 * log pt = 0
                kl = _all_reduce(log_pt.sub_(log_q).mul_(pt).sum(1), dist.ReduceOp.SUM,
                                 spec.group)
                del log_pt, log_q, z, zt
                kd_tok = temp * temp * kl
                tok_loss = tok_loss + alpha * kd_tok
                kd_sum += (kd_tok * mc).sum()
            loss_sum += (tok_loss * mc).sum()
            ce_sum += (ce * mc).sum()
            if need_grad:
                # d ce / dz = softmax(z) - onehot;  d (T^2 KL) / dz = T (softmax(z/T) - pt)
                if not kd:
                    g = p
                elif temp == 1.0:   # q is p: (1 - a) p + a (p - pt) = p - a pt
                    g = p.sub_(pt, alpha=alpha)
                else:
                    g = q.sub_(pt).mul_(alpha * temp)
                    if alpha != 1.0:
                        g.add_(p, alpha=1.0 - alpha)
                if alpha != 1.0 and rows:
                    hit = mine.nonzero().squeeze(1)
                    g[hit, local[hit]] -= 1.0 - alpha
                g.mul_(mc.unsqueeze(1))
                g = g.to(hidden.dtype)
                grad_h[s:e] = g @ w
                addmm_into(grad_w, g.t(), hc)   # fp32 accumulation, no bf16 chunk partials
                del g
            del p
        ctx.spec = spec
        ctx.save_for_backward(grad_h, grad_w, weight)
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
