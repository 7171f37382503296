"""Real megatron-core GPTModels built from this project's ModelConfig, and loaded from its checkpoints.

The pieces every tool that runs a Megatron model needs (verify now, the recovery trainer later):

* `cpu_patches()`      the few CUDA-only call sites of megatron-core 0.16.1 redirected to the CPU
                       (applied only when CUDA is unavailable; idempotent);
* `init_distributed()` torch.distributed from torchrun's env vars (or one process) + mcore's
                       model-parallel groups + its RNG tracker seeds;
* `transformer_config()` / `build_gpt_model()`  a Llama-shaped GPTModel for this rank's (TP, PP) piece;
* `load_legacy_into_model()`  this rank's legacy rank file into that piece, strictly, with TE <-> local
                       parameter names translated through `layout` (a checkpoint may be saved
                       with either naming whatever spec the model was built with).

megatron-core is imported lazily inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import types
import warnings
from datetime import timedelta
from typing import Optional, Sequence

import torch

from . import layout
from .config import MEGATRON_LLAMA3_ROPE, ConfigError, ModelConfig
from .tensor_io import CheckpointReadError

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234


# ============================================================================ CPU patches
class _CudaOnCpu:
    """`torch.cuda` as seen by a patched megatron module: `current_device()` is the CPU and
    `synchronize()` does nothing."""

    def __init__(self, real):
        self._real = real

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(self._real, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for the name `torch` inside one megatron module (applied only without CUDA):
    `torch.cuda` and `device="cuda"` tensor factories go to the CPU, everything else is torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu(torch.cuda)

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """megatron.core.transformer.utils.get_default_causal_mask, on the CPU instead of `cuda`."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_buffer_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """megatron.core.utils.GlobalMemoryBuffer.get_tensor, allocating on the CPU."""
    required = math.prod(tensor_shape)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required:
        buf = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype)
    return buf[:required].view(*tensor_shape)


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """mcore's RNG tracker with the CPU generator standing in for the CUDA one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


_PATCHED = False


def cpu_patches() -> bool:
    """Redirect megatron-core 0.16.1's CUDA-only call sites to the CPU; True when applied.

    Does nothing when CUDA is available; safe to call any number of times. The patches (each at
    the narrowest place that reaches the call):

    1. `torch.cuda.current_device()` inside `models.common.embeddings.rotary_pos_embedding`
       (RotaryEmbedding moves `inv_freq` there on its first forward) and `tensor_parallel.layers`
       (GPU-side weight/grad buffers): the module's global `torch` becomes a stand-in whose
       `cuda.current_device()` is the CPU; everything else is the real torch.
    2. `get_default_causal_mask` (the causal mask local attention builds when none is passed) is
       created on `cuda`: replaced in `transformer.utils` and in `fusions.fused_softmax`, which
       imported it by name.
    3. `GlobalMemoryBuffer.get_tensor` (`megatron.core.utils`; local attention's score buffer)
       allocates on `torch.cuda.current_device()`: replaced by the same buffer on the CPU.
    4. The CUDA RNG tracker (`tensor_parallel.random`): `_get_cuda_rng_state`/`_set_cuda_rng_state`
       use the CPU generator, and `initialize_rng_tracker` installs a tracker subclass whose
       `add`/`fork` seed and fork the CPU generator (mcore's calls `torch.cuda.get_rng_state`).
       Used by `model_parallel_cuda_manual_seed`, attention dropout and activation recompute.
    5. `LanguageModule.setup_embeddings_and_output_layer` moves the shared embedding copy of a
       tied model with PP > 1 to `.cuda()` before its all-reduce: that step is done on the CPU.
    """
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return _PATCHED
    with _quiet_megatron_import():
        import megatron.core.fusions.fused_softmax as fused_softmax
        import megatron.core.models.common.embeddings.rotary_pos_embedding as rope
        import megatron.core.tensor_parallel.layers as tp_layers
        import megatron.core.tensor_parallel.random as mrandom
        import megatron.core.transformer.utils as tutils
        import megatron.core.utils as mutils
        from megatron.core.models.common.language_module import language_module

    for module in (rope, tp_layers):
        module.torch = _TorchOnCpu()

    tutils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    mutils.GlobalMemoryBuffer.get_tensor = _cpu_buffer_get_tensor

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    tracker_class = _cpu_rng_tracker_class()
    orig_init_tracker = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False,
                               use_cudagraphable_rng=False, force_reset=False):
        orig_init_tracker(use_te_rng_tracker, inference_rng_tracker, use_cudagraphable_rng,
                          force_reset)
        if type(mrandom._CUDA_RNG_STATE_TRACKER) is mrandom.CudaRNGStatesTracker:
            mrandom._CUDA_RNG_STATE_TRACKER = tracker_class()

    mrandom.initialize_rng_tracker = initialize_rng_tracker

    cls = language_module.LanguageModule
    orig_setup = cls.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        in_embedding_group = self._is_in_embd_group
        self._is_in_embd_group = lambda: False  # skips the original's `.cuda()` + all-reduce
        try:
            orig_setup(self)
        finally:
            del self._is_in_embd_group
        shared = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if (shared and self.config.pipeline_model_parallel_size > 1
                and torch.distributed.is_initialized() and in_embedding_group()):
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data,
                                         group=self.embd_group)

    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    _PATCHED = True
    return True


# Warnings megatron-core 0.16.1 gives on every CPU / no-Apex run: expected here, not news.
_EXPECTED_WARNINGS = (
    ".*Transformer Engine and Apex are not installed.*",
    "Apex is not installed. Falling back to Torch Norm",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    "full scope is deprecated.*",
)


@contextlib.contextmanager
def _quiet_megatron_import():
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


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


# ============================================================================ distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, backend: Optional[str] = None,
                     seed: int = DEFAULT_SEED, timeout_minutes: int = 30) -> dict:
    """torch.distributed + megatron-core model-parallel groups for TP x PP (x DP from the world).

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without them runs as a
    single process on a free local port. gloo on CPU, nccl with CUDA (one GPU per local rank).
    Returns {"rank", "world_size", "tp_rank", "pp_rank", "dp_rank", "device"}.
    """
    import torch.distributed as dist
    cpu_patches()
    with _quiet_megatron_import():
        from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(
            f"world size {world} is not a multiple of TP x PP = {tp} x {pp}; launch with "
            f"torchrun --nproc_per_node {tp * pp}")
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ConfigError(f"model parallel already initialised with TP, PP = {have}, "
                              f"asked for {(tp, pp)}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            create_gloo_process_groups=True, distributed_timeout_minutes=timeout_minutes)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return {"rank": dist.get_rank(), "world_size": world,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "device": torch.device("cuda", torch.cuda.current_device()) if cuda
            else torch.device("cpu")}


def destroy_distributed() -> None:
    """Tear down what init_distributed made (model-parallel groups, then the process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ============================================================================ model
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
    with _quiet_megatron_import():
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
    with _quiet_megatron_import():
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
    with _quiet_megatron_import():
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
    with _quiet_megatron_import():
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


# ============================================================================ loading
def _stage_ranges(model, cfg: ModelConfig, pp: int) -> list:
    info = getattr(model, "mp_stage_info", {}) or {}
    counts = layout.stage_layer_counts(cfg.num_layers, pp, info.get("first"), info.get("last"))
    return layout.stage_ranges(counts)


def legacy_rank_state(ckpt, cfg: ModelConfig, impl: str, tp: int, pp: int, tp_rank: int,
                      pp_rank: int, ranges, divisible_by: int, reshard: bool = True) -> dict:
    """The state dict of rank (tp_rank, pp_rank) of a TP x PP model, named for `impl`.

    Read straight from the rank file when the checkpoint has this TP/PP, stage split and vocab
    padding (names translated TE <-> local through `layout`). Otherwise, with `reshard`, the
    shard is cut from the checkpoint's merged tensors through `convert.MegatronSource` (the
    same path as `megatron-prune reshard`, reading only the TP input ranks it needs).
    """
    from .tensor_io import torch_load
    same_layout = ((ckpt.tp, ckpt.pp) == (tp, pp) and list(ckpt.ranges) == list(ranges)
                   and ckpt.divisible_by == divisible_by)
    if not same_layout:
        if not reshard:
            raise ConfigError(
                f"{ckpt.root}: checkpoint is TP={ckpt.tp} PP={ckpt.pp} (stages "
                f"{ckpt.stage_counts}, vocab multiple {ckpt.divisible_by}), the model TP={tp} "
                f"PP={pp} (stages {[e - s for s, e in ranges]}, vocab multiple {divisible_by})")
        from .convert import MegatronSource, megatron_rank_state
        return megatron_rank_state(MegatronSource(ckpt), cfg, impl, tp, tp_rank, pp_rank,
                                   ranges, ckpt.dtype, divisible_by)
    path = ckpt.files[(tp_rank, pp_rank)]
    state = torch_load(path)["model"]
    if ckpt.impl == impl:
        return state
    src = layout.stage_entries(cfg, ckpt.impl, pp_rank, ranges)
    dst = layout.stage_entries(cfg, impl, pp_rank, ranges)
    rename = {s.name: d.name for s, d in zip(src, dst)}
    src_extra = set(layout.extra_state_names(ckpt.impl, pp_rank, ranges))
    out = {}
    for name, value in state.items():
        if name in rename:
            out[rename[name]] = value
        elif name not in src_extra:
            out[name] = value  # unknown: the strict load below names it
    return out


def load_legacy_into_model(model, ckpt_dir, *, tp_rank: Optional[int] = None,
                           pp_rank: Optional[int] = None, strict: bool = True,
                           reshard: bool = True):
    """Load this rank's piece of a legacy Megatron checkpoint into `model` (strict by default).

    Tensor names of either layer spec are accepted (TE-named files into a local-spec model and
    back, via `layout`); `_extra_state` entries the model has are taken from the file when it has
    the same spec, else kept from the model (mcore's own layers save None there). A checkpoint
    of another TP/PP/stage split is resharded on the fly (`reshard=False` refuses it instead).
    Returns the opened `LegacyCheckpoint`.
    """
    from megatron.core import parallel_state

    from .megatron_checkpoint import LegacyCheckpoint

    ckpt = LegacyCheckpoint(ckpt_dir)
    cfg = ckpt.config
    info = getattr(model, "mp_stage_info", None) or {}
    tp = info.get("tp") or parallel_state.get_tensor_model_parallel_world_size()
    pp = info.get("pp") or parallel_state.get_pipeline_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    impl = model_impl(model)
    ranges = _stage_ranges(model, cfg, pp)
    state = legacy_rank_state(ckpt, cfg, impl, tp, pp, tp_rank, pp_rank, ranges,
                              info.get("divisible_by", ckpt.divisible_by), reshard=reshard)

    own = model.state_dict(keep_vars=True)
    for name, value in own.items():
        if name.endswith("._extra_state") and name not in state:
            state[name] = value
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointReadError(
                f"{ckpt.files[(tp_rank, pp_rank)]}: does not match the model "
                f"({impl} spec, TP={tp} PP={pp} stage {pp_rank}): missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}")
        for name, value in state.items():
            if torch.is_tensor(value) and torch.is_tensor(own[name]) \
                    and tuple(value.shape) != tuple(own[name].shape):
                raise CheckpointReadError(
                    f"{ckpt.files[(tp_rank, pp_rank)]}: {name} has shape {tuple(value.shape)}, "
                    f"the model {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=strict)
    return ckpt


def load_checkpoint_into_model(model, ckpt_dir, **kwargs):
    """Load either checkpoint format into `model`: legacy rank files through
    `load_legacy_into_model`; torch_dist through megatron-core's own loader, which reshards on
    load. Returns the opened checkpoint."""
    from .megatron_checkpoint import checkpoint_format
    if checkpoint_format(ckpt_dir) == "torch":
        return load_legacy_into_model(model, ckpt_dir, **kwargs)
    from megatron.core import dist_checkpointing

    from .dist_checkpoint import DistCheckpoint
    ckpt = DistCheckpoint(ckpt_dir)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.dir))
    model.load_state_dict(loaded["model"], strict=True)
    return ckpt


# ============================================================================ running
def pipeline_forward(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None):
    """One forward pass of a (possibly pipelined) model piece; activations go stage to stage.

    Every rank calls this with the same `input_ids` [batch, seq]. Non-first stages receive the
    previous stage's hidden states [seq, batch, hidden] (point-to-point in the pipeline group),
    non-last stages send theirs on. Returns this TP rank's vocab-parallel logits
    [batch, seq, padded_vocab/TP] on the last stage, None elsewhere. No mask means causal.
    (A hand-rolled schedule of one micro-batch: mcore's `get_forward_backward_func` schedules
    allocate CUDA tensors unconditionally in 0.16.1.)
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        cfg = model.config
        hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=input_ids.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with _quiet_megatron_import():
        out = model(input_ids, position_ids, attention_mask)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def gather_tp_logits(logits: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Vocab-parallel logits [..., V/TP] -> full logits [..., V] on every TP rank (no autograd),
    cut to the real `vocab_size` when given (dropping Megatron's padding rows)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits if vocab_size is None else logits[..., :vocab_size]
