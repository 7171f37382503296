"""The model pieces the trainer runs: a megatron-core GPTModel from `mcore/`, made ready.

* `resolve_model(...)`  which shape to build and where its weights come from (a checkpoint of
                        either parameter naming at any TP/PP, or a random init of given shape);
* `build_piece(...)`    this rank's piece, with SDPA core attention on the local spec, recompute
                        settings, `fusions` (fused wgrad accumulation, RoPE, RMSNorm, SwiGLU's
                        backward) on GPUs without TE/Apex, and its output layer bypassed (the
                        last stage returns hidden states; `loss.fused_output_loss` applies the
                        output weight chunk-wise);
* `output_weight(...)`, `output_hidden(...)`  what the loss needs from the last stage.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.hf import model_tokenizer_dir
from megatron_prune.checkpoint.legacy import LegacyCheckpoint
from megatron_prune.checkpoint.megatron_dirs import TRACKER, checkpoint_format
from megatron_prune.mcore.model import build_gpt_model, have_transformer_engine, resolve_impl
from megatron_prune.train import fusions, sdpa_attention
from megatron_prune.train.config import ModelArgs, ParallelArgs

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    config: ModelConfig
    weights: Optional[Path]        # Megatron checkpoint to load weights from (None: random init)
    divisible_by: int = 128
    tokenizer_dir: Optional[Path] = None
    args: Optional[object] = None  # the checkpoint's args Namespace, kept for what we save


def open_checkpoint(path) -> LegacyCheckpoint:
    path = Path(path)
    if not (path / TRACKER).is_file():
        raise ConfigError(f"{path}: no {TRACKER}; not a Megatron checkpoint")
    if checkpoint_format(path) != "torch":
        raise ConfigError(f"{path} is a torch_dist checkpoint; the trainer reads the legacy "
                          "(torch) format: `megatron-prune reshard --ckpt-format torch` first")
    return LegacyCheckpoint(path)


def source_from_checkpoint(path, weights: bool = True) -> ModelSource:
    ckpt = open_checkpoint(path)
    return ModelSource(config=ckpt.config, weights=Path(path) if weights else None,
                       divisible_by=ckpt.divisible_by, tokenizer_dir=model_tokenizer_dir(path),
                       args=ckpt.args)


def random_init_config(m: ModelArgs, vocab_size: Optional[int], seq_length: int) -> ModelConfig:
    missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size",
                                                     "num_attention_heads")
               if getattr(m, n) is None]
    if missing:
        raise ConfigError(f"--init random needs {', '.join(missing)} (or "
                          "--pretrained-checkpoint to copy the shape from)")
    vocab = m.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("--init random needs --vocab-size or a tokenizer")
    heads = m.num_attention_heads
    return ModelConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        num_attention_heads=heads, num_query_groups=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads, vocab_size=vocab,
        max_position_embeddings=m.max_position_embeddings or seq_length,
        norm_epsilon=m.norm_epsilon, rotary_base=m.rotary_base,
        tie_embeddings=not m.untie_embeddings_and_output_weights)


def pick_impl(requested: str) -> str:
    """auto: Transformer Engine's spec when it imports, else local."""
    if requested == "auto":
        return layout.TE if have_transformer_engine() else layout.LOCAL
    return resolve_impl(requested)


def config_overrides(m: ModelArgs, p: ParallelArgs, cfg: ModelConfig, impl: str) -> dict:
    out = {"init_method_std": m.init_method_std, "calculate_per_token_loss": True}
    if p.sequence_parallel:
        if p.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if impl != layout.TE:
            raise ConfigError("--sequence-parallel needs the Transformer Engine layer spec: "
                              "megatron-core's local spec (torch norms) does not support it")
        out["sequence_parallel"] = True
    if m.recompute_granularity == "selective":
        out.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif m.recompute_granularity == "full":
        out.update(recompute_granularity="full", recompute_method=m.recompute_method,
                   recompute_num_layers=m.recompute_num_layers)
    return out


def _return_hidden(self, input_, weight=None, runtime_gather_output=None):
    """Output layer bypass: GPTModel's last stage then returns its hidden states [b, s, h]."""
    return input_, None


def build_piece(cfg: ModelConfig, *, m: ModelArgs, p: ParallelArgs, dtype: torch.dtype,
                impl: str, divisible_by: int):
    """This rank's GPTModel piece (not yet wrapped in DDP), weights randomly initialised."""
    overrides = config_overrides(m, p, cfg, impl)
    fused = fusions.install() if m.fused_kernels and impl == layout.LOCAL and \
        fusions.wanted() else {}
    if fused.get("wgrad"):  # needs megatron DDP's main_grad: training only
        overrides["gradient_accumulation_fusion"] = True
    if fused.get("swiglu"):  # on with CUDA already; the patched impl runs only with it
        overrides["bias_activation_fusion"] = True
    model = build_gpt_model(
        cfg, impl=impl, dtype=dtype, first=p.decoder_first_pipeline_num_layers,
        last=p.decoder_last_pipeline_num_layers, divisible_by=divisible_by,
        config_overrides=overrides)
    if impl == layout.LOCAL and m.core_attention in ("auto", "sdpa"):
        sdpa_attention.use_sdpa(model)
    if fused.get("rms_norm"):
        fusions.use_fused_rms_norm(model)
    if model.post_process:
        model.output_layer.forward = types.MethodType(_return_hidden, model.output_layer)
    return model


def output_weight(model) -> torch.Tensor:
    """The (vocab-parallel) output weight the last stage's loss multiplies by."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def output_hidden(model, hidden_bsh: torch.Tensor) -> torch.Tensor:
    """The last stage's hidden states, replicated over TP with the backward the column-parallel
    output layer would give them (all-reduce of their gradient; all-gather/reduce-scatter with
    sequence parallelism). [b, s, h] in, [b, s, h] out."""
    from megatron.core import tensor_parallel
    if model.config.sequence_parallel:
        full = tensor_parallel.gather_from_sequence_parallel_region(hidden_bsh.transpose(0, 1))
        return full.transpose(0, 1)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden_bsh)


def vocab_shard(cfg: ModelConfig, weight: torch.Tensor) -> tuple:
    """(first vocab id, real rows) of this TP rank's output-weight shard."""
    from megatron.core import parallel_state as ps
    rows = weight.shape[0]
    start = ps.get_tensor_model_parallel_rank() * rows
    return start, max(0, min(rows, cfg.vocab_size - start))
