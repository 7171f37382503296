"""The one place that knows how Llama-family parameters are laid out in HF and in Megatron.

Every Megatron parameter is `fuse(hf_tensors)` of one or more HF tensors (`ParamSpec.hf`): fused
QKV interleaves q/k/v per KV group, `linear_fc1` stacks gate over up, the rest are renames. Its
tensor-parallel shard `r` is `fuse` of chunk `r` of each HF tensor along the split dim (0 for
column-parallel and vocab-parallel, 1 for row-parallel, none for replicated), after padding the
vocab to Megatron's multiple. This is why one rule set serves every direction:

  * HF -> shard:      fuse([chunk(t, r) for t in hf])
  * shards -> HF:     cat over ranks of unfuse(shard_r), then drop vocab padding
  * reshard:          shards -> HF form -> shards

(Per-rank SwiGLU shards are `[gate_r; up_r]`, and a QKV shard holds `groups/TP` whole groups,
both of which fall out of the rule above.) Conversion, resharding, pruning and export all go
through this module; nothing else knows a split rule or a parameter name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from megatron_prune.checkpoint.config import ConfigError, ModelConfig

TE, LOCAL = "transformer_engine", "local"
IMPLS = (TE, LOCAL)


@dataclass(frozen=True)
class ParamSpec:
    """One Megatron parameter: its HF sources, its names per layer spec, and how TP splits it."""
    key: str                 # short id used by pruning and tests
    hf: tuple                # HF tensor names; "{i}" is the layer index
    local: str               # mcore local-spec name
    te: str                  # mcore Transformer Engine-spec name
    split_dim: Optional[int]  # 0 column/vocab parallel, 1 row parallel, None replicated
    vocab: bool = False      # padded to Megatron's vocab multiple before splitting
    per_layer: bool = True

    def name(self, impl: str, layer: Optional[int] = None) -> str:
        return (self.te if impl == TE else self.local).format(i=layer)

    def hf_names(self, layer: Optional[int] = None) -> list:
        return [n.format(i=layer) for n in self.hf]


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
EMBEDDING = ParamSpec("embedding", ("model.embed_tokens.weight",), "embedding.word_embeddings.weight",
                      "embedding.word_embeddings.weight", 0, vocab=True, per_layer=False)
INPUT_NORM = ParamSpec("input_norm", (_H + "input_layernorm.weight",), _L + "input_layernorm.weight",
                       _L + "self_attention.linear_qkv.layer_norm_weight", None)
QKV = ParamSpec("qkv", (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
                        _H + "self_attn.v_proj.weight"),
                _L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.weight", 0)
PROJ = ParamSpec("proj", (_H + "self_attn.o_proj.weight",), _L + "self_attention.linear_proj.weight",
                 _L + "self_attention.linear_proj.weight", 1)
MLP_NORM = ParamSpec("mlp_norm", (_H + "post_attention_layernorm.weight",),
                     _L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight", None)
FC1 = ParamSpec("fc1", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
                _L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight", 0)
FC2 = ParamSpec("fc2", (_H + "mlp.down_proj.weight",), _L + "mlp.linear_fc2.weight",
                _L + "mlp.linear_fc2.weight", 1)
FINAL_NORM = ParamSpec("final_norm", ("model.norm.weight",), "decoder.final_layernorm.weight",
                       "decoder.final_layernorm.weight", None, per_layer=False)
OUTPUT = ParamSpec("output", ("lm_head.weight",), "output_layer.weight", "output_layer.weight", 0,
                   vocab=True, per_layer=False)
LAYER_SPECS = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
ALL_SPECS = (EMBEDDING,) + LAYER_SPECS + (FINAL_NORM, OUTPUT)
SPECS_BY_KEY = {s.key: s for s in ALL_SPECS}

# Modules whose state dict carries an `_extra_state` entry (TE modules, and mcore's own linear
# layers for TE compatibility). A strict load_state_dict needs them present; their value is None.
_EXTRA_STATE = {
    TE: ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
         "mlp.linear_fc1", "mlp.linear_fc2"),
    LOCAL: ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
            "mlp.linear_fc2"),
}


# ---------------------------------------------------------------------------- fuse / unfuse
def fuse(spec: ParamSpec, parts: Sequence[torch.Tensor], cfg: ModelConfig, tp: int = 1) -> torch.Tensor:
    """HF tensors (or their chunk for one TP rank) -> the Megatron tensor (or its TP shard)."""
    if spec is QKV:
        groups = cfg.num_query_groups // tp
        q, k, v = (t.reshape(groups, -1, t.shape[-1]) for t in parts)
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
    if spec is FC1:
        return torch.cat(list(parts), dim=0)
    (t,) = parts
    return t


def fused_row_blocks(spec: ParamSpec, rows: Sequence[int], cfg: ModelConfig,
                     tp: int = 1) -> list:
    """Where `fuse` puts the rows of its parts, as [(part, first source row, first fused row,
    rows)] runs, for parts of `rows[j]` rows each: found by fusing one-column tensors of row
    ids, so it is `fuse`'s own layout and not a second copy of it. Lets a reader put each run
    straight into the fused tensor instead of reading the parts and concatenating them."""
    ids = [torch.arange(n, dtype=torch.int64).mul_(len(rows)).add_(j).reshape(n, 1)
           for j, n in enumerate(rows)]
    order = fuse(spec, ids, cfg, tp).reshape(-1).tolist()
    blocks = []
    for dst, code in enumerate(order):
        part, row = code % len(rows), code // len(rows)
        if blocks and blocks[-1][0] == part and blocks[-1][1] + blocks[-1][3] == row:
            blocks[-1][3] += 1
        else:
            blocks.append([part, row, dst, 1])
    return [tuple(b) for b in blocks]


def unfuse(spec: ParamSpec, tensor: torch.Tensor, cfg: ModelConfig, tp: int = 1) -> list:
    """Inverse of `fuse`, for a full tensor (tp=1) or one rank's shard."""
    if spec is QKV:
        groups = cfg.num_query_groups // tp
        d, hpg = cfg.head_dim, cfg.heads_per_group
        g = tensor.reshape(groups, (hpg + 2) * d, -1)
        q, k, v = g.split([hpg * d, d, d], dim=1)
        return [x.reshape(-1, tensor.shape[-1]) for x in (q, k, v)]
    if spec is FC1:
        return list(tensor.chunk(2, dim=0))
    return [tensor]


# ---------------------------------------------------------------------------- TP split
def padded_rows(spec: ParamSpec, cfg: ModelConfig, tp: int, divisible_by: int) -> Optional[int]:
    return cfg.padded_vocab_size(tp, divisible_by) if spec.vocab else None


def chunk_range(spec: ParamSpec, size: int, tp: int, rank: int, cfg: ModelConfig,
                divisible_by: int = 128) -> tuple:
    """[start, end) of rank's chunk along spec.split_dim of one HF tensor of that dim `size`."""
    if spec.split_dim is None:
        return 0, size
    total = padded_rows(spec, cfg, tp, divisible_by) or size
    if total % tp:
        raise ConfigError(f"{spec.key}: dimension {total} is not divisible by TP={tp}")
    step = total // tp
    return rank * step, (rank + 1) * step


def ranks_covering(spec: ParamSpec, size: int, tp: int, cfg: ModelConfig, divisible_by: int,
                   start: int, end: int) -> list:
    """[(rank, lo, hi)]: which TP ranks hold rows/cols [start, end) of an HF tensor of `size`
    along the split dim, and the part of each rank's piece that falls in the range."""
    out = []
    for r in range(tp):
        s, e = chunk_range(spec, size, tp, r, cfg, divisible_by)
        lo, hi = max(s, start), min(e, end)
        if lo < hi:
            out.append((r, lo - s, hi - s))
    return out


Getter = Callable[[str, Optional[int], int, int], torch.Tensor]
"""get(hf_name, dim, start, end): rows/cols [start, end) along dim of an HF tensor (dim None: all)."""


def shard_from_hf(spec: ParamSpec, get: Getter, shape_of: Callable[[str], tuple], cfg: ModelConfig,
                  tp: int, rank: int, layer: Optional[int] = None,
                  divisible_by: int = 128) -> torch.Tensor:
    """Rank's TP shard of a Megatron parameter, reading only the rows it needs from HF tensors."""
    parts = []
    for name in spec.hf_names(layer):
        size = shape_of(name)[spec.split_dim or 0]
        start, end = chunk_range(spec, size, tp, rank, cfg, divisible_by)
        real_end = min(end, size)
        piece = get(name, spec.split_dim, start, real_end) if real_end > start else None
        if spec.vocab and end > real_end:  # Megatron's vocab padding: rows no token uses
            shape = list(shape_of(name))
            shape[0] = end - max(start, real_end)
            pad = torch.zeros(shape, dtype=piece.dtype if piece is not None else torch.float32,
                              device=piece.device if piece is not None else None)
            piece = pad if piece is None else torch.cat([piece, pad])
        parts.append(piece)
    return fuse(spec, parts, cfg, tp)


def merge_to_hf(spec: ParamSpec, shards: Sequence[torch.Tensor], cfg: ModelConfig,
                layer: Optional[int] = None) -> dict:
    """TP shards of one Megatron parameter -> {hf_name: full HF tensor} (vocab padding dropped)."""
    tp = len(shards)
    if spec.split_dim is None:
        _check_replicas(spec, shards)
        pieces = [unfuse(spec, shards[0], cfg, 1)]
        tp = 1
    else:
        pieces = [unfuse(spec, s, cfg, tp) for s in shards]
    out = {}
    for j, name in enumerate(spec.hf_names(layer)):
        full = torch.cat([p[j] for p in pieces], dim=spec.split_dim or 0)
        if spec.vocab:
            full = full[: cfg.vocab_size]
        out[name] = full
    return out


def _check_replicas(spec: ParamSpec, shards: Sequence[torch.Tensor]) -> None:
    for s in shards[1:]:
        if not torch.equal(s, shards[0]):
            raise ConfigError(f"replicated parameter {spec.key} differs between TP ranks")


def hf_shape(spec: ParamSpec, j: int, cfg: ModelConfig) -> tuple:
    """Shape of the j-th HF tensor of a spec under cfg (used to plan exports and pruning)."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "embedding": [(cfg.vocab_size, h)], "output": [(cfg.vocab_size, h)],
        "input_norm": [(h,)], "mlp_norm": [(h,)], "final_norm": [(h,)],
        "qkv": [(cfg.num_attention_heads * d, h), (cfg.num_query_groups * d, h),
                (cfg.num_query_groups * d, h)],
        "proj": [(h, cfg.num_attention_heads * d)],
        "fc1": [(cfg.ffn_hidden_size, h), (cfg.ffn_hidden_size, h)],
        "fc2": [(h, cfg.ffn_hidden_size)],
    }[spec.key][j]


# ---------------------------------------------------------------------------- PP stages
def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> list:
    """Layers per pipeline stage: even, or Megatron's uneven first/last stage sizes."""
    if pp < 1:
        raise ConfigError(f"pipeline-model-parallel-size must be >= 1, got {pp}")
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ConfigError("uneven first/last stage sizes need pipeline-model-parallel-size > 1")
        return [num_layers]
    fixed = [first, last]
    middle_stages = pp - sum(x is not None for x in fixed)
    rest = num_layers - sum(x or 0 for x in fixed)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
        how = "" if first is None and last is None else \
            f" with first stage {first} and last stage {last} layers"
        raise ConfigError(
            f"num_layers={num_layers} cannot be split over {pp} pipeline stages{how}; give an "
            "uneven split with --decoder-first-pipeline-num-layers / "
            "--decoder-last-pipeline-num-layers")
    each = rest // middle_stages if middle_stages else 0
    counts = [each] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    if min(counts) < 1:
        raise ConfigError(f"a pipeline stage would hold no layers: {counts}")
    return counts


def stage_ranges(counts: Sequence[int]) -> list:
    """[(start, end)) global layer ranges of each stage."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def check_parallel(cfg: ModelConfig, tp: int, pp_counts: Sequence[int]) -> None:
    """Refuse shapes Megatron cannot shard at this TP (before anything is written)."""
    if tp < 1:
        raise ConfigError(f"tensor-model-parallel-size must be >= 1, got {tp}")
    for name, value in (("num_attention_heads", cfg.num_attention_heads),
                        ("num_query_groups (KV heads)", cfg.num_query_groups),
                        ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"{name}={value} is not divisible by tensor-model-parallel-size={tp}")
    if sum(pp_counts) != cfg.num_layers:
        raise ConfigError(f"pipeline stages hold {sum(pp_counts)} layers, model has {cfg.num_layers}")


# ---------------------------------------------------------------------------- rank contents
@dataclass(frozen=True)
class Entry:
    """One tensor of a rank file: its Megatron name (stage-local layer number), spec, global layer."""
    name: str
    spec: ParamSpec
    layer: Optional[int]


def stage_entries(cfg: ModelConfig, impl: str, stage: int, ranges: Sequence[tuple]) -> list:
    """The parameters a pipeline stage's rank files hold, in mcore state-dict order."""
    pp = len(ranges)
    start, end = ranges[stage]
    out = []
    if stage == 0:
        out.append(Entry(EMBEDDING.name(impl), EMBEDDING, None))
    for g in range(start, end):
        for spec in LAYER_SPECS:
            out.append(Entry(spec.name(impl, g - start), spec, g))
    if stage == pp - 1:
        out.append(Entry(FINAL_NORM.name(impl), FINAL_NORM, None))
        # Tied embeddings with PP > 1: mcore keeps a synchronised copy of the embedding as
        # output_layer.weight on the last stage, and saves it.
        if not cfg.tie_embeddings:
            out.append(Entry(OUTPUT.name(impl), OUTPUT, None))
        elif pp > 1:
            out.append(Entry(OUTPUT.name(impl), EMBEDDING, None))
    return out


def extra_state_names(impl: str, stage: int, ranges: Sequence[tuple]) -> list:
    start, end = ranges[stage]
    names = [f"decoder.layers.{i}.{m}._extra_state"
             for i in range(end - start) for m in _EXTRA_STATE[impl]]
    if stage == len(ranges) - 1:
        names.append("output_layer._extra_state")
    return names


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_spec_of(name: str) -> Optional[ParamSpec]:
    """The per-layer spec of a (stage-local) Megatron parameter name, in either layer spec:
    "decoder.layers.3.mlp.linear_fc1.weight" -> FC1; None for names outside the layers."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    rest = name[m.end():]
    for spec in LAYER_SPECS:
        if rest in {spec.name(impl, 0)[len("decoder.layers.0."):] for impl in IMPLS}:
            return spec
    return None


def detect_impl(names) -> str:
    """Which layer spec a state dict was saved with (TE fuses the norms into the linears)."""
    names = list(names)
    if any(n.endswith("linear_qkv.layer_norm_weight") for n in names):
        return TE
    if any(n.endswith("input_layernorm.weight") for n in names):
        return LOCAL
    raise ConfigError("cannot tell the layer spec of this checkpoint: no norm weights found")


def count_layers(names) -> int:
    idx = {int(m.group(1)) for n in names if (m := _LAYER_RE.match(n))}
    return max(idx) + 1 if idx else 0


def iter_hf_entries(cfg: ModelConfig) -> Iterator[tuple]:
    """(spec, layer) for every HF parameter group of the model, in HF order."""
    yield EMBEDDING, None
    for g in range(cfg.num_layers):
        for spec in LAYER_SPECS:
            yield spec, g
    yield FINAL_NORM, None
    if not cfg.tie_embeddings:
        yield OUTPUT, None


def hf_plan(cfg: ModelConfig) -> list:
    """[((spec key, layer), [(hf_name, shape), ...])] of every parameter, in HF write order."""
    return [((spec.key, layer),
             [(n, hf_shape(spec, j, cfg)) for j, n in enumerate(spec.hf_names(layer))])
            for spec, layer in iter_hf_entries(cfg)]
