"""Structured pruning: one plan, identical weights through every path; function preservation."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from hf_models import make_hf_llama
from megatron_prune.checkpoint import convert
from megatron_prune.cli import main
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.prune.plan import (PrunePlan, PruneTarget, make_plan,
                                       with_hidden_aggregation)
from megatron_prune.prune.apply import PLAN_FILE, prune_hf, prune_megatron
from megatron_prune.prune.scores import ImportanceScores, random_scores
from checks import assert_same_checkpoint, assert_same_tensors, hf_tensors

TARGET = PruneTarget(num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                     hidden_size=48, drop_layers=[1])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    # 8 heads / 4 KV groups, FFN 96, 5 layers, untied
    return make_hf_llama(tmp_path_factory.mktemp("prune") / "hf", num_hidden_layers=5,
                         max_shard_size="80KB")


def _cfg(hf):
    return ModelConfig.from_hf(json.loads((hf / "config.json").read_text()))


@pytest.mark.parametrize("prune_type", ["balance", "global"])
def test_prune_on_shards_equals_prune_at_tp1_then_reshard(hf, tmp_path, prune_type):
    plan = make_plan(_cfg(hf), TARGET, random_scores(_cfg(hf), seed=3), prune_type, tp=2)
    plan.save(tmp_path / "plan.json")
    convert.hf_to_megatron(hf, tmp_path / "tp2pp2", tp=2, pp=2, first=3)  # 5 layers: 3 + 2
    prune_megatron(tmp_path / "tp2pp2", tmp_path / "pruned_tp2pp2", None,
                   plan_file=tmp_path / "plan.json")
    convert.hf_to_megatron(hf, tmp_path / "tp1", tp=1, pp=1)
    prune_megatron(tmp_path / "tp1", tmp_path / "pruned_tp1", None, plan_file=tmp_path / "plan.json")
    convert.reshard(tmp_path / "pruned_tp1", tmp_path / "resharded", tp=2, pp=2)
    assert_same_checkpoint(tmp_path / "pruned_tp2pp2", tmp_path / "resharded")
    # ... and HF -> Megatron -> prune -> HF equals prune_hf directly
    convert.megatron_to_hf(tmp_path / "pruned_tp2pp2", tmp_path / "exported")
    prune_hf(hf, tmp_path / "direct", plan_file=tmp_path / "plan.json")
    assert_same_tensors(hf_tensors(tmp_path / "exported"), hf_tensors(tmp_path / "direct"))
    saved = PrunePlan.load(tmp_path / "pruned_tp2pp2" / PLAN_FILE)
    assert saved.keep_ffn == plan.keep_ffn and saved.prune_type == prune_type


def test_balance_keeps_equal_counts_per_rank_and_global_can_differ():
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=16, num_attention_heads=8,
                      num_query_groups=4, head_dim=4, vocab_size=64)
    s = random_scores(cfg, 0)
    s.ffn = torch.arange(16.0).reshape(1, 16)  # all the best neurons live on TP rank 1
    s.groups = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # the best groups on rank 0
    t = PruneTarget(ffn_hidden_size=8, num_query_groups=2, num_attention_heads=4)
    bal = make_plan(cfg, t, s, "balance", tp=2)
    glob = make_plan(cfg, t, s, "global", tp=2)
    assert bal.keep_ffn[0] == [4, 5, 6, 7, 12, 13, 14, 15]
    assert glob.keep_ffn[0] == list(range(8, 16))
    assert bal.keep_groups[0] == [0, 2] and glob.keep_groups[0] == [0, 1]


def _zero_removed(hf, out, plan: PrunePlan, what: str):
    """Copy of the HF model in which the structures the plan removes contribute nothing."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = plan.source_config
    d = cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i not in plan.keep_layers:
                if what == "layers":
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
                continue
            new = plan.keep_layers.index(i)
            if what in ("heads", "groups"):
                kept = set(plan.head_order(new))
                for h in range(cfg.num_attention_heads):
                    if h not in kept:
                        layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            if what == "ffn":
                gone = sorted(set(range(cfg.ffn_hidden_size)) - set(plan.keep_ffn[new]))
                layer.mlp.down_proj.weight[:, gone] = 0
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("what,target", [
    ("heads", PruneTarget(num_attention_heads=4)),              # 2 of 4 heads in every group
    ("groups", PruneTarget(num_attention_heads=4, num_query_groups=2)),  # whole KV groups
    ("ffn", PruneTarget(ffn_hidden_size=40)),
    ("layers", PruneTarget(drop_layers=[0, 3])),
])
def test_function_preservation(hf, tmp_path, what, target):
    from transformers import AutoModelForCausalLM
    plan = make_plan(_cfg(hf), target, random_scores(_cfg(hf), seed=7), "balance", tp=2)
    plan.save(tmp_path / "plan.json")
    zeroed = _zero_removed(hf, tmp_path / "zeroed", plan, what)
    prune_hf(tmp_path / "zeroed", tmp_path / "pruned", plan_file=tmp_path / "plan.json")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = zeroed(ids).logits, pruned(ids).logits
    assert (a - b).abs().max() < 1e-5
    if what == "groups":
        assert pruned.config.num_key_value_heads == 2


def test_hidden_pruning_changes_rmsnorm_statistics(hf, tmp_path):
    """Removing hidden channels is not function-preserving even when they carry zeros: RMSNorm
    averages squares over h' instead of h channels, so every normalised activation shrinks by
    sqrt(h'/h). Measured here: the logits move; scaling every norm weight by sqrt(h/h') undoes
    it up to RMSNorm's eps, which shows that this is the only change."""
    from transformers import AutoModelForCausalLM
    cfg = _cfg(hf)
    plan = make_plan(cfg, PruneTarget(hidden_size=48), random_scores(cfg, 1), "balance")
    plan.save(tmp_path / "plan.json")
    gone = sorted(set(range(cfg.hidden_size)) - set(plan.keep_hidden))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():  # the removed channels carry exact zeros through the residual stream
        model.model.embed_tokens.weight[:, gone] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[gone, :] = 0
            layer.mlp.down_proj.weight[gone, :] = 0
    model.save_pretrained(tmp_path / "zeroed")
    prune_hf(tmp_path / "zeroed", tmp_path / "pruned", plan_file=tmp_path / "plan.json")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert pruned.config.hidden_size == 48 and pruned.config.head_dim == 8
    assert pruned.config.num_attention_heads * pruned.config.head_dim == 64  # != hidden: explicit
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(ids).logits
        moved = (pruned(ids).logits - ref).abs().max().item()
        scale = (cfg.hidden_size / 48) ** 0.5
        for m in pruned.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.mul_(scale)
        fixed = (pruned(ids).logits - ref).abs().max().item()
    print(f"hidden 64 -> 48: max logit change {moved:.3e}; with norms rescaled {fixed:.3e}")
    # what remains is RMSNorm's eps, which also sits inside the mean of squares
    assert moved > 1e-2 and fixed < moved / 20


def test_norm_rescale_from_activation_scores_undoes_it(hf, tmp_path):
    """The same zeroed channels found by activation importance: they carry no energy into any
    norm, so the plan's norm factors are exactly sqrt(h/h') and the prune keeps the function
    up to RMSNorm's eps; with --no-norm-rescale the logits move as above."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.prune.importance_hf import activation_scores
    cfg = _cfg(hf)
    gone = list(range(0, 64, 4))  # 16 of 64 channels
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[gone, :] = 0
            layer.mlp.down_proj.weight[gone, :] = 0
    model.save_pretrained(tmp_path / "zeroed")
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = activation_scores(model.eval(), ids, cfg, progress=False)
    assert scores.meta["norm_energy"].shape == (2 * cfg.num_layers + 1, 64)
    assert (scores.meta["norm_energy"][:, gone] == 0).all()
    scores.save(tmp_path / "act.pt")
    out = {}
    for name, flags in (("rescaled", []), ("plain", ["--no-norm-rescale"])):
        assert main(["prune-hf", "--hf-dir", str(tmp_path / "zeroed"), "--save",
                     str(tmp_path / name), "--scores", str(tmp_path / "act.pt"),
                     "--hidden-size-remain", "48", *flags]) == 0
        plan = PrunePlan.load(tmp_path / name / PLAN_FILE)
        assert sorted(set(range(64)) - set(plan.keep_hidden)) == gone
        pruned = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            out[name] = (pruned(ids).logits - model(ids).logits).abs().max().item()
        out[name + "_plan"] = plan
    factors = torch.tensor(out["rescaled_plan"].norm_scale["layers"] +
                           [[out["rescaled_plan"].norm_scale["final"]] * 2])
    assert torch.allclose(factors, torch.full_like(factors, (64 / 48) ** 0.5), rtol=1e-6)
    assert out["plain_plan"].norm_scale is None
    print(f"max logit change: rescaled {out['rescaled']:.3e}, plain {out['plain']:.3e}")
    assert out["plain"] > 1e-2 and out["rescaled"] < out["plain"] / 20


def test_hidden_aggregation_sum_ranks_by_the_raw_norm_vectors(hf, tmp_path, capsys):
    """prune-hf --hidden-aggregation sum keeps the hidden channels of the largest raw per-norm
    L2 sum (ModelOpt's ranking), balanced (the default) those of the scores as computed; the
    plan says which; scores without the per-norm vectors are refused with nothing written."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.prune.importance_hf import activation_scores
    cfg = _cfg(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight.mul_(50)  # one loud norm: the two differ
    model.save_pretrained(tmp_path / "loud")
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = activation_scores(model, ids, cfg, progress=False)
    scores.save(tmp_path / "act.pt")
    kept = {}
    for agg in ("balanced", "sum"):
        assert main(["prune-hf", "--hf-dir", str(tmp_path / "loud"), "--save", str(tmp_path / agg),
                     "--scores", str(tmp_path / "act.pt"), "--hidden-size-remain", "48",
                     "--hidden-aggregation", agg]) == 0
        plan = PrunePlan.load(tmp_path / agg / PLAN_FILE)
        kept[agg] = set(plan.keep_hidden)
        ranked = with_hidden_aggregation(scores, agg).hidden
        assert kept[agg] == set(ranked.topk(48).indices.tolist())
        assert plan.meta.get("hidden_aggregation") == (None if agg == "balanced" else "sum")
    assert kept["sum"] != kept["balanced"]
    random_scores(cfg, 1).save(tmp_path / "random.pt")
    assert main(["prune-hf", "--hf-dir", str(hf), "--save", str(tmp_path / "no"), "--scores",
                 str(tmp_path / "random.pt"), "--hidden-size-remain", "48",
                 "--hidden-aggregation", "sum"]) == 2
    assert "--hidden-aggregation sum needs activation or auto scores" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_hidden_aggregation_leaves_autos_taylor_trial_alone(hf):
    """With auto scores and --hidden-aggregation sum, the activation trial ranks hidden channels
    by the sum, and auto's Taylor trial (choose.with_choice) by Taylor scores, not the sum."""
    from megatron_prune.prune.choose import combine, with_choice
    cfg = _cfg(hf)
    act, tay = random_scores(cfg, 1), random_scores(cfg, 2)
    act.meta["norm_l2"] = torch.rand(2 * cfg.num_layers, cfg.hidden_size,
                                     generator=torch.Generator().manual_seed(3))
    auto = with_hidden_aggregation(combine(act, tay, torch.zeros(2, 8, dtype=torch.long)), "sum")
    target = PruneTarget(hidden_size=48, hidden_aggregation="sum")
    top = lambda t: sorted(t.topk(48).indices.tolist())  # noqa: E731
    assert make_plan(cfg, target, auto).keep_hidden == top(act.meta["norm_l2"].sum(0))
    taylor = with_choice(auto, {"hidden": "taylor"})
    assert make_plan(cfg, target, taylor).keep_hidden == top(tay.hidden)
    # the same target from unaggregated scores (the API without plan_for) ranks by the sum too
    assert make_plan(cfg, target, act).keep_hidden == top(act.meta["norm_l2"].sum(0))


def test_prune_hf_script_and_seed_names(hf, tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "prune.json"
    cfg.write_text(json.dumps({"num_attention_heads_remain": 4, "ffn_hidden_size_remain": 48,
                               "drop_layers": [2], "prune_type": "global", "importance": "magnitude"}))
    r = subprocess.run([sys.executable, "prune_hf/prune_llama.py", "--model_name_or_path", str(hf),
                        "--prune_config_path", str(cfg), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["num_attention_heads"], out["num_key_value_heads"], out["intermediate_size"],
            out["num_hidden_layers"]) == (4, 4, 48, 4)
    # the CLI takes the seed's underscore flag names too
    convert.hf_to_megatron(hf, tmp_path / "meg", tp=2)
    assert main(["prune", "--load", str(tmp_path / "meg"), "--save", str(tmp_path / "p"),
                 "--ffn_hidden_size_remain", "48", "--drop_layers", "1,2",
                 "--prune_type", "balance"]) == 0
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    assert plan.keep_layers == [0, 3, 4] and plan.tensor_parallel == 2


def test_depth_only_prune_by_layer_scores(hf, tmp_path):
    cfg = _cfg(hf)
    s = random_scores(cfg, 0)
    s.layers = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0])
    s.save(tmp_path / "scores.pt")
    convert.hf_to_megatron(hf, tmp_path / "meg", tp=1)
    prune_megatron(tmp_path / "meg", tmp_path / "p", PruneTarget(num_layers=3),
                   scores=tmp_path / "scores.pt")
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    assert plan.keep_layers == [0, 2, 4] and plan.layer_method == "block-influence"
    assert plan.target["hidden_size"] == cfg.hidden_size  # width untouched


def test_perplexity_layer_method_needs_layer_losses(hf):
    cfg = _cfg(hf)
    s = random_scores(cfg, 0)
    target = PruneTarget(num_layers=3, layer_method="perplexity")
    with pytest.raises(ConfigError, match="importance --layer-loss"):
        make_plan(cfg, target, s)
    s.meta.update(loss=2.0, layer_loss=[9.0, 2.1, 3.0, 2.2, 2.5])
    plan = make_plan(cfg, target, s)
    assert plan.keep_layers == [0, 2, 4] and plan.layer_method == "perplexity"
    assert make_plan(cfg, PruneTarget(drop_layers=[1]), s).layer_method == "drop-layers"
    assert make_plan(cfg, PruneTarget(hidden_size=32), s).layer_method == "none"
    # a plan written before layer_method was recorded still loads, with None
    old = {k: v for k, v in asdict(plan).items() if k != "layer_method"}
    assert PrunePlan(**old).layer_method is None
    with pytest.raises(ConfigError, match="layer method must be one of"):
        make_plan(cfg, PruneTarget(num_layers=3, layer_method="ppl"), s)  # e.g. from a JSON


def _fails(argv, tmp_path, capsys, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture(scope="module")
def meg_tp2(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("megtp2") / "meg"
    convert.hf_to_megatron(hf, out, tp=2, pp=1)
    return out


@pytest.mark.parametrize("flags,match", [
    (["--ffn-hidden-size-remain", "200"], "larger than the source"),
    (["--num-attention-heads-remain", "6", "--num-query-groups-remain", "4"], "not a multiple"),
    (["--num-attention-heads-remain", "8", "--num-query-groups-remain", "2"], "heads can be removed"),
    (["--ffn-hidden-size-remain", "47"], "not divisible by tensor-model-parallel-size 2"),
    (["--num-attention-heads-remain", "6", "--num-query-groups-remain", "3"],
     "KV groups 3 is not divisible"),
    (["--drop-layers", "1,9"], "out of range"),
    (["--drop-layers", "1,1"], "twice"),
    (["--drop-layers", "1", "--pipeline-model-parallel-size", "3"], "cannot be split over 3"),
    (["--num-layers-remain", "3", "--importance", "magnitude"], "needs layer scores"),
    (["--ffn-hidden-size-remain", "48", "--importance", "activation"], "needs --scores"),
])
def test_bad_prune_requests(meg_tp2, tmp_path, capsys, flags, match):
    _fails(["prune", "--load", str(meg_tp2), "--save", str(tmp_path / "out")] + flags,
           tmp_path, capsys, match)


def test_scores_from_another_model_refused(meg_tp2, tmp_path, capsys):
    other = ModelConfig(num_layers=5, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                        num_query_groups=4, head_dim=8, vocab_size=300)
    random_scores(other, 0).save(tmp_path / "s.pt")
    _fails(["prune", "--load", str(meg_tp2), "--save", str(tmp_path / "out"), "--scores",
            str(tmp_path / "s.pt"), "--ffn-hidden-size-remain", "48"], tmp_path, capsys,
           "different model: ffn_hidden_size 128 (scores) != 96 (model)")


def test_plan_is_reproducible(hf):
    cfg = _cfg(hf)
    a = make_plan(cfg, TARGET, random_scores(cfg, 11), "balance", tp=2)
    b = make_plan(cfg, TARGET, random_scores(cfg, 11), "balance", tp=2)
    c = make_plan(cfg, TARGET, random_scores(cfg, 12), "balance", tp=2)
    assert a == b and a.keep_ffn != c.keep_ffn
    with pytest.raises(ConfigError):
        ImportanceScores.load("/nonexistent/scores.pt")


def test_activation_scores_by_definition(hf):
    """Hidden: per norm, L2 over samples of the sequence mean of |output|, each norm's vector
    divided by its mean, summed over norms; head: the same statistic per channel of o_proj's
    input, L2 over the head's channels. Recomputed here from plain forward-hook captures, and
    not the old aggregation (one L2 over all norms), which a model with one loud norm tells
    apart."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.prune.importance_hf import activation_scores
    cfg = _cfg(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight.mul_(50)  # one loud norm
    ids = torch.randint(0, 300, (6, 12), generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for j, m in enumerate((layer.input_layernorm, layer.post_attention_layernorm)):
            hooks.append(m.register_forward_hook(
                lambda m, a, o, k=("n", 2 * i + j): seen.__setitem__(k, o.detach().double())))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, k=("o", i): seen.__setitem__(k, a[0].detach().double())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    stat = lambda x: x.abs().mean(1).pow(2).sum(0).sqrt()  # noqa: E731  [batch, seq, n] -> [n]
    per_norm = torch.stack([stat(seen["n", r]) for r in range(2 * cfg.num_layers)])
    hidden = (per_norm / per_norm.mean(1, keepdim=True)).sum(0)
    heads = torch.stack([stat(seen["o", i]).reshape(cfg.num_attention_heads, -1).norm(dim=1)
                         for i in range(cfg.num_layers)])
    scores = activation_scores(model, ids, cfg, micro_batch=4, progress=False)
    assert torch.allclose(scores.hidden.double(), hidden, rtol=1e-5)
    assert torch.allclose(scores.heads.double(), heads, rtol=1e-5)
    assert torch.allclose(scores.groups, scores.heads.reshape(cfg.num_layers, 4, 2).sum(-1))
    old = per_norm.pow(2).sum(0).sqrt()
    assert set(old.topk(16).indices.tolist()) != set(hidden.topk(16).indices.tolist())
    # --hidden-aggregation sum: the raw per-norm vectors summed (ModelOpt's mcore_minitron)
    assert torch.allclose(torch.as_tensor(scores.meta["norm_l2"]).double(), per_norm, rtol=1e-5)
    minitron = per_norm.sum(0)
    assert torch.allclose(with_hidden_aggregation(scores, "sum").hidden.double(), minitron,
                          rtol=1e-5)
    assert set(minitron.topk(16).indices.tolist()) != set(hidden.topk(16).indices.tolist())
    assert with_hidden_aggregation(scores, "balanced") is scores
