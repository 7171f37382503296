"""Calibration rows through a checkpoint source one decoder layer at a time.

The refit's Grams (`reconstruct.fit`) and the calibration loss of a candidate plan (`auto`'s
trials, the size search) both need the rows' hidden states after every layer of a model that
may not fit in memory in fp32 (a 7B model is 28 GB). Any source (an HF directory, Megatron
shards, a `PrunedSource` of either) gives its layers one at a time, so only one fp32 layer, the
embedding and the rows' hidden states (rows x seq x hidden) are ever held. Each layer is
transformers' own LlamaDecoderLayer, with the rotary embedding and sdpa attention
LlamaForCausalLM uses, so the results equal the whole model's bit for bit (tested).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.hf_model import llama_config

# hook(layer index, block) -> called before the block runs; returns what to call after it ran
LayerHook = Callable[[int, torch.nn.Module], Optional[Callable[[], None]]]


class LayerStream:
    """The hidden states of `rows` (token ids, [n, seq]) in micro-batches, advanced through
    `source` by `run`."""

    def __init__(self, source, rows: torch.Tensor, micro_batch: int = 4):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        self.source, self.rows, self.micro_batch = source, rows, micro_batch
        self.hf_cfg = llama_config(source.config)
        self.hf_cfg._attn_implementation = "sdpa"  # what LlamaForCausalLM takes by default
        emb = self._embedding()
        self.hidden = [torch.nn.functional.embedding(ids, emb) for ids in self._batches()]
        self.pos = torch.arange(rows.shape[1])[None]
        self.rope = LlamaRotaryEmbedding(config=self.hf_cfg)(self.hidden[0], self.pos)

    def run(self, desc: str = "layers", progress: bool = True,
            hook: Optional[LayerHook] = None) -> "LayerStream":
        """Every decoder layer in turn over every micro-batch (no mask: with no padding the
        whole model's create_causal_mask returns None for sdpa too, and sdpa then attends
        causally; calling it would tie us to one transformers release, as 5.17 refuses the
        `cache` argument 5.25 requires)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        for layer in tqdm(range(self.source.config.num_layers), desc=desc, unit="layer",
                          disable=not progress):
            block = _layer(self.source, self.hf_cfg, layer, LlamaDecoderLayer)
            done = hook(layer, block) if hook else None
            with torch.inference_mode():
                self.hidden = [block(h, attention_mask=None, position_ids=self.pos,
                                     position_embeddings=self.rope) for h in self.hidden]
            if done:
                done()
        return self

    def mean_loss(self) -> float:
        """After `run`: the mean next-token loss over all rows x (seq - 1) positions, computed as
        LlamaForCausalLM computes it (its final norm, output layer and loss function) and
        averaged over micro-batches as `importance_hf.mean_loss` does."""
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        cfg = self.source.config
        norm = LlamaRMSNorm(cfg.hidden_size, eps=self.hf_cfg.rms_norm_eps)
        norm.weight.data = self.source.group(layout.FINAL_NORM, None)["model.norm.weight"].float()
        out = (self._embedding() if cfg.tie_embeddings
               else self.source.group(layout.OUTPUT, None)["lm_head.weight"].float())
        total = torch.zeros((), dtype=torch.float64)
        with torch.inference_mode():
            for h, ids in zip(self.hidden, self._batches()):
                logits = torch.nn.functional.linear(norm(h), out)
                total += ForCausalLMLoss(logits, ids, self.hf_cfg.vocab_size).double() * len(ids)
        return float(total) / len(self.rows)

    def _batches(self):
        return [self.rows[i:i + self.micro_batch]
                for i in range(0, len(self.rows), self.micro_batch)]

    def _embedding(self) -> torch.Tensor:
        return self.source.group(layout.EMBEDDING, None)["model.embed_tokens.weight"].float()


def _layer(source, hf_cfg, layer: int, cls) -> torch.nn.Module:
    """Decoder layer `layer` of the source, in fp32 (the only layer in memory)."""
    prefix = f"model.layers.{layer}."
    with torch.device("meta"):
        block = cls(hf_cfg, layer)
    state = {name[len(prefix):]: t.float() for spec in layout.LAYER_SPECS
             for name, t in source.group(spec, layer).items()}
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval()
