"""Intermediate hidden-state distillation: the student's residual stream after chosen layers is
pulled toward the teacher's after the layer it was pruned from.

A pruned student needs no learned projection for this: `prune_plan.json` says which teacher
layer each student layer is (`keep_layers`) and which teacher hidden channels it kept
(`keep_hidden`), so the two streams are compared channel for channel. The per-token loss is the
cosine distance, 1 - cos(student, teacher[kept channels]), averaged over the chosen layers:
cosine rather than MSE because the stream's scale grows with depth and differs between the two
models (RMSNorm follows every read of it), as in Megatron-LM/ModelOpt's hidden-state loss.
Minitron ("Compact Language Models via Pruning and Knowledge Distillation", 2024) adds such a
loss to the logit loss when depth is pruned.

Without sequence parallelism, so that a layer's output is the full sequence, replicated over
TP. With PP > 1 the teacher's stages are cut so that each compared teacher layer sits on the
stage of its student layer (`teacher_stage_counts`); every stage then compares its own layers,
and a stage before the last adds its part of the loss to the backward pass through its output
activation (`attach_loss`), as Megatron-LM does with MoE auxiliary losses.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.prune.apply import PLAN_FILE
from megatron_prune.prune.plan import PrunePlan


@dataclass(frozen=True)
class LayerPairs:
    student: tuple                    # student layers whose output is compared
    teacher: tuple                    # the teacher layer each one is compared with
    channels: Optional[torch.Tensor]  # teacher hidden channels the student kept (None: all)


def parse_layers(text: Optional[str], num_layers: int) -> List[int]:
    """`--kd-hidden-layers`: comma-separated student layers (0-based; negatives count from
    the end); None or 'all' is every layer."""
    if text is None or text.strip() == "all":
        return list(range(num_layers))
    out = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ConfigError(f"--kd-hidden-layers {text!r}: write layer numbers like 2,5,8 "
                              "or 'all'") from None
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"--kd-hidden-layers: layer {i} is outside the student's "
                              f"{num_layers} layers")
        out.append(i % num_layers)
    return sorted(set(out))


def find_plan(dirs: Sequence[Optional[str]]) -> Optional[Path]:
    for d in dirs:
        if d and (Path(d) / PLAN_FILE).is_file():
            return Path(d) / PLAN_FILE
    return None


def layer_pairs(student: ModelConfig, teacher: ModelConfig, plan_path: Optional[Path],
                layers: List[int]) -> LayerPairs:
    """Which teacher layer and channels each chosen student layer is compared with: from the
    prune plan, or one to one when the two models have the same depth and width."""
    if plan_path is not None:
        plan = PrunePlan.load(plan_path)
        plan.check_source(teacher)
        tgt = plan.target_config
        if (tgt.num_layers, tgt.hidden_size) != (student.num_layers, student.hidden_size):
            raise ConfigError(f"{plan_path} prunes to {tgt.num_layers} layers / hidden "
                              f"{tgt.hidden_size}, but the student has {student.num_layers} / "
                              f"{student.hidden_size}")
        keep = plan.keep_hidden
        channels = None if len(keep) == teacher.hidden_size else torch.tensor(keep)
        return LayerPairs(tuple(layers), tuple(plan.keep_layers[i] for i in layers), channels)
    if (student.num_layers, student.hidden_size) != (teacher.num_layers, teacher.hidden_size):
        raise ConfigError(f"--kd-hidden-weight: the student ({student.num_layers} layers, "
                          f"hidden {student.hidden_size}) differs from the teacher "
                          f"({teacher.num_layers}, {teacher.hidden_size}) and no {PLAN_FILE} "
                          "says how they correspond: give the pruned checkpoint as "
                          "--pretrained-checkpoint")
    return LayerPairs(tuple(layers), tuple(layers), None)


def teacher_stage_counts(pairs: LayerPairs, student_counts: Sequence[int],
                         teacher_layers: int) -> List[int]:
    """Layers per teacher pipeline stage such that the teacher layer of every pair lies on the
    stage of its student layer: the most even such split Megatron can build (the first and
    last stage may differ from the others)."""
    pp = len(student_counts)
    if pp == 1:
        return [teacher_layers]
    stage = _stage_finder(student_counts)
    need = [(stage(s), t) for s, t in zip(pairs.student, pairs.teacher)]
    fits = [c for c in _megatron_splits(teacher_layers, pp)
            if all(_stage_finder(c)(t) == st for st, t in need)]
    if not fits:
        raise ConfigError(
            f"--kd-hidden-weight at PP={pp}: no Megatron pipeline split of the teacher's "
            f"{teacher_layers} layers puts teacher layers {list(pairs.teacher)} on the stages of "
            f"student layers {list(pairs.student)} (student stages {list(student_counts)}); "
            "choose other --kd-hidden-layers or another student split "
            "(--decoder-first/last-pipeline-num-layers)")
    return min(fits, key=lambda c: (max(c), c))


def _stage_finder(counts: Sequence[int]):
    starts = list(itertools.accumulate(counts))[:-1]
    return lambda layer: bisect.bisect_right(starts, layer)


def _megatron_splits(n: int, pp: int):
    """Every [first, even..., last] split of n layers over pp stages."""
    from megatron_prune.checkpoint import layout
    seen = set()
    for first in range(1, n + 1):
        for last in range(1, n + 1):
            try:
                counts = tuple(layout.stage_layer_counts(n, pp, first, last))
            except ConfigError:
                continue
            if counts not in seen:
                seen.add(counts)
                yield list(counts)


class Capture:
    """Forward hooks keeping the output hidden states [s, b, h] of some decoder layers (global
    layer numbers; those on this pipeline stage), in call order, until `take()`. `channels`
    keeps only those hidden channels (the teacher's, detached: it never needs their
    gradient)."""

    def __init__(self, model, layers: Sequence[int], channels: Optional[torch.Tensor] = None,
                 detach: bool = False):
        self.states: List[torch.Tensor] = []
        self.channels, self.detach = channels, detach
        wanted = set(layers)
        self.layers = []  # the global numbers of the hooked layers, in order
        for layer in model.decoder.layers:
            if layer.layer_number - 1 in wanted:  # megatron numbers layers globally, from 1
                layer.register_forward_hook(self._hook)
                self.layers.append(layer.layer_number - 1)

    def _hook(self, module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if self.detach:
            h = h.detach()
        if self.channels is not None:
            h = h.index_select(-1, self.channels.to(h.device))
        self.states.append(h)

    def take(self) -> List[torch.Tensor]:
        out, self.states = self.states, []
        return out


def loss_sum(student: List[torch.Tensor], teacher: List[torch.Tensor],
             loss_mask: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Sum over the loss tokens of the cosine distance summed over these layer pairs and
    divided by `num_pairs`, the pairs of all stages (so the stages' parts add up to the mean
    over every pair). States are [s, b, h]; loss_mask is [b, s]."""
    if len(student) != len(teacher):
        raise RuntimeError(f"hidden-state distillation: {len(student)} student states, "
                           f"{len(teacher)} teacher states")
    mask = loss_mask.float().t()                                       # [s, b]
    total = torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    for s, t in zip(student, teacher):
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-6)   # [s, b]
        total = total + ((1.0 - cos) * mask).sum()
    return total / max(1, num_pairs)


class _AttachLoss(torch.autograd.Function):
    """Identity on `output`; in backward, also starts the backward of `loss` (with gradient
    `scale`): how a pipeline stage before the last adds a loss of its own, since the schedule
    only backpropagates the activation it sent on."""

    @staticmethod
    def forward(ctx, output, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.scale), None


def attach_loss(output: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _AttachLoss.apply(output, loss, scale)
