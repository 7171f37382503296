"""Importance from calibration data: activation (Minitron-style) and taylor (gradient) scores.

activation — forward passes only, hooks on the model:
  * each per-token statistic is averaged over the sequence, then aggregated as the L2 norm over
    the calibration samples (per channel: the "statistic" below);
  * hidden channel: the statistic of |output| of every RMSNorm (both norms of every layer),
    each norm's vector divided by its mean, then summed over the norms (`hidden_from_norms`):
    every norm gets an equal vote. Norm outputs differ in scale from layer to layer (their
    weights do), and a plain L2 over all norms let a few large ones pick the channels; on
    SmolLM2-135M the balanced sum gives the lower calibration loss at both widths tried
    (docs/benchmarks.md, "Beside the peers");
  * head: the statistic of |x| per channel of the attention output (the input of o_proj), then
    the L2 norm over the head's head_dim channels (`heads_from_channels`; as Minitron ranks
    heads — the norm of each head per token, averaged, ranked them worse there);
  * KV group: the sum of its heads;
  * FFN neuron: the statistic of |input of down_proj| (= silu(gate) * up);
  * layer: Block Influence 1 - cos(input, output) averaged over tokens, plus the angular
    distance between every pair of layer boundaries (for dropping a contiguous block);
  * norm energy: sum(x^2) per channel of every norm's input (meta["norm_energy"]), from which a
    plan that prunes hidden channels rescales each norm (see plan.norm_scales);
  * each norm's L2 vector itself (meta["norm_l2"], [2L, hidden]), for ranking hidden channels
    by their plain sum instead (`prune --hidden-aggregation sum`, ModelOpt's ranking).
layer loss (`layer_losses`, optional beside either method) — the calibration LM loss with each
  layer skipped in turn (its output replaced by its input), the layers before it not rerun.
  The perplexity criterion of Kim et al., "Shortened LLaMA" (2024), for choosing layers.
iterative layer removal (`layer_removal_order`, optional) — the same loss, layers removed one at
  a time: each round drops the layer whose skipping, with those of the rounds before gone, costs
  least (the greedy search of Song et al., "SLEB", 2024). Skipping one layer at a time misses
  what layers do together; on SmolLM2-135M at 20 of 30 layers the greedy set gives the lower
  calibration loss (docs/benchmarks.md, "Beside the peers").
taylor — first-order Taylor importance |w * dL/dw| summed over each structure's weights, with the
  LM loss on the calibration data (the gradient-sensitivity criterion of the BlockSheared design).

The model is a Hugging Face LlamaForCausalLM built from any source (HF directory, or a Megatron
checkpoint merged from its shards), on CUDA when available.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.hf_model import hf_model_from_source
from megatron_prune.prune.scores import ImportanceScores, shape_of, weight_structure_scores

log = logging.getLogger(__name__)
METHODS = ("activation", "taylor", "auto")  # auto: both, combined by prune/choose.py


class _Stats:
    """Per-sample sequence means, aggregated as the L2 norm over samples."""

    def __init__(self):
        self.sq = {}

    def add(self, key, m: torch.Tensor):
        """m: [batch, n], a statistic already averaged over the sequence."""
        s = (m.double() ** 2).sum(0)  # accumulate squares over samples (fp64)
        self.sq[key] = self.sq[key] + s if key in self.sq else s


    def l2(self, key):
        return self.sq[key].sqrt().cpu()


def hidden_from_norms(sq: torch.Tensor) -> torch.Tensor:
    """[norms, hidden] sums over samples of squared sequence means -> hidden scores: each norm's
    L2 vector divided by its mean, summed over the norms."""
    l2 = sq.sqrt()
    return (l2 / l2.mean(1, keepdim=True).clamp_min(torch.finfo(l2.dtype).tiny)).sum(0)


def heads_from_channels(sq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[layers, heads * head_dim] sums over samples of squared sequence means of |x| per
    channel -> [layers, heads]: the L2 norm over each head's channels of their L2 over samples."""
    return sq.sqrt().unflatten(-1, (-1, head_dim)).norm(dim=-1)


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    """[batch, seq, n] -> mean over seq of |x|, in one fp32-accumulating kernel."""
    return torch.linalg.vector_norm(x, 1, dim=1, dtype=torch.float32) / x.shape[1]


_GRAM_BYTES = 256 << 20  # fp32 bytes of one token chunk of stacked layer boundaries
_bf16_bmm_to_fp32 = {}    # device -> whether bmm with out_dtype=float32 runs there


def _gram(x: torch.Tensor) -> torch.Tensor:
    """[c, n, h] -> [c, n, n] fp32 Gram matrices. bf16 inputs go straight into a GEMM that
    accumulates and writes fp32 where the device has one (CUDA), else they are upcast."""
    if x.dtype != torch.float32 and x.is_cuda and _bf16_bmm_to_fp32.get(x.device, True):
        try:
            g = torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
            _bf16_bmm_to_fp32[x.device] = True
            return g
        except (RuntimeError, TypeError, NotImplementedError):
            _bf16_bmm_to_fp32[x.device] = False
    x = x.float()
    return torch.bmm(x, x.transpose(1, 2))


def _add_boundary_angles(boundary: list, ang: torch.Tensor, bi: torch.Tensor) -> int:
    """Per token, the cosine between every pair of layer boundaries (the residual stream
    entering layer 0 and leaving each layer): adds arccos / pi to `ang` [L+1, L+1] and
    1 - cos of consecutive boundaries (Block Influence) to `bi` [L], both fp64 on the device
    (no sync per micro-batch). One Gram matrix per token, in token chunks, straight from the
    boundaries' own dtype: no normalised fp32 copy of every boundary is made. Returns the
    number of tokens."""
    flat = [h.reshape(-1, h.shape[-1]) for h in boundary]
    n_tok, width = flat[0].shape
    chunk = max(1, _GRAM_BYTES // (4 * len(flat) * width))
    for s in range(0, n_tok, chunk):
        g = _gram(torch.stack([f[s:s + chunk] for f in flat], 1))       # [c, L+1, L+1]
        norm = g.diagonal(0, 1, 2).clamp_min(torch.finfo(g.dtype).tiny).sqrt()
        cos = g.div_(norm.unsqueeze(2)).div_(norm.unsqueeze(1)).clamp_(-1, 1).double()
        ang += torch.arccos(cos).sum(0).div_(math.pi)
        bi += (1 - cos.diagonal(1, 1, 2)).sum(0)
    return n_tok


def activation_scores(model, batches: torch.Tensor, cfg: ModelConfig, micro_batch: int = 4,
                      progress: bool = True) -> ImportanceScores:
    stats = _Stats()
    L, d = cfg.num_layers, cfg.head_dim
    device = next(model.parameters()).device
    bi = torch.zeros(L, dtype=torch.float64, device=device)
    ang = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)
    ntok = 0
    energy = torch.zeros(2 * L + 1, cfg.hidden_size, dtype=torch.float64, device=device)
    hooks = [norm.register_forward_pre_hook(norm_energy_hook(energy[row]))
             for row, norm in enumerate(_norms_in_order(model))]
    for i, layer in enumerate(model.model.layers):
        for j, norm in enumerate((layer.input_layernorm, layer.post_attention_layernorm)):
            hooks.append(norm.register_forward_hook(
                lambda m, inp, out, r=2 * i + j: stats.add(("hidden", r), _mean_abs(out))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, inp, i=i: stats.add(("heads", i), _mean_abs(inp[0]))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, inp, i=i: stats.add(("ffn", i), _mean_abs(inp[0]))))
    boundary = []  # residual stream at every layer boundary, filled by the hooks below

    def first_input(m, args, kwargs):
        boundary.append((args[0] if args else kwargs["hidden_states"]).detach())

    def layer_output(m, args, out):
        boundary.append((out[0] if isinstance(out, tuple) else out).detach())
    hooks.append(model.model.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    hooks += [layer.register_forward_hook(layer_output) for layer in model.model.layers]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(batches), micro_batch), desc="activation importance",
                              disable=not progress, unit="batch"):
                ids = batches[start:start + micro_batch].to(device)
                boundary.clear()
                model.model(input_ids=ids)
                ntok += _add_boundary_angles(boundary, ang, bi)
    finally:
        for h in hooks:
            h.remove()
    boundary.clear()
    ang, bi = ang.cpu() / ntok, bi.cpu()
    ang.fill_diagonal_(0)
    heads = heads_from_channels(torch.stack([stats.sq[("heads", i)] for i in range(L)]).cpu(), d)
    norm_sq = torch.stack([stats.sq[("hidden", r)] for r in range(2 * L)]).cpu()
    return ImportanceScores(
        "activation", shape_of(cfg), hidden=hidden_from_norms(norm_sq), heads=heads,
        groups=heads.reshape(L, cfg.num_query_groups, -1).sum(-1),
        ffn=torch.stack([stats.l2(("ffn", i)) for i in range(L)]), layers=bi / ntok,
        meta={"angular": ang.tolist(), "samples": len(batches), "seq_length": batches.shape[1],
              "norm_energy": energy.cpu(), "norm_l2": norm_sq.sqrt().float()})


def norm_energy_hook(row: torch.Tensor):
    """Forward pre-hook adding sum(x^2) per hidden channel of a norm's input to `row` (fp64):
    how much of the input's RMS each channel carries, for rescaling the norm after hidden
    channels are pruned (plan.norm_scale). Returns None: a value would replace the input."""
    def hook(m, args):
        x = args[0]
        row.add_(torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), 2, dim=0,
                                          dtype=torch.float32).double() ** 2)
    return hook


def _norms_in_order(model) -> list:
    """input and post-attention norm of every layer, then the final norm (norm_energy's rows)."""
    return [n for layer in model.model.layers
            for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [model.model.norm]


def taylor_scores(model, batches: torch.Tensor, cfg: ModelConfig, micro_batch: int = 4,
                  progress: bool = True) -> ImportanceScores:
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    n = 0
    for start in tqdm(range(0, len(batches), micro_batch), desc="taylor importance",
                      disable=not progress, unit="batch"):
        ids = batches[start:start + micro_batch].to(device)
        loss = model(input_ids=ids, labels=ids).loss * len(ids)
        loss.backward()
        n += len(ids)
    params = dict(model.named_parameters())
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)

    def elem(name):
        p = params[name]
        return (p.detach().float() * p.grad.float()).abs_().div_(n)  # stays on the device
    scores = weight_structure_scores(cfg, elem, "taylor")
    model.zero_grad(set_to_none=True)
    scores.meta.update(samples=len(batches), seq_length=batches.shape[1])
    return scores


def skip_layer(m, args, kwargs, out):
    """Forward hook (with_kwargs) on a decoder layer of HF or megatron-core, whose output is a
    tensor or a tuple (hidden states first): the layer hands on its input unchanged."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor, micro_batch: int) -> float:
    """Mean next-token loss over all b x (s-1) positions of the calibration batches."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(batches), micro_batch):
        ids = batches[start:start + micro_batch].to(device)
        total += model(input_ids=ids, labels=ids).loss.double() * len(ids)
    return float(total) / len(batches)


def layer_losses(model, batches: torch.Tensor, micro_batch: int = 4,
                 progress: bool = True, bar=None) -> dict:
    """{"loss": the calibration loss, "layer_loss": [the loss with layer i skipped]}, each as
    `mean_loss` gives it for the model with layer i's output replaced by its input (`skip_layer`).

    Skipping layer i leaves layers 0..i-1 as they are, so their work is not redone: per
    micro-batch the whole model runs once (the plain loss; the arguments LlamaModel hands its
    layers are kept), then for each i the running input of layer i goes through layers i+1.. only,
    and through layer i to become the next one's input. L(L+3)/2 layer calls instead of L(L+1),
    two hidden states held at a time; the same operations on the same inputs as the whole model
    with the hook, so the same losses to the last bit (tested). `bar`: a progress bar of the
    caller's to advance by one per layer and micro-batch instead of one of its own."""
    layers = model.model.layers
    sums = torch.zeros(len(layers) + 1, dtype=torch.float64)  # [plain, skip 0..L-1]
    steps = math.ceil(len(batches) / micro_batch)
    own = bar is None
    if own:
        bar = tqdm(total=len(layers) * steps, desc=f"layer loss ({steps} micro-batches)",
                   unit="layer", disable=not progress)
    device = next(model.parameters()).device
    with torch.no_grad(), (bar if own else contextlib.nullcontext()):
        for start in range(0, len(batches), micro_batch):
            ids = batches[start:start + micro_batch].to(device)
            hidden, args, kwargs, loss = _first_layer_call(model, ids)
            sums[0] += loss.double().cpu() * len(ids)
            for i in range(len(layers)):
                tail = hidden
                for layer in layers[i + 1:]:
                    tail = _hidden(layer(tail, *args, **kwargs))
                sums[i + 1] += _lm_loss(model, tail, ids).double().cpu() * len(ids)
                hidden = _hidden(layers[i](hidden, *args, **kwargs))
                bar.update()
    mean = (sums / len(batches)).tolist()
    return {"loss": mean[0], "layer_loss": mean[1:]}


def layer_removal_order(model, batches: torch.Tensor, count: int, micro_batch: int = 4,
                        progress: bool = True, first: list = None) -> dict:
    """{"layer_removal_order": the `count` layers removed greedily, in order,
    "layer_removal_loss": the calibration loss after each removal}. Each round is `layer_losses`
    of the model without the layers removed so far; the cheapest skip goes (ties: the lower
    index). A round over s layers costs s(s+3)/2 layer calls per micro-batch. `first`: the
    whole model's `layer_losses` (its "layer_loss"), when already measured: the first round."""
    num = len(model.model.layers)
    if not 0 < count < num:
        raise ConfigError(f"--iterative-layers {count}: the model has {num} layers; remove "
                          f"between 1 and {num - 1}")
    keep, order, losses = list(range(num)), [], []
    steps = math.ceil(len(batches) / micro_batch)
    bar = tqdm(total=steps * sum(num - r for r in range(1 if first else 0, count)), unit="layer",
               desc=f"iterative layer removal ({count} rounds)", disable=not progress)
    with bar:
        for r in range(count):
            if r == 0 and first:
                skipped = first
            else:
                with only_layers(model, keep):
                    skipped = layer_losses(model, batches, micro_batch, bar=bar)["layer_loss"]
            j = min(range(len(keep)), key=lambda j: (skipped[j], keep[j]))
            order.append(keep.pop(j))
            losses.append(skipped[j])
            bar.set_postfix(removed=",".join(map(str, order)), loss=f"{losses[-1]:.4f}")
    return {"layer_removal_order": order, "layer_removal_loss": losses}


@contextlib.contextmanager
def only_layers(model, keep: list):
    """The HF model with only the decoder layers `keep` (in that order) inside the block, and
    no KV cache (the kept layers keep their layer_idx, which a cache of fewer layers lacks)."""
    inner, cfg = model.model, model.config
    layers, num, cache = inner.layers, cfg.num_hidden_layers, cfg.use_cache
    inner.layers = torch.nn.ModuleList([layers[i] for i in keep])
    cfg.num_hidden_layers = len(keep)  # LlamaModel runs self.layers[:num_hidden_layers]
    cfg.use_cache = False
    try:
        yield model
    finally:
        inner.layers, cfg.num_hidden_layers, cfg.use_cache = layers, num, cache


def _first_layer_call(model, ids: torch.Tensor):
    """One whole forward pass: layer 0's input, the other arguments LlamaModel gives every layer
    (mask, positions, rotary embedding: whatever this transformers release passes), and the
    loss. No KV cache, so the layers can be called again with the same arguments."""
    with first_call(model.model.layers[0]) as call:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return (*call, loss)


@contextlib.contextmanager
def first_call(module: torch.nn.Module):
    """A list that receives, once `module` is first called inside the block, its hidden-state
    input (the first positional argument, or `hidden_states=`), its other positional arguments
    and its keyword arguments: what a caller needs to call it, or its siblings, again."""
    call = []

    def keep(mod, args, kwargs):
        if not call:
            kw = dict(kwargs)
            hidden, rest = (args[0], args[1:]) if args else (kw.pop("hidden_states"), ())
            call.extend((hidden, rest, kw))
    hook = module.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield call
    finally:
        hook.remove()


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _lm_loss(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loss LlamaForCausalLM computes from its last layer's output."""
    logits = model.lm_head(model.model.norm(hidden))
    return model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)


def compute_importance(source, method: str, batches: torch.Tensor, micro_batch: int = 4,
                       device=None, layer_loss: bool = False,
                       iterative_layers: int = 0) -> ImportanceScores:
    """`method` scores of `source`; with `layer_loss`, also `layer_losses` in their meta, with
    `iterative_layers`, the greedy `layer_removal_order` of that many layers."""
    if method not in METHODS:
        raise ConfigError(f"--importance {method}: data-driven methods are {METHODS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = source.config.vocab_size
    if int(batches.max()) >= vocab:
        raise ConfigError(f"calibration token id {int(batches.max())} >= model vocab {vocab}: "
                          "tokenizer and model do not match")
    model = hf_model_from_source(source, device=device)
    if method == "auto":
        from megatron_prune.prune.choose import combine
        act = activation_scores(model.eval(), batches, source.config, micro_batch)
        scores = combine(act, taylor_scores(model, batches, source.config, micro_batch), batches)
    else:
        fn = activation_scores if method == "activation" else taylor_scores
        scores = fn(model, batches, source.config, micro_batch)
    if layer_loss:
        scores.meta.update(layer_losses(model.eval(), batches, micro_batch))
    if iterative_layers:  # (its first round is the layer loss, when that was measured)
        scores.meta.update(layer_removal_order(model.eval(), batches, iterative_layers,
                                               micro_batch, first=scores.meta.get("layer_loss")))
    return scores
