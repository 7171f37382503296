"""Importance scores: one tensor per prunable structure, tied to the model they were measured on.

    hidden [hidden_size]              residual-stream channels (shared by every layer)
    heads  [num_layers, num_heads]    query heads
    groups [num_layers, num_groups]   KV groups (default: sum of their heads)
    ffn    [num_layers, ffn_hidden]   FFN neurons (SwiGLU channels)
    layers [num_layers]               whole layers (higher = more important)

A file from `megatron-prune importance` also records the method and the model's shape; applying
scores to a model of another shape is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig

SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "head_dim", "vocab_size")


def shape_of(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


@dataclass
class ImportanceScores:
    method: str
    shape: dict
    hidden: torch.Tensor
    heads: torch.Tensor
    ffn: torch.Tensor
    groups: Optional[torch.Tensor] = None
    layers: Optional[torch.Tensor] = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.groups is None:
            s = self.shape
            hpg = s["num_attention_heads"] // s["num_query_groups"]
            self.groups = self.heads.reshape(s["num_layers"], s["num_query_groups"], hpg).sum(-1)

    def check(self, cfg: ModelConfig) -> None:
        want = shape_of(cfg)
        diff = {k: (self.shape.get(k), v) for k, v in want.items() if self.shape.get(k) != v}
        if diff:
            raise ConfigError("scores file is from a different model: " + ", ".join(
                f"{k} {a} (scores) != {b} (model)" for k, (a, b) in diff.items()))
        L = cfg.num_layers
        expect = {"hidden": (cfg.hidden_size,), "heads": (L, cfg.num_attention_heads),
                  "groups": (L, cfg.num_query_groups), "ffn": (L, cfg.ffn_hidden_size)}
        if self.layers is not None:
            expect["layers"] = (L,)
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ConfigError(f"scores.{name} has shape {tuple(getattr(self, name).shape)}, "
                                  f"model needs {shape}")

    def save(self, path) -> None:
        torch.save({"method": self.method, "shape": self.shape, "hidden": self.hidden,
                    "heads": self.heads, "groups": self.groups, "ffn": self.ffn,
                    "layers": self.layers, "meta": self.meta}, path)

    @classmethod
    def load(cls, path) -> "ImportanceScores":
        if not Path(path).is_file():
            raise ConfigError(f"scores file {path} does not exist")
        d = torch.load(path, map_location="cpu", weights_only=True)
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{path} is not a scores file of megatron-prune ({e})") from e


# ------------------------------------------------------------------------ data-free methods
def random_scores(cfg: ModelConfig, seed: int) -> ImportanceScores:
    """Uniform random scores: choosing the top-k of them is a seeded random mask."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.num_layers

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)
    return ImportanceScores("random", shape_of(cfg), hidden=r(cfg.hidden_size),
                            heads=r(L, cfg.num_attention_heads),
                            groups=r(L, cfg.num_query_groups), ffn=r(L, cfg.ffn_hidden_size),
                            layers=r(L), meta={"seed": seed})


def magnitude_scores(source, cfg: ModelConfig) -> ImportanceScores:
    """Weight-norm importance (no data): the squared L2 norm of the weights each structure owns."""
    return weight_structure_scores(cfg, lambda name: source.get(name).float() ** 2, "magnitude",
                                   with_layers=False)


def weight_structure_scores(cfg: ModelConfig, element_scores, method: str,
                            with_layers: bool = True) -> ImportanceScores:
    """Sum per-element scores (w^2 for magnitude, |w * dL/dw| for taylor) over the weights each
    structure owns: a head its q rows and o_proj columns; a group its k/v rows plus its heads;
    an FFN neuron its gate/up rows and down column; a hidden channel its column in every matrix
    that reads the residual stream, its row in every matrix that writes it, and its norm
    weights; a layer all its weights."""
    L, d, hpg = cfg.num_layers, cfg.head_dim, cfg.heads_per_group
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    heads = torch.zeros(L, cfg.num_attention_heads, dtype=torch.float64)
    kv = torch.zeros(L, cfg.num_query_groups, dtype=torch.float64)
    ffn = torch.zeros(L, cfg.ffn_hidden_size, dtype=torch.float64)
    layers = torch.zeros(L, dtype=torch.float64)
    for spec, layer in layout.iter_hf_entries(cfg):
        for j, name in enumerate(spec.hf_names(layer)):
            w = element_scores(name)  # any device/dtype: reduced there in fp64, then moved

            def total(dim=None):
                out = w.sum(dtype=torch.float64) if dim is None else w.sum(dim, dtype=torch.float64)
                return out.cpu()
            if layer is not None:
                layers[layer] += total()
            if spec.key in ("embedding", "output"):
                hidden += total(0)
            elif spec.key in ("input_norm", "mlp_norm", "final_norm"):
                hidden += w.double().cpu()
            elif spec.key == "qkv":
                hidden += total(0)
                rows = total(1).reshape(-1, d).sum(1)
                if j == 0:
                    heads[layer] += rows
                else:
                    kv[layer] += rows
            elif spec.key == "proj":
                hidden += total(1)
                heads[layer] += total(0).reshape(-1, d).sum(1)
            elif spec.key == "fc1":
                hidden += total(0)
                ffn[layer] += total(1)
            elif spec.key == "fc2":
                hidden += total(1)
                ffn[layer] += total(0)
    groups = kv + heads.reshape(L, cfg.num_query_groups, hpg).sum(-1)
    return ImportanceScores(method, shape_of(cfg), hidden=hidden, heads=heads, groups=groups,
                            ffn=ffn, layers=layers if with_layers else None)
