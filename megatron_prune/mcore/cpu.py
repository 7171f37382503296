"""megatron-core 0.16.1's CUDA-only call sites redirected to the CPU (`cpu_patches`).

Applied only when CUDA is unavailable, and idempotent. megatron-core is imported only when the
patches are applied.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch

from megatron_prune.checkpoint.mcore_import import quiet_megatron_import


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
    with quiet_megatron_import():
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

