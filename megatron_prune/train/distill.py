"""The teacher of logit distillation: a frozen GPTModel piece at the student's TP/PP.

Per training iteration the teacher runs forward over the same micro-batches first (megatron-core's
schedule, forward only, so it is pipelined like the student); its last stage keeps the final
hidden states of each micro-batch, and the student's loss applies the teacher's vocab-parallel
output weight to them chunk by chunk next to its own (`loss.fused_output_loss`). The teacher's
logits are never gathered over TP, and never exist for more than one chunk of tokens.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import torch

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.mcore.load import load_legacy_into_model
from megatron_prune.mcore.model import stage_split
from megatron_prune.train import model as model_mod

log = logging.getLogger(__name__)


class Teacher:
    """The teacher of the opened checkpoint `ckpt` (`model.open_checkpoint`). `stages`: the
    (first, last) pipeline stage sizes to build it with, where hidden-state distillation needs
    its layers on given stages; default `teacher_stages`."""

    def __init__(self, ckpt, *, student_cfg, m, p, dtype, impl, pp: int,
                 stages: Optional[tuple] = None):
        path, cfg = ckpt.root, ckpt.config
        if cfg.vocab_size != student_cfg.vocab_size:
            raise ConfigError(f"--teacher {path}: vocab {cfg.vocab_size} differs from the "
                              f"student's {student_cfg.vocab_size}; KD needs the same vocabulary")
        first, last = stages or teacher_stages(ckpt, pp, student_cfg.num_layers, p)
        tp_args = dataclasses.replace(p, decoder_first_pipeline_num_layers=first,
                                      decoder_last_pipeline_num_layers=last)
        m_args = dataclasses.replace(m, recompute_granularity=None)
        self.config = cfg
        self.module = model_mod.build_piece(cfg, m=m_args, p=tp_args, dtype=dtype, impl=impl,
                                            divisible_by=ckpt.divisible_by)
        load_legacy_into_model(self.module, path)
        self.module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.path = path

    def output_weight(self) -> Optional[torch.Tensor]:
        return model_mod.output_weight(self.module) if self.module.post_process else None

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        """Final hidden states [b, s, h] of one micro-batch, replicated over TP (PP = 1: the
        whole teacher is on this rank; hidden-state distillation runs it this way, so that
        its intermediate states live for one micro-batch only; at PP > 1 they live for the
        iteration)."""
        out = self.module(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return model_mod.output_hidden(self.module, out)

    @torch.no_grad()
    def hidden_states(self, forward_backward, micro: List[dict], seq_length: int,
                      micro_batch: int) -> List[Optional[torch.Tensor]]:
        """Final hidden states [b, s, h] of each micro-batch on the last stage (None elsewhere),
        already replicated over TP."""
        def step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["tokens"], b["position_ids"], b.get("attention_mask"))
            return out, _keep

        out = forward_backward(forward_step_func=step, data_iterator=iter(micro),
                               model=[self.module], num_microbatches=len(micro),
                               seq_length=seq_length, micro_batch_size=micro_batch,
                               forward_only=True, collect_non_loss_data=True)
        if not self.module.post_process:
            return [None] * len(micro)
        return [model_mod.output_hidden(self.module, h) for h in out]


def teacher_stages(ckpt, pp: int, student_layers: int, p) -> tuple:
    """(first, last) stage sizes of the teacher's pipeline: the checkpoint's own split when it
    was saved at this PP, the student's when the layer counts agree, else even, else the
    remainder on the first stage."""
    from megatron_prune.checkpoint import layout
    n = ckpt.config.num_layers
    if ckpt.pp == pp:
        return stage_split(ckpt.stage_counts)
    if n == student_layers:
        return p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    try:
        layout.stage_layer_counts(n, pp)
        return None, None
    except ConfigError:
        each = n // pp
        if each < 1:
            raise ConfigError(f"--teacher has {n} layers, fewer than {pp} pipeline stages")
        return n - each * (pp - 1), None


def _keep(output, non_loss_data=False):
    return output
