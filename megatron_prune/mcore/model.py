"""Real megatron-core GPTModels built from this project's ModelConfig.

* `transformer_config()` / `build_gpt_model()`: a Llama-shaped GPTModel for this rank's (TP, PP)
  piece, with the TE or the local layer spec (`resolve_impl`: TE only where importable);
* `stage_split()`: the first/last stage sizes Megatron needs for uneven pipeline stages.

The rest of the megatron-core layer lives beside it: `cpu.py` (the CPU patches), `parallel.py`
(process groups, pipeline forward) and `load.py` (checkpoints into a built model).
megatron-core is imported lazily inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import MEGATRON_LLAMA3_ROPE, ConfigError, ModelConfig
from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.mcore.cpu import cpu_patches

log = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing CUDA libraries)
        return False
    return True


def resolve_impl(impl: str) -> str:
    """The layer spec a model will actually be built with: TE only when it is importable."""
    if impl not in layout.IMPLS:
        raise ConfigError(f"unknown transformer impl {impl!r}; choose from {layout.IMPLS}")
    if impl == layout.TE and not have_transformer_engine():
        log.debug("transformer_engine is not importable; using the local spec")
        return layout.LOCAL
    return impl


def stage_split(counts: Sequence[int]) -> tuple:
    """(first, last) stage sizes Megatron needs for these per-stage layer counts (None = even)."""
    counts = list(counts)
    if len(counts) <= 1 or len(set(counts)) == 1:
        return None, None
    n, pp = sum(counts), len(counts)
    for first, last in ((counts[0], None), (None, counts[-1]), (counts[0], counts[-1])):
        try:
            if layout.stage_layer_counts(n, pp, first, last) == counts:
                return first, last
        except ConfigError:
            pass
    raise ConfigError(f"pipeline stage sizes {counts} are not a Megatron split (only the first "
                      "and last stage may differ from the others)")


def transformer_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, tp: int = 1,
                       pp: int = 1, *, first: Optional[int] = None, last: Optional[int] = None,
                       impl: str = layout.LOCAL, **overrides):
    """megatron-core TransformerConfig of a Llama-family model at this TP/PP.

    RMSNorm, SwiGLU (gated silu), no biases, GQA, no dropout. Uneven pipelines give the first/last
    stage sizes (as `--decoder-first/last-pipeline-num-layers`). Fusions stay off on the CPU.
    `overrides` are passed on to TransformerConfig (e.g. recompute settings for training).
    """
    import torch.nn.functional as F
    with quiet_megatron_import():
        from megatron.core.transformer.enums import AttnBackend
        from megatron.core.transformer.transformer_config import TransformerConfig

    layout.check_parallel(cfg, tp, layout.stage_layer_counts(cfg.num_layers, pp, first, last))
    cuda = torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        rotary_interleaved=False, apply_residual_connection_post_layernorm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        sequence_parallel=False,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        attention_softmax_in_fp32=True,
        # Fused kernels: jit-fused SwiGLU / bias-dropout-add on GPU only; the others need
        # Apex/TE kernels, which this project does not require. (Training turns on
        # gradient_accumulation_fusion through its overrides, with train.fusions' stand-in for
        # Apex's kernel: it needs megatron DDP's main_grad, which only training has.)
        bias_activation_fusion=cuda, bias_dropout_fusion=cuda,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_backend=AttnBackend.local if impl == layout.LOCAL else AttnBackend.auto,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layer_spec(impl: str):
    with quiet_megatron_import():
        from megatron.core.models.gpt import gpt_layer_specs
    if impl == layout.TE:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")




def build_gpt_model(cfg: ModelConfig, *, impl: str = layout.LOCAL,
                    dtype: torch.dtype = torch.float32, tp: Optional[int] = None,
                    pp: Optional[int] = None, first: Optional[int] = None,
                    last: Optional[int] = None, divisible_by: int = 128,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    parallel_output: bool = True, config_overrides: Optional[dict] = None):
    """This rank's piece of a megatron-core GPTModel (call `init_distributed` first).

    TP/PP and pre/post-process default to the initialised model-parallel state. `impl` is the
    requested layer spec; Transformer Engine's is used only when TE is importable, else the local
    one (`model_impl(model)` tells which). The vocab is padded as Megatron pads it for this TP.
    """
    cpu_patches()
    with quiet_megatron_import():
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

    tp = tp or parallel_state.get_tensor_model_parallel_world_size()
    pp = pp or parallel_state.get_pipeline_model_parallel_world_size()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    impl = resolve_impl(impl)
    scaling = cfg.rope_scaling or {}
    with quiet_megatron_import():
        tconfig = transformer_config(cfg, dtype, tp, pp, first=first, last=last, impl=impl,
                                     **(config_overrides or {}))
        model = GPTModel(
            config=tconfig, transformer_layer_spec=_layer_spec(impl),
            vocab_size=cfg.padded_vocab_size(tp, divisible_by),
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=cfg.rotary_base,
            rope_scaling=bool(scaling), rope_scaling_factor=float(scaling.get("factor", 8.0)),
        )
    if scaling and any(float(scaling.get(k, v)) != v for k, v in MEGATRON_LLAMA3_ROPE.items()):
        # mcore passes only the factor to its llama3 scaling; apply the model's other parameters.
        rope = model.rotary_pos_emb
        dim = cfg.head_dim
        base = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                       device=rope.inv_freq.device) / dim))
        rope.inv_freq = rope._apply_scaling(
            base, factor=float(scaling.get("factor", 8.0)),
            **{k: float(scaling.get(k, v)) for k, v in MEGATRON_LLAMA3_ROPE.items()})
    model.mp_stage_info = {"impl": impl, "tp": tp, "pp": pp, "first": first, "last": last,
                           "divisible_by": divisible_by}
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def model_impl(model) -> str:
    info = getattr(model, "mp_stage_info", None)
    return info["impl"] if info else layout.detect_impl(model.state_dict().keys())


