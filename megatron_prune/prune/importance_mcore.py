"""Importance scores measured on a real megatron-core GPTModel, at any TP x PP (x DP).

The same definitions as `importance_hf.py` (the Hugging Face path), computed on this rank's piece
of a local-spec GPTModel loaded from a legacy Megatron checkpoint (resharded on load when the
requested TP/PP differ from the checkpoint's). Launch one process per rank:

    torchrun --nproc_per_node TPxPPxDP -m megatron_prune importance --load DIR --data F ...

activation — forward hooks on every local layer (megatron-core's [seq, batch, hidden] layout):
  * hidden channel: |input_layernorm output| and |pre_mlp_layernorm output|, one row per norm
    (replicated over TP: counted on TP rank 0 only);
  * head: |x| per channel of `linear_proj`'s input; TP rank r holds the channels of heads
    [r*H/TP, (r+1)*H/TP) (whole KV groups, in HF head order);
  * FFN neuron: |`linear_fc2` input| — already the activated SwiGLU slice silu(gate_r) * up_r of
    neurons [r*F/TP, (r+1)*F/TP) (the fused fc1's per-rank [gate_r; up_r] never needs undoing);
  * per-token statistics are averaged over the sequence, squared and summed over samples;
  * layer boundaries (the residual stream entering layer 0 and leaving every layer): with PP each
    stage holds its own; for the pairwise angular distances each boundary is sent, one at a
    time, point-to-point to every later stage, and each stage computes the pairs (a, b > a)
    whose later boundary it holds (exact, and memory-bounded to one extra boundary). The pairs
    are shared out among the TP ranks (identical replicas), round-robin.
  Every rank accumulates full-size sums (zeros outside what it owns: its heads/neurons, its
  layers, its pairs, its data-parallel share of the micro-batches); one SUM all-reduce over the
  world puts them together — the head and neuron slices land in head/neuron order. Then, as on
  the HF path, sqrt (L2 over samples), the norms' rows combined by `hidden_from_norms`, each
  head's channels by `heads_from_channels`, groups = sum of their heads, Block Influence and
  angular distances divided by the token count.
taylor — |w * mean dL/dw| with the LM loss over the real (unpadded) vocab; backward runs through
  the pipeline stage by stage (grads sent back point-to-point); tied embeddings with PP > 1 sum
  the embedding's and its last-stage copy's grads first, data-parallel replicas (which share
  the micro-batches) sum their grads too. Each rank's element scores are placed
  into the HF tensors they are a part of (through `layout`'s split rules) and summed per
  structure by `scores.weight_structure_scores`; the per-structure sums are all-reduced.
layer loss (`layer_loss=True`, beside either method) — the calibration LM loss (HF's mean over
  the real vocab) with each layer skipped in turn, the layers before it not rerun (as on the HF
  side; at any TP and PP: the stage holding the layer runs on from its running input, later
  stages run whole, earlier ones wait). The last stage sums the loss, one SUM all-reduce adds the
  data-parallel replicas' shares (counted on TP rank 0 of the last stage).

Only global rank 0 gets the scores (every other rank gets None).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.mcore.load import load_legacy_into_model
from megatron_prune.mcore.model import build_gpt_model
from megatron_prune.mcore.parallel import (destroy_distributed, init_distributed,
                                           launched_world_size, pipeline_forward, resolve_parallel)
from megatron_prune.prune.choose import combine
from megatron_prune.prune.importance_hf import (heads_from_channels, hidden_from_norms,
                                                norm_energy_hook)
from megatron_prune.prune.loss_mcore import layer_losses, masked_vocab
from megatron_prune.prune.scores import ImportanceScores, shape_of, weight_structure_scores

log = logging.getLogger(__name__)
METHODS = ("activation", "taylor", "auto")


def _check_batches(batches: torch.Tensor, cfg: ModelConfig) -> None:
    if int(batches.max()) >= cfg.vocab_size:
        raise ConfigError(f"calibration token id {int(batches.max())} >= model vocab "
                          f"{cfg.vocab_size}: tokenizer and model do not match")
    if batches.shape[1] > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {batches.shape[1]} exceeds max_position_embeddings "
                          f"{cfg.max_position_embeddings}")


class _Run:
    """This rank's place in the TP x PP x DP grid and its model piece."""

    def __init__(self, load, tp, pp, first, last, dtype, seed):
        from megatron.core import parallel_state as ps

        from megatron_prune.checkpoint.legacy import LegacyCheckpoint
        self.env = init_distributed(tp, pp, seed=seed)
        self.ps = ps
        self.ckpt = LegacyCheckpoint(load)
        self.cfg = self.ckpt.config
        self.tp, self.pp = tp, pp
        self.tp_rank, self.pp_rank = self.env["tp_rank"], self.env["pp_rank"]
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = self.env["dp_rank"]
        self.device = self.env["device"]
        self.ranges = layout.stage_ranges(layout.stage_layer_counts(
            self.cfg.num_layers, pp, first, last))
        self.start, self.end = self.ranges[self.pp_rank]
        self.divisible_by = self.ckpt.divisible_by
        # Always the local spec: its norms are modules of their own (hooks see their outputs).
        self.model = build_gpt_model(
            self.cfg, impl=layout.LOCAL, dtype=dtype, first=first, last=last,
            divisible_by=self.divisible_by)
        load_legacy_into_model(self.model, load)

    def my_batches(self, batches: torch.Tensor, micro_batch: int):
        """This data-parallel replica's micro-batches (round-robin), on the device."""
        for i, start in enumerate(range(0, len(batches), micro_batch)):
            if i % self.dp == self.dp_rank:
                yield batches[start:start + micro_batch].to(self.device)

    def all_reduce(self, *tensors) -> None:
        import torch.distributed as dist
        for t in tensors:
            dist.all_reduce(t)

    def stage_of_boundary(self, k: int) -> int:
        """Boundary 0 enters layer 0 (stage 0); boundary k > 0 leaves layer k - 1."""
        layer = max(k - 1, 0)
        return next(p for p, (s, e) in enumerate(self.ranges) if s <= layer < e)


# ============================================================================ activation
def _activation(run: _Run, batches: torch.Tensor, micro_batch: int, progress: bool):
    import torch.distributed as dist
    from tqdm.auto import tqdm

    cfg, dev, f64 = run.cfg, run.device, torch.float64
    L, d = cfg.num_layers, cfg.head_dim
    H, F = cfg.num_attention_heads, cfg.ffn_hidden_size
    h_local, f_local = H // run.tp, F // run.tp
    h0, f0 = run.tp_rank * h_local, run.tp_rank * f_local
    hidden_sq = torch.zeros(2 * L, cfg.hidden_size, dtype=f64, device=dev)  # one row per norm
    heads_sq = torch.zeros(L, H * d, dtype=f64, device=dev)  # per channel of linear_proj's input
    ffn_sq = torch.zeros(L, F, dtype=f64, device=dev)
    bi = torch.zeros(L, dtype=f64, device=dev)
    ang = torch.zeros(L + 1, L + 1, dtype=f64, device=dev)
    ntok = torch.zeros((), dtype=f64, device=dev)
    energy = torch.zeros(2 * L + 1, cfg.hidden_size, dtype=f64, device=dev)  # norm inputs

    def sq_of_seq_mean(per_token):
        # [seq, batch, n] -> sum over the batch of (mean over the sequence)^2: [n]
        return (per_token.double().mean(0) ** 2).sum(0)

    def norm_hook(row):
        def hook(m, inp, out):
            if run.tp_rank == 0:
                hidden_sq[row].add_(sq_of_seq_mean(out.abs()))
        return hook

    boundary = {}  # global boundary index -> [seq, batch, hidden] of this micro-batch

    # (hooks return None: a pre-hook's return value would replace the module's input)
    def heads_hook(g):
        def hook(m, inp):
            heads_sq[g, h0 * d:(h0 + h_local) * d] += sq_of_seq_mean(inp[0].abs())
        return hook

    def ffn_hook(g):
        def hook(m, inp):
            ffn_sq[g, f0:f0 + f_local] += sq_of_seq_mean(inp[0].abs())
        return hook

    def output_hook(g):
        def hook(m, args, out):
            boundary[g + 1] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    hooks = []
    layers = run.model.decoder.layers
    for j, layer in enumerate(layers):
        g = run.start + j
        hooks.append(layer.input_layernorm.register_forward_hook(norm_hook(2 * g)))
        hooks.append(layer.pre_mlp_layernorm.register_forward_hook(norm_hook(2 * g + 1)))
        if run.tp_rank == 0:  # norms are replicated over TP: count them once
            hooks.append(layer.input_layernorm.register_forward_pre_hook(
                norm_energy_hook(energy[2 * g])))
            hooks.append(layer.pre_mlp_layernorm.register_forward_pre_hook(
                norm_energy_hook(energy[2 * g + 1])))
        hooks.append(layer.self_attention.linear_proj.register_forward_pre_hook(heads_hook(g)))
        hooks.append(layer.mlp.linear_fc2.register_forward_pre_hook(ffn_hook(g)))
        hooks.append(layer.register_forward_hook(output_hook(g)))
    final_norm = getattr(run.model.decoder, "final_layernorm", None)  # last stage only
    if final_norm is not None and run.tp_rank == 0:
        hooks.append(final_norm.register_forward_pre_hook(norm_energy_hook(energy[2 * L])))
    if run.pp_rank == 0:
        def first_input(m, args, kwargs):
            boundary[0] = (args[0] if args else kwargs["hidden_states"]).detach()
        hooks.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))

    pp_group = run.ps.get_pipeline_model_parallel_group()
    owner = [run.stage_of_boundary(k) for k in range(L + 1)]
    mine = [k for k in range(L + 1) if owner[k] == run.pp_rank]
    pair_index = {}
    for a in range(L + 1):
        for b in range(a + 1, L + 1):
            pair_index[a, b] = len(pair_index)

    def flat(t):
        f = t.double().reshape(-1, t.shape[-1])
        return f, f.norm(dim=-1).clamp_min(1e-12)

    try:
        with torch.no_grad():
            steps = math.ceil(len(batches) / micro_batch / run.dp)
            for ids in tqdm(run.my_batches(batches, micro_batch), total=steps,
                            desc="activation importance", unit="batch",
                            disable=not progress or dist.get_rank() != 0):
                boundary.clear()
                pipeline_forward(run.model, ids)
                own = {k: flat(boundary[k]) for k in mine}
                shape = boundary[mine[0]].shape
                dtype = boundary[mine[0]].dtype
                for a in range(L + 1):
                    # the pairs (a, b > a) this rank computes: b on this stage, shared out
                    # round-robin among the TP ranks
                    todo = [b for b in mine
                            if b > a and pair_index[a, b] % run.tp == run.tp_rank]
                    if owner[a] == run.pp_rank:
                        fa, na = own[a]
                        for q in range(run.pp_rank + 1, run.pp):  # later stages need it
                            dist.send(boundary[a].contiguous(),
                                      dst=dist.get_global_rank(pp_group, q))
                    elif owner[a] < run.pp_rank:
                        buf = torch.empty(shape, dtype=dtype, device=dev)
                        dist.recv(buf, src=dist.get_global_rank(pp_group, owner[a]))
                        fa, na = flat(buf) if todo else (None, None)
                    for b in todo:
                        fb, nb = own[b]
                        cos = ((fa * fb).sum(-1) / (na * nb)).clamp(-1, 1)
                        ang[a, b] += (torch.arccos(cos) / math.pi).sum()
                        if b == a + 1:
                            bi[a] += (1 - cos).sum()
                if run.tp_rank == 0 and run.pp_rank == 0:
                    ntok += ids.numel()
                boundary.clear()
    finally:
        for hk in hooks:
            hk.remove()
    run.all_reduce(hidden_sq, heads_sq, ffn_sq, bi, ang, ntok, energy)
    if dist.get_rank() != 0:
        return None
    n = ntok.item()
    ang = ((ang + ang.T) / n).cpu()
    heads = heads_from_channels(heads_sq.cpu(), d)
    return ImportanceScores(
        "activation", shape_of(cfg), hidden=hidden_from_norms(hidden_sq.cpu()), heads=heads,
        groups=heads.reshape(L, cfg.num_query_groups, -1).sum(-1),
        ffn=ffn_sq.sqrt().cpu(), layers=(bi / n).cpu(),
        meta={"angular": ang.tolist(), "samples": len(batches), "seq_length": batches.shape[1],
              "norm_energy": energy.cpu(), "norm_l2": hidden_sq.sqrt().float().cpu()})


# ============================================================================ taylor
def _forward_backward(run: _Run, ids: torch.Tensor) -> None:
    """One micro-batch through the pipeline and back: grads accumulate in the parameters.

    The loss is HF's: mean next-token cross entropy over the batch's b x (s-1) positions, times
    b (so that dividing the summed grads by the number of samples gives the mean)."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    ps, model = run.ps, run.model
    b, s = ids.shape
    position_ids = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    inp = None
    if not first:
        tc = model.config
        inp = torch.empty(s, b, tc.hidden_size, dtype=tc.params_dtype, device=ids.device)
        dist.recv(inp, src=ps.get_pipeline_model_parallel_prev_rank())
        inp.requires_grad_(True)
        model.set_input_tensor(inp)
    with quiet_megatron_import():
        out = model(ids, position_ids, None)
    if last:
        logits = masked_vocab(out, run)[:, :-1].float().contiguous()
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, ids[:, 1:].contiguous())
        (per_token.mean() * b).backward()
    else:
        dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(out)
        dist.recv(grad, src=ps.get_pipeline_model_parallel_next_rank())
        torch.autograd.backward(out, grad)
    if not first:
        dist.send(inp.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())


def _taylor(run: _Run, batches: torch.Tensor, micro_batch: int, progress: bool):
    import torch.distributed as dist
    from tqdm.auto import tqdm

    cfg, model, ps = run.cfg, run.model, run.ps
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = math.ceil(len(batches) / micro_batch / run.dp)
    for ids in tqdm(run.my_batches(batches, micro_batch), total=steps, desc="taylor importance",
                    unit="batch", disable=not progress or dist.get_rank() != 0):
        _forward_backward(run, ids)
    n = len(batches)
    params = dict(model.named_parameters())
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if run.dp > 1:
        # |w * g| needs the whole gradient: sum the replicas' shares before taking it
        for p in params.values():
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
    entries = layout.stage_entries(cfg, layout.LOCAL, run.pp_rank, run.ranges)
    tied_copy = None
    if cfg.tie_embeddings and run.pp > 1 and ps.is_rank_in_embedding_group():
        # The embedding (stage 0) and its copy on the last stage are one weight: sum the grads.
        name = (layout.EMBEDDING.name(layout.LOCAL) if run.pp_rank == 0
                else layout.OUTPUT.name(layout.LOCAL))
        dist.all_reduce(params[name].grad, group=ps.get_embedding_group())
        tied_copy = layout.OUTPUT.name(layout.LOCAL) if run.pp_rank == run.pp - 1 else None

    # HF name -> (local parameter, spec, index among the spec's HF tensors)
    owned = {}
    for e in entries:
        if e.name == tied_copy or (e.spec.split_dim is None and run.tp_rank != 0):
            continue  # the last stage's tied copy; replicated tensors counted on TP rank 0
        for j, hf_name in enumerate(e.spec.hf_names(e.layer)):
            owned[hf_name] = (e.name, e.spec, j)
    pieces_cache = {}

    def elem(hf_name):
        """This rank's |w * dL/dw| / n as a part of the full HF tensor (zeros elsewhere)."""
        spec_j = owned.get(hf_name)
        if spec_j is None:
            return None
        pname, spec, j = spec_j
        if pname not in pieces_cache:
            pieces_cache.clear()
            p = params[pname]
            el = (p.detach().double() * p.grad.double() / n).abs().cpu()
            pieces_cache[pname] = layout.unfuse(spec, el, cfg, 1 if spec.split_dim is None
                                                else run.tp)
        piece = pieces_cache[pname][j]
        if spec.split_dim is None:
            return piece
        full_shape = layout.hf_shape(spec, j, cfg)
        size = full_shape[spec.split_dim]
        lo, hi = layout.chunk_range(spec, size, run.tp, run.tp_rank, cfg, run.divisible_by)
        hi_real = min(hi, size)
        out = torch.zeros(full_shape, dtype=torch.float64)
        if hi_real > lo:
            out.narrow(spec.split_dim, lo, hi_real - lo).copy_(
                piece.narrow(spec.split_dim, 0, hi_real - lo))
        return out

    hf_shapes = {}
    for spec, layer in layout.iter_hf_entries(cfg):
        for j, name in enumerate(spec.hf_names(layer)):
            hf_shapes[name] = layout.hf_shape(spec, j, cfg)

    def element_scores(hf_name):
        t = elem(hf_name)
        if t is None:  # not on this rank: contributes nothing (a zero view, no memory)
            t = torch.zeros((), dtype=torch.float64).expand(hf_shapes[hf_name])
        return t

    if run.dp_rank == 0:  # the replicas now hold the same grads: one of them counts
        part = weight_structure_scores(cfg, element_scores, "taylor")
    else:
        part = weight_structure_scores(cfg, lambda name: torch.zeros(
            (), dtype=torch.float64).expand(hf_shapes[name]), "taylor")
    model.zero_grad(set_to_none=True)
    sums = [part.hidden, part.heads, part.groups, part.ffn, part.layers]
    sums = [t.to(run.device) for t in sums]
    run.all_reduce(*sums)
    if dist.get_rank() != 0:
        return None
    hidden, heads, groups, ffn, layers_ = (t.cpu() for t in sums)
    return ImportanceScores("taylor", shape_of(cfg), hidden=hidden, heads=heads, groups=groups,
                            ffn=ffn, layers=layers_,
                            meta={"samples": len(batches), "seq_length": batches.shape[1]})


# ============================================================================ entry point
def compute_importance_megatron(load, method: str, batches: torch.Tensor, micro_batch: int = 4,
                                *, tp: Optional[int] = None, pp: Optional[int] = None,
                                dtype: torch.dtype = torch.float32, seed: int = 1234,
                                progress: bool = True,
                                layer_loss: bool = False) -> Optional[ImportanceScores]:
    """Scores of a legacy Megatron checkpoint measured by megatron-core on this launch's ranks.

    Call on every rank with the same `batches` [samples, seq]; global rank 0 gets the scores,
    the others None. TP/PP: see `resolve_parallel`; world size / (TP x PP) replicas share the
    micro-batches (data parallel). `layer_loss`: also `loss_mcore.layer_losses` in the meta.
    The process group and megatron-core's model-parallel groups are set up when missing and torn
    down afterwards; a caller's own stay (to call this several times in one launch, initialise
    torch.distributed first)."""
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
    from megatron_prune.checkpoint.megatron_dirs import check_megatron_input, checkpoint_format
    if method not in METHODS:
        raise ConfigError(f"--importance {method}: data-driven methods are {METHODS}")
    check_megatron_input(load)
    if checkpoint_format(load) != "torch":
        raise ConfigError(f"--load {load} is a torch_dist checkpoint; the megatron backend reads "
                          "legacy (torch) checkpoints: `megatron-prune reshard --ckpt-format "
                          "torch` first, or use --backend hf")
    if micro_batch < 1:
        raise ConfigError(f"--micro-batch-size must be positive, got {micro_batch}")
    ckpt = LegacyCheckpoint(load)
    _check_batches(batches, ckpt.config)
    tp, pp, first, last = resolve_parallel(ckpt, tp, pp, launched_world_size())
    import torch.distributed as dist
    with quiet_megatron_import():
        from megatron.core import parallel_state
    # Tear down only what this call sets up (a caller's process group stays usable).
    own_pg = not dist.is_initialized()
    own_mp = not parallel_state.model_parallel_is_initialized()
    try:
        run = _Run(load, tp, pp, first, last, dtype, seed)
        if method in ("activation", "auto"):
            run.model.eval()
            scores = _activation(run, batches, micro_batch, progress)
        if method in ("taylor", "auto"):
            run.model.train()  # no dropout in these models; grads flow the same either way
            tay = _taylor(run, batches, micro_batch, progress)
            if method == "taylor" or tay is None:  # tay is None off global rank 0
                scores = tay
            else:
                scores = combine(scores, tay, batches)
        if layer_loss:
            losses = layer_losses(run, batches, micro_batch, progress)
            if scores is not None:
                scores.meta.update(losses)
        if scores is not None:
            scores.meta.update(backend="megatron", tp=tp, pp=pp, dp=run.dp)
        return scores
    finally:
        if own_pg:
            destroy_distributed()
        elif own_mp and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
