"""Prune an HF Llama checkpoint with NVIDIA Model-Optimizer's Minitron pruner (a benchmark peer).

Runs `modelopt.torch.prune.prune(model, mode="mcore_minitron", ...)` (nvidia-modelopt 0.35.1) on a
megatron-core 0.16.1 GPTModel built and loaded by megatron_prune, on the CPU (gloo, world size 1,
TP = PP = 1), with the calibration tokens fed as given, then writes the pruned model back as an HF
directory through megatron_prune's layout table. Run it with the peer venv's python.

ModelOpt targets GPU builds of megatron-core (Transformer Engine or Apex layers). The adapters
below, each applied from this script and never by editing ModelOpt, make it run on the local
layer spec on the CPU:

  * torch.nn.RMSNorm (the local spec's norm without Apex) has no dynamic module in ModelOpt, which
    knows TE's and Apex's norms only, so the model cannot be converted. One is registered, and its
    hparam must be called `num_features`: the model ties each norm to its one hidden_size hparam
    by assigning `norm.num_features = hidden_size`. Under another name that assignment only adds
    an unused hparam and the norm keeps its own: its weight stays at the teacher's width (the
    forward then fails), or, if that name ends in "hidden_size", the searcher cuts it on its own
    to the first N channels, unsorted, misaligned with the sorted rest (hidden 432 on 4x64
    calibration tokens: loss 32.9 instead of 6.3). Either way hidden size is not pruned properly.
  * The mode's default rules allow only multiples of 64 for hidden_size and ffn_hidden_size
    (ModelOpt asserts the target is a choice: hidden 432 is refused); the divisors are set to 1.
  * Depth pruning's export moves two counters to `.cuda()` and all-gathers a 0-dim tensor, which
    gloo refuses; on the CPU both are adapted while the layers are dropped.
"""
from __future__ import annotations

import contextlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.checkpoint.convert import HFSource, megatron_rank_state, write_hf
from megatron_prune.checkpoint.fsutil import atomic_output_dir
from megatron_prune.checkpoint.hf import HFCheckpoint, copy_tokenizer
from megatron_prune.mcore.model import build_gpt_model
from megatron_prune.mcore.parallel import init_distributed

from common import peer_parser  # bench/peers/, the script's own folder

TARGET_KEYS = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "num_layers")
MICRO_BATCH = 4
# fp32 logits of two implementations of one model agree to ~1e-4; a pruned model can carry
# massive activations (~2.4e4 in SmolLM2's residual stream, fp32 spacing ~2e-3 there), where the
# two summation orders leave ~1e-3 on the logits of that token.
ATOL = 5e-3


# ---------------------------------------------------------------------------- model in / out
def load_teacher(hf_dir: Path):
    """(ModelConfig, GPTModel) of the HF checkpoint: local spec, TP=PP=1, fp32, weights converted
    in memory through megatron_prune's layout table (what `hf-to-megatron` writes to disk)."""
    source = HFSource(HFCheckpoint(hf_dir))
    cfg = source.config
    model = build_gpt_model(cfg, impl=layout.LOCAL, dtype=torch.float32)
    state = megatron_rank_state(source, cfg, layout.LOCAL, 1, 0, 0, [(0, cfg.num_layers)],
                                torch.float32, model.mp_stage_info["divisible_by"])
    for name, value in model.state_dict(keep_vars=True).items():  # mcore layers' None extras
        if name.endswith("._extra_state"):
            state.setdefault(name, value)
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()


def pruned_config(cfg: ModelConfig, model) -> ModelConfig:
    """The teacher's config with the shape fields of the pruned model (head_dim is kept)."""
    c = model.config
    return cfg.replace(num_layers=len(model.decoder.layers), hidden_size=c.hidden_size,
                       ffn_hidden_size=c.ffn_hidden_size, num_attention_heads=c.num_attention_heads,
                       num_query_groups=c.num_query_groups)


class StateSource:
    """A megatron-core (local spec, TP=1) state dict served as HF-named tensor groups, for
    megatron_prune's HF writer: each group is `layout.merge_to_hf` of the one shard."""

    def __init__(self, state: dict, cfg: ModelConfig):
        self.state, self.config = state, cfg

    def group(self, spec, layer) -> dict:
        shard = self.state[spec.name(layout.LOCAL, layer)]
        return layout.merge_to_hf(spec, [shard], self.config, layer)


def save_hf(model, cfg: ModelConfig, out: Path, hf_dir: Path) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    check_shapes(state, cfg)
    with atomic_output_dir(out, force=True) as tmp:
        write_hf(StateSource(state, cfg), cfg, tmp, torch.float32)
        copy_tokenizer(hf_dir, tmp)
        for extra in hf_dir.glob("chat_template.*"):  # transformers 5 keeps it beside the tokenizer
            shutil.copy2(extra, tmp / extra.name)


def check_shapes(state: dict, cfg: ModelConfig) -> None:
    """Every tensor of the pruned model has the shape the pruned config says (a norm or an
    embedding left at the teacher's width would otherwise only show up in HF's loader)."""
    for spec, layer in layout.iter_hf_entries(cfg):
        t = state[spec.name(layout.LOCAL, layer)]
        parts = [layout.hf_shape(spec, j, cfg) for j in range(len(spec.hf))]
        rows = sum(p[0] for p in parts) if spec.split_dim == 0 and len(parts) > 1 else parts[0][0]
        if spec.vocab:
            rows = t.shape[0]  # vocab padding rows
        want = (rows, *parts[0][1:])
        if tuple(t.shape) != want:
            raise RuntimeError(f"{spec.name(layout.LOCAL, layer)}: shape {tuple(t.shape)}, "
                               f"config says {want}")
    if len(state) != sum(1 for _ in layout.iter_hf_entries(cfg)):
        raise RuntimeError(f"pruned state has {len(state)} tensors, config expects "
                           f"{sum(1 for _ in layout.iter_hf_entries(cfg))}")


# ---------------------------------------------------------------------------- forward passes
@torch.no_grad()
def mcore_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)[..., :vocab]


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor, rows_for_loss: torch.Tensor | None = None):
    """transformers' logits on `ids` (and its mean LM loss on `rows_for_loss`)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    logits = hf(input_ids=ids).logits
    loss = None
    if rows_for_loss is not None:
        loss = hf(input_ids=rows_for_loss, labels=rows_for_loss).loss.item()
    return logits, loss


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    d = (a.float() - b.float()).abs().max().item()
    print(f"{what}: max |logit diff| = {d:.2e}", flush=True)
    if d > ATOL:
        raise RuntimeError(f"{what}: logits differ by {d:.2e} (> {ATOL})")
    return d


def forward_loop_for(calib: torch.Tensor, phase: dict):
    """ModelOpt's forward_loop: every calibration row once, in micro-batches of MICRO_BATCH (its
    time goes to phase["forward_loop_s"], part of prune_s)."""
    def forward_loop(model):
        t = time.perf_counter()
        for i in range(0, calib.shape[0], MICRO_BATCH):
            ids = calib[i:i + MICRO_BATCH]
            model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None)
        phase["forward_loop_s"] = time.perf_counter() - t
    return forward_loop


# ---------------------------------------------------------------------------- adapters
def register_rmsnorm():
    """# adapter: ModelOpt has no dynamic module for torch.nn.RMSNorm (the local spec's norm
    without Apex): register one. Its hparam must be named `num_features`, the name ModelOpt's own
    norms use, because GPTModel's dynamic module shares its hidden_size hparam with every norm by
    assigning `norm.num_features = hidden_size`, which replaces an hparam of that name; any other
    name leaves the norm on its own hparam, unsorted and not (or separately) cut. The weight and
    `normalized_shape` (F.rms_norm checks the input against it) follow that hparam."""
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.nas.traced_hp import TracedHp

    if torch.nn.RMSNorm in DMRegistry:
        return

    @DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})
    class _DynamicRMSNorm(_DynamicLayerNorm):
        def _setup(self):
            self._register_hparam("num_features",
                                  TracedHp(list(range(1, self.normalized_shape[-1] + 1))))
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)


@contextlib.contextmanager
def layer_drop_on_cpu():
    """# adapter: `drop_mcore_language_model_layers` (depth pruning's export) moves its two int
    counters to `.cuda()` and all-gathers a 0-dim one into a [PP] tensor. On the CPU, while that
    one function runs, `Tensor.cuda` is the identity and the gathered counter is flattened to
    shape [1] (gloo, unlike NCCL, wants the input shaped as one rank's slice of the output)."""
    import modelopt.torch.nas.plugins.megatron as mplugin
    if torch.cuda.is_available():
        yield
        return
    orig, dist = mplugin.drop_mcore_language_model_layers, torch.distributed

    def drop_on_cpu(*args, **kwargs):
        cuda, gather = torch.Tensor.cuda, dist.all_gather_into_tensor
        torch.Tensor.cuda = lambda self, *a, **k: self
        dist.all_gather_into_tensor = lambda out, inp, *a, **k: gather(out, inp.reshape(-1),
                                                                       *a, **k)
        try:
            return orig(*args, **kwargs)
        finally:
            torch.Tensor.cuda, dist.all_gather_into_tensor = cuda, gather

    mplugin.drop_mcore_language_model_layers = drop_on_cpu
    try:
        yield
    finally:
        mplugin.drop_mcore_language_model_layers = orig


def minitron_mode():
    """# adapter: the mode's default rules make hidden_size and ffn_hidden_size multiples of 64,
    so e.g. hidden 432 is not a choice (ModelOpt asserts the target is one); divisor 1 makes every
    size a choice. Heads and groups already have divisor 1."""
    rules = {"hidden_size_divisor": 1, "ffn_hidden_size_divisor": 1,
             "num_heads_per_group_divisor": 1, "num_query_groups_divisor": 1}
    return [("mcore_minitron", {"megatron.core.models.gpt.GPTModel": rules})]


# ---------------------------------------------------------------------------- pruning
def export_config(target: dict, cfg: ModelConfig) -> dict:
    """ModelOpt's export_config for a target: same names; heads and groups must come together
    (ModelOpt asserts it), so a missing one is the teacher's."""
    unknown = set(target) - set(TARGET_KEYS)
    if unknown:
        raise SystemExit(f"--target: unknown keys {sorted(unknown)}; use {TARGET_KEYS}")
    out = {k: int(v) for k, v in target.items()}
    if "num_attention_heads" in out or "num_query_groups" in out:
        out.setdefault("num_attention_heads", cfg.num_attention_heads)
        out.setdefault("num_query_groups", cfg.num_query_groups)
    return out


def prune(model, calib: torch.Tensor, config: dict, phase: dict):
    import modelopt.torch.prune as mtp
    register_rmsnorm()
    with layer_drop_on_cpu():
        model, _ = mtp.prune(model, mode=minitron_mode(),
                             constraints={"export_config": dict(config)}, dummy_input=None,
                             config={"forward_loop": forward_loop_for(calib, phase)})
    return model.eval()


def num_params(model, cfg: ModelConfig) -> int:
    """Parameters of the pruned model, without Megatron's vocab padding rows (tied: counted once);
    equal to ModelConfig.num_params of the pruned shape."""
    n = sum(p.numel() for p in model.parameters())
    emb = model.embedding.word_embeddings.weight
    n -= (emb.shape[0] - cfg.vocab_size) * emb.shape[1] * (1 if cfg.tie_embeddings else 2)
    if n != cfg.num_params():
        raise RuntimeError(f"pruned model has {n} parameters, its config {cfg.num_params()}")
    return n


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = peer_parser(__doc__, TARGET_KEYS)
    p.add_argument("--no-checks", action="store_true",
                   help="skip the logit checks against transformers (teacher and export)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    target = json.loads(args.target)
    calib = torch.load(args.calib)
    probe = calib[:2, :16]  # a few tokens for the logit checks
    ref = None if args.no_checks else hf_logits(args.hf_dir, probe)[0]
    init_distributed(1, 1, backend="gloo")

    phase, t = {}, time.perf_counter()  # wall_s: loading to saved, the checks left out
    cfg, model = load_teacher(args.hf_dir)
    config = export_config(target, cfg)
    phase["load_s"], t = time.perf_counter() - t, time.perf_counter()
    if ref is not None:
        max_diff(mcore_logits(model, probe, cfg.vocab_size), ref, "teacher mcore vs transformers")
    t = time.perf_counter()
    loop: dict = {}  # the forward loop's own time, reported inside prune_s
    model = prune(model, calib, config, loop)
    new_cfg = pruned_config(cfg, model)
    phase["prune_s"], t = time.perf_counter() - t, time.perf_counter()
    save_hf(model, new_cfg, args.save, args.hf_dir)
    phase["save_s"] = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    wall = sum(phase.values())
    phase.update(loop)
    stats = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1),
             "target": target, "params": num_params(model, new_cfg),
             "phases_s": {k: round(v, 2) for k, v in phase.items()}, "export_config": config,
             "shape": {k: getattr(new_cfg, k) for k in TARGET_KEYS}}
    if not args.no_checks:
        out, loss = hf_logits(args.save, probe, calib[:4])
        stats["export_vs_mcore_max_diff"] = max_diff(
            out, mcore_logits(model, probe, cfg.vocab_size), "HF export vs pruned mcore")
        stats["calib_rows0_3_loss"] = round(loss, 4)
    args.stats.parent.mkdir(parents=True, exist_ok=True)
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
