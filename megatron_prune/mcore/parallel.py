"""Process groups: torch.distributed plus megatron-core's model-parallel groups, and running a
model split over pipeline stages (`pipeline_forward` and its `recv_hidden` / `send_hidden`,
`gather_tp_logits`).

megatron-core is imported lazily inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.mcore.cpu import cpu_patches
from megatron_prune.mcore.model import stage_split

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The world size torchrun (or any launcher setting WORLD_SIZE) started this process with."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def resolve_parallel(ckpt, tp: Optional[int], pp: Optional[int], world: int) -> tuple:
    """(tp, pp, first, last) the model is built with.

    Given sizes win (a missing one is the checkpoint's). With none given: the checkpoint's TP and
    PP (and its stage split) when the world is a multiple of TP x PP; one process runs TP=PP=1.
    """
    if tp is None and pp is None and world == 1 and ckpt.tp * ckpt.pp > 1:
        log.info("one process: running the TP=%d PP=%d checkpoint at TP=1 PP=1 "
                 "(resharded on load)", ckpt.tp, ckpt.pp)
        tp, pp = 1, 1
    tp = ckpt.tp if tp is None else tp
    pp = ckpt.pp if pp is None else pp
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tensor/pipeline-model-parallel-size must be >= 1, got {tp}, {pp}")
    if world % (tp * pp):
        raise ConfigError(
            f"world size {world} is not a multiple of TP x PP = {tp} x {pp}; launch with "
            f"torchrun --nproc_per_node {tp * pp} (or a multiple of it), or pass "
            "--tensor-model-parallel-size / --pipeline-model-parallel-size")
    if pp == ckpt.pp:
        first, last = stage_split(ckpt.stage_counts)
    else:
        first = last = None
    layout.check_parallel(ckpt.config, tp, layout.stage_layer_counts(
        ckpt.config.num_layers, pp, first, last))
    return tp, pp, first, last


def init_distributed(tp: int = 1, pp: int = 1, backend: Optional[str] = None,
                     seed: int = DEFAULT_SEED, timeout_minutes: int = 30) -> dict:
    """torch.distributed + megatron-core model-parallel groups for TP x PP (x DP from the world).

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without them runs as a
    single process on a free local port. gloo on CPU, nccl with CUDA (one GPU per local rank).
    Returns {"rank", "world_size", "tp_rank", "pp_rank", "dp_rank", "device"}.
    """
    import torch.distributed as dist
    cpu_patches()
    with quiet_megatron_import():
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
    from megatron.core import parallel_state as ps

    if position_ids is None:
        position_ids = positions_of(input_ids)
    if not ps.is_pipeline_first_stage():
        model.set_input_tensor(recv_hidden(model, input_ids))
    with quiet_megatron_import():
        out = model(input_ids, position_ids, attention_mask)
    return send_hidden(out)


def positions_of(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def recv_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The previous pipeline stage's hidden states [seq, batch, hidden] for `input_ids`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    b, s = input_ids.shape
    cfg = model.config
    hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=input_ids.device)
    dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
    return hidden


def send_hidden(out: torch.Tensor) -> Optional[torch.Tensor]:
    """On a non-last stage: `out` sent to the next stage, None returned; on the last: `out`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if ps.is_pipeline_last_stage():
        return out
    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return None


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

