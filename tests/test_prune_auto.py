"""`auto` importance on the real stories260K model: both criteria measured once, each pruned
dimension's criterion and the layer method chosen by the calibration loss, on HF and on shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import convert
from megatron_prune.checkpoint.hf_model import load_hf_model
from megatron_prune.cli import main
from megatron_prune.prune.apply import PLAN_FILE
from megatron_prune.prune.choose import CALIB_ROWS, calibration_rows
from megatron_prune.prune.importance_hf import mean_loss
from megatron_prune.prune.plan import PrunePlan
from megatron_prune.prune.scores import ImportanceScores

# 8 heads / 4 groups, hidden 64, FFN 172, 5 layers -> every width dimension and the depth shrink
SHAPE = ["--hidden-size-remain", "48", "--num-attention-heads-remain", "2",
         "--num-query-groups-remain", "2", "--ffn-hidden-size-remain", "128",
         "--num-layers-remain", "4"]


@pytest.fixture(scope="module")
def auto_scores(stories260k_hf, stories260k_calib_text, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("auto")
    assert main(["importance", "--hf-dir", str(stories260k_hf),
                 "--data", str(stories260k_calib_text),
                 "--samples", "20", "--seq-length", "64", "--layer-loss",
                 "--save", str(d / "auto.pt")]) == 0  # auto is the default
    return d / "auto.pt"


def test_auto_scores_hold_the_sequences_after_the_scored_ones(stories260k_hf, auto_scores,
                                                            stories260k_calib_text):
    """prune judges auto's choices on calibration sequences the scores never saw: the 20 scored
    ones are followed in the same text by the CALIB_ROWS kept in the scores file."""
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    every = calibration_batches(load_tokenizer(stories260k_hf), [stories260k_calib_text],
                                20 + CALIB_ROWS, 64)
    assert torch.equal(calibration_rows(ImportanceScores.load(auto_scores)), every[20:])
    assert ImportanceScores.load(auto_scores).meta["samples"] == 20


def test_auto_scores_hold_both_criteria_and_the_calibration(auto_scores):
    s = ImportanceScores.load(auto_scores)
    assert s.method == "auto" and set(s.meta["taylor"]) == {"hidden", "groups", "heads", "ffn"}
    assert s.meta["taylor"]["heads"].shape == s.heads.shape == (5, 8)
    assert not torch.equal(s.meta["taylor"]["ffn"], s.ffn)  # two different criteria
    rows = calibration_rows(s)
    assert rows.shape == (CALIB_ROWS, 64) and rows.dtype == torch.long
    assert "layer_loss" in s.meta and s.meta["norm_energy"].shape == (11, 64)


def test_auto_prune_keeps_the_lowest_loss_it_tried(stories260k_hf, auto_scores, tmp_path):
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "p"),
                 "--scores", str(auto_scores), "--prune-type", "global", *SHAPE]) == 0
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    rec = plan.meta["auto"]
    assert plan.method == "auto" and set(rec["choice"]) == {"hidden", "groups", "heads", "ffn",
                                                             "layers"}
    # all-activation first, then taylor per dimension, then the two other layer methods
    assert len(rec["trials"]) == 1 + 4 + 2
    assert rec["loss"] == min(loss for _, loss in rec["trials"])  # every lower one is kept
    assert plan.layer_method == rec["choice"]["layers"]
    # the loss recorded is the saved model's, on the calibration rows the scores carry
    model = load_hf_model(tmp_path / "p")
    loss = mean_loss(model, calibration_rows(ImportanceScores.load(auto_scores)), 4)
    assert abs(loss - rec["loss"]) < 1e-4, (loss, rec["loss"])


def test_auto_prune_on_tp2_shards_equals_hf_at_tp2(stories260k_hf, auto_scores, tmp_path):
    """On the shards (balance, each rank keeps its own best) the choice and the kept indices are
    those of prune-hf planning for TP=2."""
    convert.hf_to_megatron(stories260k_hf, tmp_path / "tp2", tp=2)
    assert main(["prune", "--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "meg"),
                 "--scores", str(auto_scores), *SHAPE]) == 0
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "hf"),
                 "--scores", str(auto_scores), "--tensor-model-parallel-size", "2", *SHAPE]) == 0
    a, b = (PrunePlan.load(tmp_path / d / PLAN_FILE) for d in ("meg", "hf"))
    assert a.meta["auto"]["choice"] == b.meta["auto"]["choice"]
    for field in ("keep_layers", "keep_hidden", "keep_groups", "keep_heads", "keep_ffn",
                  "norm_scale"):
        assert getattr(a, field) == getattr(b, field), field


def test_auto_criteria_pins_a_dimension_and_chooses_the_rest(stories260k_hf, auto_scores,
                                                             tmp_path, capsys):
    """--auto-criteria heads=taylor,ffn=activation: those two are not tried, the others are."""
    run = ["prune-hf", "--hf-dir", str(stories260k_hf), "--scores", str(auto_scores),
           "--prune-type", "global", *SHAPE]
    assert main(run + ["--save", str(tmp_path / "p"),
                       "--auto-criteria", "heads=taylor,ffn=activation"]) == 0
    rec = PrunePlan.load(tmp_path / "p" / PLAN_FILE).meta["auto"]
    assert rec["pinned"] == {"heads": "taylor", "ffn": "activation"}
    assert rec["choice"]["heads"] == "taylor" and rec["choice"]["ffn"] == "activation"
    assert rec["trials"][0][0].startswith("heads: taylor, ffn: activation, layers ")
    assert [t[0] for t in rec["trials"][1:3]] == ["hidden: taylor", "groups: taylor"]
    assert len(rec["trials"]) == 1 + 2 + 2  # hidden and groups, then the two other layer methods
    # the pinned heads are Taylor's own ranking
    s = ImportanceScores.load(auto_scores)
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    src_layer, group = plan.keep_layers[0], plan.keep_groups[0][0]
    taylor = s.meta["taylor"]["heads"][src_layer].view(4, 2)[group]
    assert plan.keep_heads[0][0] == [int(taylor.argmax())]
    # only with auto scores; a wrong pair is refused by the parser
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--importance", "magnitude",
                 *SHAPE, "--save", str(tmp_path / "m"), "--auto-criteria", "heads=activation"]) == 2
    assert not (tmp_path / "m").exists()
    assert "--auto-criteria goes with auto scores" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(run + ["--save", str(tmp_path / "x"), "--auto-criteria", "layers=taylor"])
    assert not (tmp_path / "x").exists()


def test_size_search_keeps_the_pinned_criteria(stories260k_hf, auto_scores, tmp_path):
    """With a size budget the search picks the shape, then auto chooses its criteria, keeping
    the pinned one."""
    budget = str(int(load_hf_model(stories260k_hf).num_parameters() * 0.7))
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "p"),
                 "--scores", str(auto_scores), "--target-params", budget,
                 "--budget-tolerance", "0.05", "--auto-criteria", "hidden=taylor"]) == 0
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    assert "search" in plan.meta and plan.meta["auto"]["pinned"] == {"hidden": "taylor"}
    assert all(not t[0].startswith("hidden:") for t in plan.meta["auto"]["trials"])
