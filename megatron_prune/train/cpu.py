"""The CUDA-only call sites of megatron-core 0.16.1 that training reaches beyond `verify`'s.

`cpu_patches()` covers building and running a model; training also goes through
megatron's DistributedDataParallel (its grad buffers are allocated on `torch.cuda.current_device()`)
and the pipeline schedules (`torch.zeros(..., device="cuda")` for the token count, and
`torch.cuda.current_device()` / `torch.cuda.synchronize()` in the point-to-point exchange). The
module-level name `torch` of those three modules becomes a stand-in that sends them to the CPU;
everything else is the real torch. Nothing is done when CUDA is available.
"""
from __future__ import annotations

import torch

from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.mcore.cpu import _TorchOnCpu, cpu_patches

_PATCHED = False


def training_cpu_patches() -> bool:
    """Apply (once) on top of `cpu_patches()`; True when applied."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return _PATCHED
    cpu_patches()
    with quiet_megatron_import():
        import megatron.core.distributed.param_and_grad_buffer as buffers
        import megatron.core.pipeline_parallel.p2p_communication as p2p
        import megatron.core.pipeline_parallel.schedules as schedules
    for module in (buffers, p2p, schedules):
        module.torch = _TorchOnCpu()
    _PATCHED = True
    return True
