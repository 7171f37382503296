"""Importance from calibration data: activation (Minitron-style) and taylor (gradient) scores.

activation — forward passes only, hooks on the model:
  * hidden channel: |output| of every RMSNorm (both norms of every layer), summed over layers;
  * head: L2 norm of its slice of the attention output (the input of o_proj);
  * KV group: the sum of its heads;
  * FFN neuron: |input of down_proj| (= silu(gate) * up);
  * each per-token statistic is averaged over the sequence, then aggregated as the L2 norm over
    the calibration samples;
  * layer: Block Influence 1 - cos(input, output) averaged over tokens, plus the angular
    distance between every pair of layer boundaries (for dropping a contiguous block).
taylor — first-order Taylor importance |w * dL/dw| summed over each structure's weights, with the
  LM loss on the calibration data (the gradient-sensitivity criterion of the BlockSheared design).

The model is a Hugging Face LlamaForCausalLM built from any source (HF directory, or a Megatron
checkpoint merged from its shards), on CUDA when available.
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig
from .hf_model import hf_model_from_source
from .scores import ImportanceScores, shape_of, weight_structure_scores

log = logging.getLogger(__name__)
METHODS = ("activation", "taylor")


class _Stats:
    """Per-sample sequence means, aggregated as the L2 norm over samples."""

    def __init__(self):
        self.sq = {}

    def add(self, key, m: torch.Tensor):
        """m: [batch, n], a statistic already averaged over the sequence."""
        s = (m.double() ** 2).sum(0)  # accumulate squares over samples (fp64)
        self.sq[key] = self.sq[key] + s if key in self.sq else s


    def l2(self, key):
        return self.sq[key].sqrt().cpu()

def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    """[batch, seq, n] -> mean over seq of |x|, in one fp32-accumulating kernel."""
    return torch.linalg.vector_norm(x, 1, dim=1, dtype=torch.float32) / x.shape[1]


def activation_scores(model, batches: torch.Tensor, cfg: ModelConfig, micro_batch: int = 4,
                      progress: bool = True) -> ImportanceScores:
    stats = _Stats()
    L, d = cfg.num_layers, cfg.head_dim
    bi = torch.zeros(L, dtype=torch.float64)
    ang = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    ntok = 0
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(
            lambda m, inp, out, i=i: stats.add(("hidden",), _mean_abs(out))))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, inp, out, i=i: stats.add(("hidden",), _mean_abs(out))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, inp, i=i: stats.add(("heads", i), inp[0].unflatten(-1, (-1, d)).norm(
                dim=-1, dtype=torch.float32).mean(1))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, inp, i=i: stats.add(("ffn", i), _mean_abs(inp[0]))))
    boundary = []  # residual stream at every layer boundary, filled by the hooks below

    def first_input(m, args, kwargs):
        boundary.append((args[0] if args else kwargs["hidden_states"]).detach())

    def layer_output(m, args, out):
        boundary.append((out[0] if isinstance(out, tuple) else out).detach())
    hooks.append(model.model.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    hooks += [layer.register_forward_hook(layer_output) for layer in model.model.layers]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(batches), micro_batch), desc="activation importance",
                              disable=not progress, unit="batch"):
                ids = batches[start:start + micro_batch].to(device)
                boundary.clear()
                model.model(input_ids=ids)
                # cosines between all layer boundaries of every token: one batched Gram matrix
                unit = torch.stack([torch.nn.functional.normalize(
                    h.reshape(-1, h.shape[-1]).float(), dim=-1) for h in boundary], 1)
                cos = torch.bmm(unit, unit.transpose(1, 2)).clamp(-1, 1).double()  # [T, L+1, L+1]
                del unit
                ang += (torch.arccos(cos) / math.pi).sum(0).cpu()
                bi += (1 - cos.diagonal(1, 1, 2)).sum(0).cpu()
                ntok += cos.shape[0]
    finally:
        for h in hooks:
            h.remove()
    ang = ang / ntok
    ang.fill_diagonal_(0)
    heads = torch.stack([stats.l2(("heads", i)) for i in range(L)])
    return ImportanceScores(
        "activation", shape_of(cfg), hidden=stats.l2(("hidden",)), heads=heads,
        groups=heads.reshape(L, cfg.num_query_groups, -1).sum(-1),
        ffn=torch.stack([stats.l2(("ffn", i)) for i in range(L)]), layers=bi / ntok,
        meta={"angular": ang.tolist(), "samples": len(batches), "seq_length": batches.shape[1]})


def taylor_scores(model, batches: torch.Tensor, cfg: ModelConfig, micro_batch: int = 4,
                  progress: bool = True) -> ImportanceScores:
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    n = 0
    for start in tqdm(range(0, len(batches), micro_batch), desc="taylor importance",
                      disable=not progress, unit="batch"):
        ids = batches[start:start + micro_batch].to(device)
        loss = model(input_ids=ids, labels=ids).loss * len(ids)
        loss.backward()
        n += len(ids)
    params = dict(model.named_parameters())
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)

    def elem(name):
        p = params[name]
        return (p.detach().float() * p.grad.float()).abs_().div_(n)  # stays on the device
    scores = weight_structure_scores(cfg, elem, "taylor")
    model.zero_grad(set_to_none=True)
    scores.meta.update(samples=len(batches), seq_length=batches.shape[1])
    return scores


def compute_importance(source, method: str, batches: torch.Tensor, micro_batch: int = 4,
                       device=None) -> ImportanceScores:
    if method not in METHODS:
        raise ConfigError(f"--importance {method}: data-driven methods are {METHODS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = source.config.vocab_size
    if int(batches.max()) >= vocab:
        raise ConfigError(f"calibration token id {int(batches.max())} >= model vocab {vocab}: "
                          "tokenizer and model do not match")
    model = hf_model_from_source(source, device=device)
    fn = activation_scores if method == "activation" else taylor_scores
    return fn(model, batches, source.config, micro_batch)
