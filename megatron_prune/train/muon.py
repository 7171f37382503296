"""Muon for the transformer's weight matrices, AdamW for everything else, in one torch optimizer.

Muon (Jordan et al., 2024; "Muon is Scalable for LLM Training", Liu et al., 2025) replaces the
update of a 2-D weight by the orthogonalized momentum: the nearest semi-orthogonal matrix, found
by a few Newton-Schulz iterations. Embeddings, the output layer and norms stay on AdamW, as both
papers do. The update is scaled to an RMS of `0.2 * extra_scale` whatever the matrix's shape
(Liu et al.), so Muon and AdamW share one learning rate and one schedule.

Tensor parallelism: a weight's TP shard is only a block of its matrix, and orthogonalizing the
blocks is not orthogonalizing the matrix. So a sharded update is gathered over the TP group,
orthogonalized whole, and each rank keeps its own block: TP=2 steps as TP=1 does. Fused QKV is
split into its q, k and v matrices first (`layout.unfuse`), each orthogonalized on its own; the
fused gate/up of SwiGLU is orthogonalized as one matrix, which a TP gather only permutes by rows
and orthogonalization commutes with that.

Newton-Schulz is matmul-bound at scale (0.94 s per step for a 1.1B model in fp32 on an H200,
bench/muon_step.py), so it runs at `fp32_matmul_prec` (torch's fp32 matmul precision, set
around it only; the trainer passes `--muon-fp32-matmul-prec`, default medium, while the class
defaults to fp32, the definition the tests compare with).

The optimizer needs whole matrices, so megatron-core's distributed optimizer (flat shards of all
parameters over DP ranks) cannot drive it; every DP rank steps the same all-reduced gradients.
The Newton-Schulz work is split over DP instead: each matrix is orthogonalized on one DP rank
and its update broadcast to the others.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig

# The quintic Newton-Schulz coefficients of Jordan et al.: they push every singular value of the
# normalized matrix into roughly [0.7, 1.2] in five steps, which is all Muon needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
RMS_TARGET = 0.2   # AdamW's typical update RMS (Liu et al.): Muon then takes AdamW's LR
MATRIX_SPECS = (layout.QKV, layout.PROJ, layout.FC1, layout.FC2)
# whole (TP-gathered) matrices held at once, in elements: 2^27 fp32 = 512 MiB, a few layers of
# a 70B model, all of a small one; batches of one shape are also cut at this size
PENDING_ELEMENTS = 1 << 27


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with `g`'s singular vectors (U V^T), in fp32;
    `g` may be a batch of matrices of one shape (..., rows, cols)."""
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    # all singular values <= 1, where the iteration converges
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def orthogonalize_all(mats: list, steps: int = 5) -> list:
    """`orthogonalize` of each matrix, those of one shape in one batch: a model's layers share
    a few shapes, so a step takes a handful of batched matmul chains, not one per matrix."""
    by_shape: dict = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out = [None] * len(mats)
    for shape, idx in by_shape.items():
        per_batch = max(1, PENDING_ELEMENTS // math.prod(shape))
        for k in range(0, len(idx), per_batch):
            chunk = idx[k:k + per_batch]
            done = orthogonalize(torch.stack([mats[i] for i in chunk]), steps)
            for i, o in zip(chunk, done.unbind(0)):
                out[i] = o
    return out


def matrix_role(name: str) -> Optional[str]:
    """'qkv' for a fused QKV weight, 'matrix' for another transformer-layer weight Muon steps,
    None for what stays on AdamW (embeddings, output layer, norms, biases)."""
    spec = layout.layer_spec_of(name)
    if spec not in MATRIX_SPECS:
        return None
    return "qkv" if spec is layout.QKV else "matrix"


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameters whose role is 'matrix' or 'qkv' (`matrix_role`), AdamW for the
    rest. `roles[g][i]` is the role of `param_groups[g]["params"][i]`: roles go by position,
    because megatron's mixed-precision wrapper swaps the parameters for fp32 copies in place,
    and megatron matches checkpointed groups by their `wd_mult`/`lr_mult`, so the groups stay
    the usual two (with and without weight decay). The scheduler sets each group's `lr` and
    `weight_decay`; weight decay is decoupled (p *= 1 - lr * wd) in both."""

    def __init__(self, groups, roles, *, cfg: ModelConfig, lr: float, weight_decay: float,
                 betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = False, ns_steps: int = 5, extra_scale: float = 1.0,
                 split_qkv: bool = True, fp32_matmul_prec: str = "highest", tp_group=None,
                 dp_group=None):
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        if [len(g["params"]) for g in self.param_groups] != [len(r) for r in roles]:
            raise ValueError("MuonAdamW: one role per parameter of every group")
        self.roles = [list(r) for r in roles]
        self.cfg, self.momentum, self.nesterov = cfg, momentum, nesterov
        self.ns_steps, self.extra_scale = ns_steps, extra_scale
        self.split_qkv, self.tp_group, self.dp_group = split_qkv, tp_group, dp_group
        self.fp32_matmul_prec = fp32_matmul_prec
        self._load: list = []  # Newton-Schulz work given to each DP rank in this step

    @torch.no_grad()
    def step(self, closure=None):
        self._load = [0] * self._dp_size()
        muon = []
        for group, roles in zip(self.param_groups, self.roles):
            for p, role in zip(group["params"], roles):
                if p.grad is None:
                    continue
                if role is None:
                    self._adamw(p, group)
                else:
                    muon.append((p, group, role == "qkv", self._momentum_update(p)))
        if muon:
            self._muon_steps(muon)

    def _decay(self, p, group) -> None:
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _adamw(self, p, group) -> None:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        b1, b2 = group["betas"]
        st["step"] += 1
        g = p.grad.to(p.dtype)
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"] / (1 - b2 ** st["step"])).sqrt_().add_(group["eps"])
        self._decay(p, group)
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** st["step"]))

    def _momentum_update(self, p) -> torch.Tensor:
        st = self.state[p]
        if not st:
            st["momentum_buffer"] = torch.zeros_like(p)
        buf = st["momentum_buffer"]
        g = p.grad.to(p.dtype)
        buf.mul_(self.momentum).add_(g)
        return g.add(buf, alpha=self.momentum) if self.nesterov else buf

    def _muon_steps(self, items) -> None:
        """Gather each sharded update (TP), split fused QKV, orthogonalize the matrices in
        batches of one shape, then put each parameter's update together and apply it. Whole
        matrices are held for at most PENDING_ELEMENTS at a time, not for the whole model.
        Over DP, every rank holds the same all-reduced updates, so each matrix is gathered and
        orthogonalized only by the rank that owns it (`_owner`), which broadcasts the result:
        1/DP of the Newton-Schulz work each, the same result."""
        me = dist.get_rank(self.dp_group) if len(self._load) > 1 else 0
        pending, size = [], 0
        for p, group, qkv, update in items:
            dim, tp = self._tp_split(p)
            shape = list(p.shape)
            if tp > 1:
                shape[dim] *= tp
            split = qkv and self.split_qkv
            owner = self._owner([layout.hf_shape(layout.QKV, j, self.cfg) for j in range(3)]
                                if split else [shape])
            parts = None  # another DP rank's matrix: its update comes by broadcast
            if owner == me:
                full = _gather(update, dim, self.tp_group) if tp > 1 else update
                parts = layout.unfuse(layout.QKV, full, self.cfg) if split else [full]
            pending.append((p, group, dim, tp, owner, parts))
            size += math.prod(shape)
            if size >= PENDING_ELEMENTS:
                self._apply(pending)
                pending, size = [], 0
        if pending:
            self._apply(pending)

    def _apply(self, pending) -> None:
        """Orthogonalize this rank's matrices, broadcast over DP, and apply every update."""
        with matmul_precision(self.fp32_matmul_prec):
            done = iter(orthogonalize_all([m for *_, parts in pending if parts for m in parts],
                                          self.ns_steps))
        sent = []
        for p, group, dim, tp, owner, parts in pending:
            if parts:
                # a semi-orthogonal r x c matrix has RMS 1/sqrt(max(r, c)): scaled to RMS_TARGET
                new = [next(done).mul_(RMS_TARGET * self.extra_scale * math.sqrt(max(m.shape)))
                       for m in parts]
                out = layout.fuse(layout.QKV, new, self.cfg) if len(new) > 1 else new[0]
                if tp > 1:
                    out = out.chunk(tp, dim=dim)[dist.get_rank(self.tp_group)]
                out = out.contiguous()
            else:
                out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            handle = None
            if len(self._load) > 1:
                handle = dist.broadcast(out, src=dist.get_global_rank(self.dp_group, owner),
                                        group=self.dp_group, async_op=True)
            sent.append((p, group, out, handle))
        for p, group, out, handle in sent:
            if handle is not None:
                handle.wait()
            self._decay(p, group)
            p.add_(out.to(p.dtype), alpha=-group["lr"])

    def _owner(self, shapes) -> int:
        """The DP rank that orthogonalizes the matrices of these shapes: the least loaded, by
        Newton-Schulz cost (r x c x min(r, c) each); every rank makes the same choice."""
        rank = min(range(len(self._load)), key=lambda r: (self._load[r], r))
        self._load[rank] += sum(r * c * min(r, c) for r, c in shapes)
        return rank

    def _dp_size(self) -> int:
        if self.dp_group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.dp_group)

    def _tp_split(self, p):
        """(partition dim, TP size) of a tensor-parallel parameter, else (None, 1)."""
        if not getattr(p, "tensor_model_parallel", False) or not dist.is_initialized():
            return None, 1
        return p.partition_dim, dist.get_world_size(self.tp_group)


@contextlib.contextmanager
def matmul_precision(level: str):
    """torch's fp32 matmul precision set to `level` inside, restored after: Newton-Schulz only
    needs singular values pushed into [0.7, 1.2], so reduced-precision matmuls serve it, and
    the rest of training keeps its own setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
