"""Importing megatron-core without its expected CPU / no-Apex warnings.

Lives in the checkpoint layer because the torch_dist format needs megatron-core's sharded-tensor
classes; nothing here imports megatron-core by itself.
"""
from __future__ import annotations

import contextlib
import warnings

# Warnings megatron-core 0.16.1 gives on every CPU / no-Apex run: expected here, not news.
_EXPECTED_WARNINGS = (
    ".*Transformer Engine and Apex are not installed.*",
    "Apex is not installed. Falling back to Torch Norm",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    "full scope is deprecated.*",
)


@contextlib.contextmanager
def quiet_megatron_import():
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


