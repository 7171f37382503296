"""The harness's `train` mode: Megatron-LM's `pretrain_gpt.py` (and mlm_logits.py, its model builder
and checkpoint loader) on a CPU over gloo.

Megatron-LM assumes CUDA. Each stand-in below replaces the module-global name `torch` of ONE
Megatron-LM module by `_TorchOnCpu`, which is the real torch except that `torch.cuda.*` answers
as one CPU "device" and tensor factories given `device="cuda"` build CPU tensors. The list
`_MODULES` names every module patched and the CUDA call of it that fails on a CPU; `PATCHES`
applies them (and the few other stand-ins below) right after each module is first imported,
through sitecustomize.py. Nothing else of Megatron-LM is changed.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch


class _NoStream:
    """A CUDA stream where there is none: CPU work is ordered anyway."""

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class _CudaOnCpu(types.SimpleNamespace):
    """`torch.cuda` as seen by a patched module: one device, which is the CPU."""

    def __init__(self):
        cpu = torch.device("cpu")
        super().__init__(
            is_available=lambda: True, device_count=lambda: 1, current_device=lambda: cpu,
            set_device=lambda *a, **k: None, synchronize=lambda *a, **k: None,
            empty_cache=lambda: None,
            get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
            manual_seed=torch.manual_seed,
            # training/utils.py:448 get_device_arch_version (TP>1 checks in arguments.py:928)
            get_device_properties=lambda *a: types.SimpleNamespace(major=9, minor=0),
            Stream=_NoStream, current_stream=_NoStream, stream=lambda s: contextlib.nullcontext())

    def __getattr__(self, name):  # anything not stood in: the real torch.cuda
        return getattr(torch.cuda, name)


def _cpu_kwargs(kwargs):
    dev = kwargs.get("device")
    if dev is not None and (isinstance(dev, int) or str(dev).startswith("cuda")):
        kwargs["device"] = "cpu"
    return kwargs


class _TorchOnCpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)

    def tensor(self, *a, **k):
        return torch.tensor(*a, **_cpu_kwargs(k))

    def zeros(self, *a, **k):
        return torch.zeros(*a, **_cpu_kwargs(k))

    def ones(self, *a, **k):
        return torch.ones(*a, **_cpu_kwargs(k))

    def empty(self, *a, **k):
        return torch.empty(*a, **_cpu_kwargs(k))


# module -> the CUDA call in it that fails on a CPU (megatron core_v0.16.1 line numbers). Each
# was checked to be needed: without it pretrain_gpt.py (TP=1 torch, or TP=2 torch_dist with the
# distributed optimizer) or mlm_logits.py fails.
_MODULES = {
    "megatron.training.initialize":
        "initialize.py:62 assert torch.cuda.is_available(); :319 torch.cuda.device_count() "
        "gates initialize_model_parallel",
    "megatron.core.tensor_parallel.random":
        "random.py:235-238 CudaRNGStatesTracker.add: torch.cuda.get_rng_state/manual_seed",
    "megatron.training.training":
        "training.py:806,812 torch.tensor(..., device='cuda') (start-up timestamps), ...",
    "megatron.core.timers":
        "timers.py:152,165 torch.cuda.synchronize(); :303 device=torch.cuda.current_device()",
    "megatron.core.distributed.param_and_grad_buffer":
        "param_and_grad_buffer.py:783-806 grad/param buffers on torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.schedules":
        "schedules.py:596 total_num_tokens = torch.zeros([], ..., device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication":
        "p2p_communication.py:313,321 receive buffers on torch.cuda.current_device(); :242,398 "
        "torch.cuda.synchronize() (PP > 1)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "rotary_pos_embedding.py:162 inv_freq.to(device=torch.cuda.current_device())",
    "megatron.core.transformer.utils":
        "utils.py:35 get_default_causal_mask: torch.ones(sq, sq, device='cuda') (a forward "
        "without attention_mask, as mlm_logits.py runs)",
    "megatron.core.utils":
        "utils.py:631 GlobalMemoryBuffer.get_tensor on torch.cuda.current_device() (attention "
        "scores)",
    "megatron.core.optimizer.optimizer":
        "optimizer.py:473-485 found_inf/_dummy_overflow_buf/_scale_one on device='cuda'",
    "megatron.core.optimizer.clip_grads":
        "clip_grads.py:90-115 total_norm_cuda, grad_norm on device='cuda'; :207 total_num_zeros",
    "megatron.training.utils":
        "utils.py:253 reduce_max_stat_across_model_parallel_group on "
        "torch.cuda.current_device(); :284-286 torch.cuda.memory_allocated() in memory reports",
    "megatron.training.checkpointing":
        "checkpointing.py:315 iters_cuda = torch.tensor(..., device='cuda'); :343 "
        "'cuda_rng_state': torch.cuda.get_rng_state()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "filesystem_async.py:230 preload_tensors: torch.cuda.synchronize() (torch_dist save)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "state_dict_saver.py:252 node-failure flag on torch.cuda.current_device()",
}


def _prebuilt_dataset_helpers(dutils) -> None:
    """Not CUDA: initialize.py:192 runs `compile_helpers()` (utils.py:24, `make` in the source
    tree), which writes helpers_cpp*.so into Megatron-LM's read-only tree and needs pybind11. The
    pip megatron-core wheel of the same release (0.16.1) ships that module prebuilt from the same
    helpers.cpp: it is loaded under its Megatron-LM name, and compiling is skipped."""
    import glob
    import importlib.util
    from importlib.metadata import distribution
    dutils.compile_helpers = lambda: None
    name = "megatron.core.datasets.helpers_cpp"
    if name in sys.modules:
        return
    so = glob.glob(str(distribution("megatron-core").locate_file("megatron/core/datasets"))
                   + "/helpers_cpp*.so")[0]
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module


def _rng_on_cpu(mrandom) -> None:
    # random.py:55 _get_cuda_rng_state -> torch.cuda.random.get_rng_state, random.py:93-109
    # _set_cuda_rng_state -> torch.cuda.default_generators: the CPU generator stands for the GPU's.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _no_fused_kernel_build(fused_kernels) -> None:
    # initialize.py:224 fused_kernels.load(args) runs `$CUDA_HOME/bin/nvcc -V`
    # (legacy/fused_kernels/__init__.py:58; CUDA_HOME is None without a CUDA toolkit) and makes a
    # build/ directory in Megatron-LM's tree. It compiles nothing in this release: skipped.
    fused_kernels.load = lambda args: None


def _no_jit_warmup(initialize) -> None:
    # initialize.py:474-512 _warmup_jit_function runs the fused bias-SwiGLU/GeLU and
    # bias-dropout-add kernels on `device="cuda"` tensors; this run uses neither fusion
    # (--no-bias-swiglu-fusion --no-bias-dropout-fusion): skipped.
    initialize._warmup_jit_function = lambda: None


def _then(*steps):
    def apply(module):
        for step in steps:
            step(module)
    return apply


_STAND_IN = _TorchOnCpu()


def _torch_on_cpu(module) -> None:
    module.torch = _STAND_IN


def _patches() -> dict:
    if torch.cuda.is_available():
        return {"megatron.core.datasets.utils": _prebuilt_dataset_helpers}
    patches = {name: _torch_on_cpu for name in _MODULES}
    patches["megatron.core.tensor_parallel.random"] = _then(_torch_on_cpu, _rng_on_cpu)
    patches["megatron.training.initialize"] = _then(_torch_on_cpu, _no_jit_warmup)
    patches["megatron.legacy.fused_kernels"] = _no_fused_kernel_build
    patches["megatron.core.datasets.utils"] = _prebuilt_dataset_helpers
    return patches


PATCHES = _patches()


def install() -> None:
    if torch.cuda.is_available():
        return
    # Tensor.cuda raises without CUDA. Callers: training/utils.py:534-541 get_batch_on_this_tp_rank
    # (`data["tokens"].cuda(non_blocking=True)`, ...), training.py:1258 get_model
    # (`model_module.cuda(torch.cuda.current_device())`, through Module._apply). Tensors stay on
    # the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # distrib_optimizer.py:361,420 (and clip_grads.py:167) accept a parameter only if
    # `param.type()` is 'torch.cuda.FloatTensor'/... : asked with no argument, a CPU tensor names
    # its CUDA type. Tensor.type(dtype) (a conversion) is unchanged.
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return tensor_type(self).replace("torch.", "torch.cuda.", 1)
        return tensor_type(self, dtype, *args, **kwargs)

    torch.Tensor.type = cuda_type_name
