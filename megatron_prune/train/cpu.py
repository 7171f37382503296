"""The CUDA-only call sites of megatron-core 0.16.1 that training reaches beyond `verify`'s.

`mcore_model.cpu_patches()` covers building and running a model; training also goes through
megatron's DistributedDataParallel (its grad buffers are allocated on `torch.cuda.current_device()`)
and the pipeline schedules (`torch.zeros(..., device="cuda")` for the token count, and
`torch.cuda.current_device()` / `torch.cuda.synchronize()` in the point-to-point exchange). The
module-level name `torch` of those three modules becomes a stand-in that sends them to the CPU;
everything else is the real torch. Nothing is done when CUDA is available.
"""
from __future__ import annotations

import types

import torch

from .. import mcore_model

_PATCHED = False


class _CudaOnCpu:
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
    """`torch` with `device="cuda"` tensor factories and `torch.cuda` sent to the CPU."""

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


def training_cpu_patches() -> bool:
    """Apply (once) on top of `mcore_model.cpu_patches()`; True when applied."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return _PATCHED
    mcore_model.cpu_patches()
    with mcore_model._quiet_megatron_import():
        import megatron.core.distributed.param_and_grad_buffer as buffers
        import megatron.core.pipeline_parallel.p2p_communication as p2p
        import megatron.core.pipeline_parallel.schedules as schedules
    for module in (buffers, p2p, schedules):
        module.torch = _TorchOnCpu()
    _PATCHED = True
    return True
