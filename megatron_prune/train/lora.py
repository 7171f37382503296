"""LoRA: frozen base weights, trainable low-rank adapters on the transformer's linear layers.

A target layer y = W x becomes y = W x + (alpha / rank) * B (A x), with A (rank x in) drawn as
PEFT draws it (kaiming-uniform, bound 1/sqrt(in)) and B (out x rank) zero, so training starts
exactly at the base model. The scale is alpha / rank (PEFT's and the LoRA paper's convention);
`--lora-alpha` defaults to the rank, i.e. scale 1.

Tensor parallelism follows the base layer (its split is `layout`'s `split_dim`):

* column-parallel base (linear_qkv, linear_fc1; W split along its output rows): B is split
  like W, so B_r's rows are exactly this rank's rows of W, fused QKV per KV group and
  `[gate_r; up_r]` included; A is replicated, and its input gradient is all-reduced over TP
  by megatron-core's `copy_to_tensor_model_parallel_region` (identity forward), so every rank
  computes the same, complete gradient of A;
* row-parallel base (linear_proj, linear_fc2; W split along its input columns): A is split
  like W, the partial A_r x_r are summed by `reduce_from_tensor_model_parallel_region` (the
  same all-reduce the base output gets), and B is replicated.

So the merge W_r + scale * B_r A (column) or W_r + scale * B A_r (row) is each rank's shard of
the merged weight, in the base layer's own layout, and TP=2 computes what TP=1 does. A is drawn
whole from a generator seeded by (seed, global layer, target) and each rank keeps its slice, so
every TP size starts from the same adapters.

Checkpoints: a LoRA run's saved `model` is the *merged* plain Llama (what `megatron-to-hf`,
`reshard`, `prune`, `eval` and Megatron-LM read, with no knowledge of LoRA), and the rank file's
`lora` entry holds what only a resume needs: the frozen base weights of the adapted layers and
the adapters. The merge is never undone by subtraction (that would not be bit-exact), so a
resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError

# Megatron's names of the adaptable linear layers, and where they sit in a TransformerLayer.
TARGET_PATHS = {"linear_qkv": "self_attention.linear_qkv",
                "linear_proj": "self_attention.linear_proj",
                "linear_fc1": "mlp.linear_fc1",
                "linear_fc2": "mlp.linear_fc2"}
TARGETS = tuple(TARGET_PATHS)
ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def parse_targets(text: str) -> tuple:
    """'linear_qkv,linear_fc2' -> ('linear_qkv', 'linear_fc2'); an unknown name is refused."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--lora-target names no layer; valid: {','.join(TARGETS)}")
    for n in names:
        if n not in TARGET_PATHS:
            raise ConfigError(f"--lora-target: unknown layer {n!r}; valid: {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)  # one order, whatever the flag's


def spec_from_args(rank: Optional[int], alpha: Optional[float], target: str) -> Optional[LoraSpec]:
    if rank is None:
        return None
    if rank <= 0:
        raise ConfigError(f"--lora-rank must be positive, got {rank} (leave it out to train "
                          "every weight)")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise ConfigError(f"--lora-alpha must be positive, got {alpha}")
    return LoraSpec(rank=rank, alpha=alpha, targets=parse_targets(target))


# ---------------------------------------------------------------------------- applying
def target_modules(module) -> Dict[str, tuple]:
    """{module path: (base ParamSpec, linear module)} of every layer's adaptable linears."""
    out = {}
    for i, tl in enumerate(module.decoder.layers):
        for name, path in TARGET_PATHS.items():
            full = f"decoder.layers.{i}.{path}"
            out[full] = (name, layout.layer_spec_of(full + ".weight"), tl.get_submodule(path),
                         tl.layer_number)
    return out


def apply(module, spec: LoraSpec, seed: int) -> List[str]:
    """Freeze every parameter of `module` (a GPTModel piece) and add adapters to the target
    linears of its layers. Returns the adapted modules' paths."""
    from megatron.core import parallel_state as ps
    for p in module.parameters():
        p.requires_grad_(False)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    adapted = []
    for path, (name, pspec, linear, layer_number) in target_modules(module).items():
        if name in spec.targets:
            _add_adapter(linear, pspec.split_dim, spec, tp, tp_rank,
                         _seed(seed, layer_number, name))
            adapted.append(path)
    return adapted


def _seed(seed: int, layer_number: int, target: str) -> int:
    """One generator seed per (run seed, global layer, target): the same on every TP/PP rank."""
    digest = hashlib.sha256(f"{seed}/{layer_number}/{target}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _add_adapter(linear, split_dim: int, spec: LoraSpec, tp: int, tp_rank: int,
                 seed: int) -> None:
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
    w = linear.weight
    out_rows, in_cols = w.shape  # this rank's shard
    full_in = in_cols * tp if split_dim == 1 else in_cols
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / full_in ** 0.5  # PEFT's kaiming_uniform_(a=sqrt(5)) on A
    a_full = torch.empty(spec.rank, full_in).uniform_(-bound, bound, generator=gen)
    a = a_full.chunk(tp, dim=1)[tp_rank] if split_dim == 1 else a_full
    linear.lora_a = torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype).contiguous())
    linear.lora_b = torch.nn.Parameter(torch.zeros(out_rows, spec.rank, device=w.device,
                                                   dtype=w.dtype))
    # the sharded factor carries megatron's TP attributes (grad norm counts it on every rank,
    # checkpoint tools see its split); the replicated one is counted on TP rank 0 only
    sharded, dim = (linear.lora_a, 1) if split_dim == 1 else (linear.lora_b, 0)
    set_tensor_model_parallel_attributes(sharded, True, dim, 1)
    linear.lora_scale = spec.scale
    linear.lora_base_forward = linear.forward
    row = split_dim == 1
    linear.forward = types.MethodType(_row_forward if row else _column_forward, linear)


def _column_forward(self, input_, *args, **kwargs):
    """Column-parallel base: input replicated over TP, output split. A's output is copied into
    the TP region, whose backward all-reduces its gradient: A (replicated) then gets the sum of
    every rank's part, the same on all ranks."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
    out, bias = self.lora_base_forward(input_, *args, **kwargs)
    h = copy_to_tensor_model_parallel_region(F.linear(input_, self.lora_a))
    return out + self.lora_scale * F.linear(h, self.lora_b), bias


def _row_forward(self, input_, *args, **kwargs):
    """Row-parallel base: input split over TP, output summed. A_r x_r is summed over TP like
    the base's partial outputs; B (replicated) then sees the full low-rank activation."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
    out, bias = self.lora_base_forward(input_, *args, **kwargs)
    h = reduce_from_tensor_model_parallel_region(F.linear(input_, self.lora_a))
    return out + self.lora_scale * F.linear(h, self.lora_b), bias


def adapted_linears(module) -> Dict[str, torch.nn.Module]:
    return {path: linear for path, (_, _, linear, _) in target_modules(module).items()
            if hasattr(linear, "lora_a")}


def trainable_counts(module) -> tuple:
    """(trainable, all) parameters of this rank's piece."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------- checkpoints
@torch.no_grad()
def merged_weight(linear) -> torch.Tensor:
    """W + scale * B A of this rank's shard, in the base layer's layout and dtype (summed in
    fp32)."""
    w = linear.weight
    delta = linear.lora_b.float() @ linear.lora_a.float()
    return (w.float() + linear.lora_scale * delta).to(w.dtype)


def merged_state_dict(module) -> dict:
    """The piece's state dict as a plain Llama: adapters folded into their base weights, no
    adapter entries. What the checkpoint's `model` holds."""
    state = module.state_dict()
    for path, linear in adapted_linears(module).items():
        for name in ADAPTER_NAMES:
            state.pop(f"{path}.{name}")
        state[f"{path}.weight"] = merged_weight(linear)
    return state


def resume_state(module, spec: LoraSpec) -> dict:
    """What a resume needs beside the merged weights: the frozen base weights of the adapted
    layers and the adapters, by module path."""
    linears = adapted_linears(module)
    return {**spec.as_dict(),
            "base": {p: l.weight.detach() for p, l in linears.items()},
            "adapters": {p: {n: getattr(l, n).detach().clone() for n in ADAPTER_NAMES}
                         for p, l in linears.items()}}


@torch.no_grad()
def restore(module, spec: LoraSpec, saved: Optional[dict], where: str) -> None:
    """Put a checkpoint's base weights and adapters back (after `apply`)."""
    if saved is None:
        raise ConfigError(f"{where}: a checkpoint of full training, resumed with --lora-rank; "
                          "pass --finetune to start LoRA from its weights")
    if (saved["rank"], float(saved["alpha"]), tuple(saved["targets"])) != \
            (spec.rank, spec.alpha, spec.targets):
        raise ConfigError(f"{where}: saved with LoRA rank {saved['rank']}, alpha "
                          f"{saved['alpha']}, targets {','.join(saved['targets'])}; resume with "
                          "the same --lora-rank/--lora-alpha/--lora-target, or pass --finetune "
                          "to start new adapters on its merged weights")
    linears = adapted_linears(module)
    if set(saved["base"]) != set(linears):
        raise ConfigError(f"{where}: its adapters are on {len(saved['base'])} layers, this "
                          f"piece has {len(linears)}")
    for path, linear in linears.items():
        _copy(linear.weight, saved["base"][path], f"{where}: {path}.weight")
        for name in ADAPTER_NAMES:
            _copy(getattr(linear, name), saved["adapters"][path][name], f"{where}: {path}.{name}")


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ConfigError(f"{what}: shape {tuple(src.shape)}, the model's {tuple(dst.shape)}")
    dst.copy_(src)


def describe(spec: LoraSpec, module) -> str:
    trainable, total = trainable_counts(module)
    return (f"; LoRA rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}) on "
            f"{','.join(spec.targets)}: {trainable:,} of {total:,} parameters trainable here")


def check_supported(spec: Optional[LoraSpec], *, init: str, optimizer: str,
                    sequence_parallel: bool, transformer_impl: str) -> None:
    """What LoRA does not combine with, refused before any process group exists."""
    if spec is None:
        return
    if init == "random":
        raise ConfigError("--lora-rank with --init random: LoRA adapts trained weights; a "
                          "random base stays random (train all weights instead)")
    if optimizer == "muon":
        raise ConfigError("--lora-rank with --optimizer muon is not supported: Muon "
                          "orthogonalizes whole weight matrices, and the adapters are low-rank "
                          "factors it was not made for; use --optimizer adam")
    if sequence_parallel:
        raise ConfigError("--lora-rank does not support --sequence-parallel")
    if transformer_impl == layout.TE:
        raise ConfigError("--lora-rank needs the local layer spec (--transformer-impl local, "
                          "which auto picks with LoRA): Transformer Engine fuses the norms into "
                          "linear_qkv/linear_fc1, whose input is then not the adapter's")


def impl_for(requested: str, spec: Optional[LoraSpec]) -> str:
    """LoRA's layer spec: local (auto never picks Transformer Engine with LoRA)."""
    return layout.LOCAL if spec is not None and requested == "auto" else requested
