"""Prune to a size (`--target-params`, `--target-memory-gb`): the enumeration, the refusals, the
search at TP=3 against TP=1, re-applying the plan it writes."""
from __future__ import annotations

import json

import pytest
import torch

from checks import assert_same_checkpoint
from hf_models import make_hf_llama
from megatron_prune.checkpoint import convert
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.cli import main
from megatron_prune.prune.apply import PLAN_FILE, SizeSearch, prune_megatron
from megatron_prune.prune.plan import PruneTarget
from megatron_prune.prune.scores import random_scores
from megatron_prune.prune.search import (Budget, SearchLimits, enumerate_shapes, parse_size,
                                         search)

DATA = "../shared/data/corpus/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def tp3_hf(tmp_path_factory):
    """6 heads in 3 KV groups, FFN 384, hidden 96, 6 layers: shapes TP=3 can hold."""
    return make_hf_llama(tmp_path_factory.mktemp("search") / "hf", hidden_size=96,
                         num_attention_heads=6, num_key_value_heads=3, intermediate_size=384,
                         num_hidden_layers=6)


def _cfg(path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


@pytest.mark.parametrize("text,value", [("70M", 70_000_000), ("4B", 4_000_000_000),
                                        ("1.5e9", 1_500_000_000), ("135_000_000", 135_000_000),
                                        ("2.5k", 2500)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "70 MB", "-3M", "four"])
def test_parse_size_refuses(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2), (3, 3)])
def test_every_candidate_fits_the_budget_and_divides(tp3_hf, tp, pp):
    cfg = _cfg(tp3_hf)
    budget = Budget(params=int(cfg.num_params() * 0.7), tolerance=0.05)
    limits = SearchLimits(max_width_prune=0.5, max_depth_prune=0.5, hidden_step=8, ffn_step=16)
    shapes = enumerate_shapes(cfg, budget, limits, tp, pp)
    assert shapes
    for c in shapes:
        assert 0.95 * budget.params <= c.num_params() <= budget.params
        assert c.num_query_groups % tp == 0 and c.num_attention_heads % tp == 0
        assert c.ffn_hidden_size % tp == 0 and c.num_layers % pp == 0
        assert c.hidden_size % c.num_attention_heads == 0  # transformers 5 loads it
        assert c.hidden_size >= 48 and c.ffn_hidden_size >= 192 and c.num_layers >= 3
        assert c.num_attention_heads % c.num_query_groups == 0
        assert c.num_attention_heads // c.num_query_groups <= cfg.heads_per_group
    assert len({(c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups,
                 c.ffn_hidden_size) for c in shapes}) == len(shapes)
    costs = [c.num_params() for c in shapes]
    assert costs == sorted(costs, reverse=True)


def test_memory_budget_counts_bf16_weights_and_kv_cache(tp3_hf):
    cfg = _cfg(tp3_hf)
    budget = Budget(memory_bytes=2 * cfg.num_params(), kv_seq_length=64, kv_batch=2,
                    tolerance=0.1)
    kv = 2 * 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim * 64 * 2
    assert budget.cost(cfg) == 2 * cfg.num_params() + kv
    for c in enumerate_shapes(cfg, budget, SearchLimits(), 1, 1):
        assert 0.9 * budget.memory_bytes <= budget.cost(c) <= budget.memory_bytes


def test_search_at_tp3_equals_the_tp1_search_where_the_shape_loads_at_tp3(tp3_hf, tmp_path):
    """Same limits, every shape scored: TP=3's ranking is TP=1's with the shapes TP=3 cannot
    hold left out, so its winner is TP=1's best TP=3 shape; pruned at TP=3 (global) it equals
    the TP=1 prune of that shape resharded to TP=3, bit for bit."""
    cfg = _cfg(tp3_hf)
    budget = Budget(params=int(cfg.num_params() * 0.7), tolerance=0.05)
    limits = SearchLimits(hidden_step=8, ffn_step=16, keep=10**6)
    batches = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    convert.hf_to_megatron(tp3_hf, tmp_path / "tp1")
    convert.hf_to_megatron(tp3_hf, tmp_path / "tp3", tp=3)
    results = {}
    for tp in (1, 3):
        size = SizeSearch(budget, limits, batches)
        plan = prune_megatron(tmp_path / f"tp{tp}", tmp_path / f"pruned{tp}", PruneTarget(),
                              prune_type="global", seed=5, size=size)
        results[tp] = plan.meta["search"]
    ok3 = [c for c in results[1]["candidates"]
           if c["num_query_groups"] % 3 == 0 and c["ffn_hidden_size"] % 3 == 0]
    assert [c["loss"] for c in results[3]["candidates"]] == pytest.approx(
        [c["loss"] for c in ok3], rel=1e-6)
    win = results[3]["winner"]
    assert win == {**ok3[0], "loss": win["loss"]}
    shape = PruneTarget(hidden_size=win["hidden_size"], num_layers=win["num_layers"],
                        num_attention_heads=win["num_attention_heads"],
                        num_query_groups=win["num_query_groups"],
                        ffn_hidden_size=win["ffn_hidden_size"])
    prune_megatron(tmp_path / "tp1", tmp_path / "shape1", shape, prune_type="global", seed=5)
    convert.reshard(tmp_path / "shape1", tmp_path / "shape1_tp3", tp=3)
    assert_same_checkpoint(tmp_path / "shape1_tp3", tmp_path / "pruned3")


def test_cli_search_writes_the_search_and_the_plan_reapplies(stories260k_hf, tmp_path, capsys):
    """prune-hf to 60% of stories260K scored on Shakespeare: the console table, the plan with
    every candidate and the winner, and `--plan` reproducing the same weights."""
    src = _cfg(stories260k_hf).num_params()
    flags = ["--target-params", str(int(src * 0.6)), "--budget-tolerance", "0.05",
             "--search-data", DATA, "--search-samples", "4", "--search-seq-length", "64",
             "--search-candidates", "3", "--importance", "random"]
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "a"),
                 *flags]) == 0
    out = capsys.readouterr()
    assert "calib loss" in out.out and "pruned" in out.out
    plan = json.loads((tmp_path / "a" / PLAN_FILE).read_text())
    found = plan["meta"]["search"]
    assert found["budget"]["params"] == int(src * 0.6)
    assert len(found["candidates"]) == min(3, found["shapes"]) >= 2
    assert found["winner"] == found["candidates"][0]
    assert len(found["ranked"]) == found["shapes"]  # every shape that fit, with its proxy
    assert [r[-1] for r in found["ranked"]] == sorted((r[-1] for r in found["ranked"]),
                                                      reverse=True)
    losses = [c["loss"] for c in found["candidates"]]
    assert losses == sorted(losses)
    target = plan["target"]
    assert 0.95 * src * 0.6 <= ModelConfig(**target).num_params() <= src * 0.6
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "b"),
                 "--plan", str(tmp_path / "a" / PLAN_FILE)]) == 0
    from checks import assert_same_tensors, hf_tensors
    assert_same_tensors(hf_tensors(tmp_path / "a"), hf_tensors(tmp_path / "b"))


def test_dry_run_writes_nothing(stories260k_hf, tmp_path, capsys):
    src = _cfg(stories260k_hf).num_params()
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "out"),
                 "--target-params", str(int(src * 0.7)), "--budget-tolerance", "0.05",
                 "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "nothing written" in out.out and "layers hidden heads" in out.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,match", [
    (["--target-params", "1G"], "already within the budget"),
    (["--target-params", "1000"], "no shape within --max-width-prune 0.5 / --max-depth-prune"),
    (["--target-params", "50k", "--max-width-prune", "0.1", "--max-depth-prune", "0"],
     "raise the limits or the budget"),
    (["--target-params", "50k", "--ffn-hidden-size-remain", "64"], "a size target chooses"),
    (["--target-params", "50k", "--target-memory-gb", "1"], "not both"),
    (["--dry-run"], "--dry-run goes with"),
])
def test_impossible_budgets_are_refused(stories260k_hf, tmp_path, capsys, flags, match):
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "out"),
                 *flags]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_search_without_data_ranks_by_importance_kept(tp3_hf):
    cfg = _cfg(tp3_hf)
    result = search(cfg, random_scores(cfg, 1), Budget(params=int(cfg.num_params() * 0.6),
                                                        tolerance=0.05),
                    SearchLimits(keep=4), None, progress=False)
    proxies = [c.proxy for c in result.candidates]
    assert proxies == sorted(proxies, reverse=True) and result.winner is result.candidates[0]
    assert all(c.loss is None for c in result.candidates) and result.shapes >= 4


def test_scores_without_layer_scores_search_width_only(tp3_hf, tmp_path, caplog):
    """magnitude importance scores no layers: the search keeps every layer and says so."""
    cfg = _cfg(tp3_hf)
    size = SizeSearch(Budget(params=int(cfg.num_params() * 0.8), tolerance=0.05),
                      SearchLimits(hidden_step=8, ffn_step=16), dry_run=True)
    from megatron_prune.prune.apply import prune_hf
    plan = prune_hf(tp3_hf, tmp_path / "out", importance="magnitude", size=size)
    assert plan.target_config.num_layers == cfg.num_layers
    assert all(c["num_layers"] == cfg.num_layers for c in plan.meta["search"]["candidates"])
    assert "searching width only" in caplog.text and not (tmp_path / "out").exists()
