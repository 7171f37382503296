"""Reconstruction (prune/reconstruct.py): the kept columns of o_proj / down_proj refitted by least
squares on calibration rows, on the real stories260K model, on HF and on TP=2 shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import convert
from megatron_prune.checkpoint.hf_model import load_hf_model
from megatron_prune.cli import main
from megatron_prune.prune.apply import PLAN_FILE
from megatron_prune.prune.importance_hf import mean_loss
from megatron_prune.prune.plan import PrunePlan
from megatron_prune.prune.reconstruct import PROJECTIONS, Reconstruction, fit, fit_rows
from megatron_prune.prune.scores import ImportanceScores

from checks import hf_tensors

# stories260K: 8 heads / 4 groups, hidden 64, FFN 172, 5 layers
WIDTH = ["--num-attention-heads-remain", "4", "--ffn-hidden-size-remain", "96"]


@pytest.fixture(scope="module")
def scores(stories260k_hf, stories260k_calib_text, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("recon")
    assert main(["importance", "--hf-dir", str(stories260k_hf),
                 "--data", str(stories260k_calib_text),
                 "--importance", "activation", "--samples", "20", "--seq-length", "64",
                 "--save", str(d / "act.pt")]) == 0
    return d / "act.pt"


def test_importance_keeps_the_scored_rows_to_fit_on(scores):
    rows = fit_rows(ImportanceScores.load(scores))
    assert rows.shape == (20, 64) and rows.dtype == torch.long  # all 20 (FIT_ROWS is 64)


def test_refit_is_the_least_squares_solution(stories260k_hf, scores):
    """By definition, against torch.linalg.lstsq on the raw activations: the kept columns W'
    minimise ||X W^T - X_K W'^T|| over the calibration tokens (no ridge)."""
    model = load_hf_model(stories260k_hf)
    rows = fit_rows(ImportanceScores.load(scores))
    recon = fit(convert.open_source(stories260k_hf), rows, progress=False)
    xs = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, i: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=rows)
    hook.remove()
    x = torch.cat(xs).double()
    assert torch.allclose(recon.grams["fc2", 2].double(), x.T @ x, rtol=1e-4, atol=1e-3)
    w = model.model.layers[2].mlp.down_proj.weight.detach()
    keep = torch.arange(0, 172, 2)
    exact = Reconstruction(recon.grams, recon.tokens, ridge=0.0)
    refit = exact.weight("fc2", 2, w, None, keep).double()
    ref = torch.linalg.lstsq(x[:, keep], x @ w.double().T).solution.T
    assert torch.allclose(refit, ref, rtol=1e-3, atol=1e-5)
    err = lambda m: float(((x @ w.double().T - x[:, keep] @ m.T) ** 2).sum())  # noqa: E731
    assert err(refit) < 0.8 * err(w[:, keep].double())  # 0.59 here
    # nothing removed from the input: the kept columns are copied exactly
    assert torch.equal(recon.weight("fc2", 2, w, torch.arange(10), torch.arange(172)),
                       w[:10])


def test_grams_streamed_layer_by_layer_equal_the_whole_models(stories260k_hf, scores):
    """`fit` builds one decoder layer at a time: its Grams are the whole HF model's, bit for bit,
    and their memory-mapped files go with the reconstruction."""
    rows = fit_rows(ImportanceScores.load(scores))
    model, whole, hooks = load_hf_model(stories260k_hf), {}, []
    for i, block in enumerate(model.model.layers):
        for key, path in PROJECTIONS.items():
            def keep(module, inputs, key=key, i=i):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                whole[key, i] = whole[key, i] + x.T @ x if (key, i) in whole else x.T @ x
            hooks.append(block.get_submodule(path).register_forward_pre_hook(keep))
    with torch.inference_mode():
        for start in range(0, len(rows), 4):
            model(input_ids=rows[start:start + 4])
    recon = fit(convert.open_source(stories260k_hf), rows, progress=False)
    assert set(recon.grams) == set(whole)
    assert all(torch.equal(recon.grams[k], whole[k]) for k in whole)
    files = recon.store.dir
    assert len(list(files.iterdir())) == 2 * 5
    del recon
    assert not files.exists()


def test_prune_hf_refits_lowers_the_loss_and_replays(stories260k_hf, scores, tmp_path,
                                                     capsys):
    run = ["prune-hf", "--hf-dir", str(stories260k_hf), "--scores", str(scores),
           "--prune-type", "global", *WIDTH]
    assert main(run + ["--save", str(tmp_path / "r")]) == 0
    assert main(run + ["--save", str(tmp_path / "c"), "--no-reconstruct"]) == 0
    plan = PrunePlan.load(tmp_path / "r" / PLAN_FILE)
    assert plan.meta["reconstruct"] == {"tokens": 20 * 64, "ridge": 0.01}
    assert "reconstruct" not in PrunePlan.load(tmp_path / "c" / PLAN_FILE).meta
    r, c = hf_tensors(tmp_path / "r"), hf_tensors(tmp_path / "c")
    changed = {k for k in r if not torch.equal(r[k], c[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(5)
                       for m in ("self_attn.o_proj", "mlp.down_proj")}
    rows = fit_rows(ImportanceScores.load(scores))
    losses = [mean_loss(load_hf_model(tmp_path / d), rows, 4) for d in ("r", "c")]
    assert losses[0] < losses[1] - 0.05, losses
    # re-applying the plan redoes the fit from the same scores, bit for bit
    replay = ["prune-hf", "--hf-dir", str(stories260k_hf), "--plan",
              str(tmp_path / "r" / PLAN_FILE)]
    assert main(replay + ["--scores", str(scores), "--save", str(tmp_path / "p")]) == 0
    assert all(torch.equal(v, r[k]) for k, v in hf_tensors(tmp_path / "p").items())
    assert main(replay + ["--save", str(tmp_path / "no")]) == 2  # which scores? refused
    assert not (tmp_path / "no").exists()
    assert "--scores file it was planned with" in capsys.readouterr().err


def test_tp2_shards_refit_as_hf_does(stories260k_hf, scores, tmp_path):
    """prune on TP=2 shards (balance) and prune-hf planning for TP=2 write the same weights:
    the Grams come from the same model, whichever layout it is read from."""
    convert.hf_to_megatron(stories260k_hf, tmp_path / "tp2", tp=2)
    assert main(["prune", "--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "meg"),
                 "--importance", "activation", "--scores", str(scores), *WIDTH]) == 0
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "hf"),
                 "--importance", "activation", "--scores", str(scores),
                 "--tensor-model-parallel-size", "2", *WIDTH]) == 0
    convert.megatron_to_hf(tmp_path / "meg", tmp_path / "meg_hf")
    a, b = hf_tensors(tmp_path / "meg_hf"), hf_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
