"""The calibration loss on megatron-core, and the loss with each layer skipped.

`run` is importance_mcore's `_Run`: this rank's place in the TP x PP x DP grid and its model
piece (`model`, `cfg`, `tp`, `tp_rank`, `start` / `end` of its layers, `device`, `ps`,
`my_batches`, `all_reduce`). The loss is HF's: the mean next-token cross entropy over the real
vocab (Megatron's padding columns masked out), summed over samples on TP rank 0 of the last
stage, so that one SUM all-reduce over the world totals the data-parallel replicas.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.mcore.parallel import pipeline_forward, positions_of, recv_hidden, send_hidden
from megatron_prune.prune.importance_hf import first_call


def masked_vocab(logits: torch.Tensor, run) -> torch.Tensor:
    """Vocab-parallel logits with Megatron's padding columns set to -inf (the HF model has none)."""
    local = logits.shape[-1]
    cols = run.tp_rank * local + torch.arange(local, device=logits.device)
    pad = cols >= run.cfg.vocab_size
    return logits.masked_fill(pad, float("-inf")) if bool(pad.any()) else logits


def batch_loss(run, out: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The micro-batch's sum over samples of the mean next-token loss, from the last stage's
    logits `out` (None elsewhere); zero but on TP rank 0 of the last stage."""
    from megatron.core import tensor_parallel
    zero = torch.zeros((), dtype=torch.float64, device=run.device)
    if out is None:
        return zero
    logits = masked_vocab(out, run)[:, :-1].float().contiguous()
    # (a collective over the TP group: every TP rank computes it, rank 0 counts it)
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, ids[:, 1:].contiguous())
    return per_token.double().mean(1).sum() if run.tp_rank == 0 else zero


def layer_losses(run, batches: torch.Tensor, micro_batch: int,
                 progress: bool) -> Optional[dict]:
    """{"loss", "layer_loss"} as `importance_hf.layer_losses`, on global rank 0 (None elsewhere).

    As there, skipping layer i leaves the layers before it as they are, so they are not rerun:
    per micro-batch the whole pipeline runs once (the plain loss; each stage keeps its input and
    the arguments its decoder gives its layers), then for each i the stage holding layer i runs
    its layers after i from that layer's running input (the model's own forward, its decoder
    holding just those layers) and advances the input through layer i; the later stages run
    whole on what they receive, the earlier ones wait."""
    import torch.distributed as dist
    from tqdm.auto import tqdm
    layers = run.model.decoder.layers  # this stage's: layers run.start .. run.end - 1
    sums = torch.zeros(run.cfg.num_layers + 1, dtype=torch.float64, device=run.device)
    mine = list(run.my_batches(batches, micro_batch))
    run.model.eval()
    with torch.no_grad(), tqdm(total=run.cfg.num_layers * len(mine), unit="layer",
                               desc=f"layer loss ({len(mine)} micro-batches)",
                               disable=not progress or dist.get_rank() != 0) as bar:
        for ids in mine:
            hidden, args, kwargs, out = _first_layer_call(run, ids)
            sums[0] += batch_loss(run, out, ids)
            for i in range(run.cfg.num_layers):
                bar.update()
                if i >= run.end:  # a later stage's layer: this stage's output is the plain one
                    continue
                if i >= run.start:  # this stage's layer
                    out = _stage_forward(run, ids, hidden, layers[i - run.start + 1:])
                    hidden = layers[i - run.start](hidden, *args, **kwargs)[0]
                else:  # an earlier stage's: this one runs whole on what it receives
                    out = _stage_forward(run, ids, recv_hidden(run.model, ids), layers)
                sums[i + 1] += batch_loss(run, send_hidden(out), ids)
    return mean_losses(run, sums, len(batches))


def _stage_forward(run, ids: torch.Tensor, hidden: torch.Tensor, layers) -> torch.Tensor:
    """This stage's forward from its input `hidden` [seq, batch, hidden] through `layers` only
    (then the final norm and output layer on the last stage), as the model computes it."""
    decoder, every = run.model.decoder, run.model.decoder.layers
    decoder.layers = layers
    try:
        if run.ps.is_pipeline_first_stage():
            return run.model(ids, positions_of(ids), None, decoder_input=hidden)
        run.model.set_input_tensor(hidden)
        return run.model(ids, positions_of(ids), None)
    finally:
        decoder.layers = every


def _first_layer_call(run, ids: torch.Tensor):
    """The whole pipeline on `ids`: this stage's first layer's input, the other arguments the
    decoder gives every layer (mask, rotary embedding, ...), and the logits (None off the last
    stage)."""
    with first_call(run.model.decoder.layers[0]) as call:
        out = pipeline_forward(run.model, ids)
    return (*call, out)


def mean_losses(run, sums: torch.Tensor, samples: int) -> Optional[dict]:
    """[plain, skip 0 .. L-1] summed on this rank -> the means over all samples, on rank 0."""
    import torch.distributed as dist
    run.all_reduce(sums)
    if dist.get_rank() != 0:
        return None
    mean = (sums / samples).tolist()
    return {"loss": mean[0], "layer_loss": mean[1:]}
