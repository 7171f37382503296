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

Only with PP = 1 and without sequence parallelism: every chosen layer then lives on the rank
that computes the loss, and its output is the full sequence, replicated over TP.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from ..prune_plan import PrunePlan
from ..pruning import PLAN_FILE


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


class Capture:
    """Forward hooks keeping the output hidden states [s, b, h] of some decoder layers, in
    call order, until `take()`. `channels` keeps only those hidden channels (the teacher's,
    detached: it never needs their gradient)."""

    def __init__(self, model, layers: Sequence[int], channels: Optional[torch.Tensor] = None,
                 detach: bool = False):
        self.states: List[torch.Tensor] = []
        self.channels, self.detach = channels, detach
        decoder_layers = model.decoder.layers
        for i in layers:
            decoder_layers[i].register_forward_hook(self._hook)

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
             loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over the loss tokens of the cosine distance averaged over the layer pairs. States
    are [s, b, h]; loss_mask is [b, s]."""
    if len(student) != len(teacher):
        raise RuntimeError(f"hidden-state distillation: {len(student)} student states, "
                           f"{len(teacher)} teacher states")
    mask = loss_mask.float().t()                                       # [s, b]
    total = torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    for s, t in zip(student, teacher):
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-6)   # [s, b]
        total = total + ((1.0 - cos) * mask).sum()
    return total / max(1, len(student))
