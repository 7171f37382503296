"""Importance scores on calibration data, and what they buy on the real stories260K model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import convert
from megatron_prune.cli import main
from megatron_prune.checkpoint.hf_model import load_hf_model
from megatron_prune.prune.plan import PruneTarget, make_plan
from megatron_prune.prune.apply import PrunedSource
from megatron_prune.checkpoint.hf_model import hf_model_from_source
from megatron_prune.prune.scores import ImportanceScores, random_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from prune_quality import kl_and_ppl, sample_text  # noqa: E402


@pytest.fixture(scope="module")
def sampled(stories260k_hf, tmp_path_factory):
    """Text sampled from stories260K: calibration (seeds 0-2) and held-out (another seed)."""
    from megatron_prune.data.calibration import load_tokenizer
    d = tmp_path_factory.mktemp("sampled")
    model = load_hf_model(stories260k_hf)
    tok = load_tokenizer(stories260k_hf)
    files = {}
    for seed in (0, 1, 2, 99):
        files[seed] = d / f"s{seed}.txt"
        files[seed].write_text("\n\n".join(sample_text(model, tok, 24, 96, seed)))
    return files


def test_importance_cli_hf_and_megatron_agree(stories260k_hf, sampled, tmp_path):
    args = ["--data", str(sampled[0]), "--samples", "8", "--seq-length", "64",
            "--importance", "activation"]
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--save",
                 str(tmp_path / "hf.pt")] + args) == 0
    convert.hf_to_megatron(stories260k_hf, tmp_path / "meg", tp=2, pp=1)
    assert main(["importance", "--load", str(tmp_path / "meg"), "--save",
                 str(tmp_path / "meg.pt")] + args) == 0
    a, b = ImportanceScores.load(tmp_path / "hf.pt"), ImportanceScores.load(tmp_path / "meg.pt")
    for field in ("hidden", "heads", "groups", "ffn", "layers"):
        assert torch.allclose(getattr(a, field), getattr(b, field), rtol=1e-6), field
    assert a.heads.shape == (5, 8) and a.ffn.shape == (5, 172) and a.layers.shape == (5,)
    assert (a.heads > 0).all() and (a.layers > 0).all()
    assert torch.tensor(a.meta["angular"]).shape == (6, 6)


def test_taylor_scores(stories260k_hf, sampled, tmp_path):
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--data", str(sampled[0]),
                 "--samples", "4", "--seq-length", "32", "--importance", "taylor",
                 "--save", str(tmp_path / "t.pt")]) == 0
    s = ImportanceScores.load(tmp_path / "t.pt")
    assert s.method == "taylor" and (s.ffn >= 0).all() and s.ffn.sum() > 0


def test_activation_beats_random_masks_on_stories260k(stories260k_hf, sampled):
    """Prune 50% of heads (8 -> 4, in every KV group) and FFN neurons (172 -> 86): activation
    importance keeps the model closer to the original than seeded random masks, for 3 seeds."""
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    from megatron_prune.prune.importance_hf import compute_importance
    src = convert.open_source(stories260k_hf)
    ref = load_hf_model(stories260k_hf)
    tok = load_tokenizer(stories260k_hf)
    heldout = calibration_batches(tok, [sampled[99]], samples=16, seq_length=96)
    target = PruneTarget(num_attention_heads=4, ffn_hidden_size=86)
    for seed in (0, 1, 2):
        calib = calibration_batches(tok, [sampled[seed]], samples=16, seq_length=96)
        act = compute_importance(src, "activation", calib, 8, device="cpu")
        results = {}
        for name, scores in (("activation", act), ("random", random_scores(src.config, seed))):
            plan = make_plan(src.config, target, scores, "balance", seed=seed)
            results[name] = kl_and_ppl(ref, hf_model_from_source(PrunedSource(src, plan)), heldout)
        assert results["activation"][0] < 0.85 * results["random"][0], (seed, results)
        assert results["activation"][1] < results["random"][1], (seed, results)


def test_layer_loss_is_the_loss_of_the_model_without_that_layer(stories260k_hf, sampled,
                                                                  tmp_path, capsys):
    """`importance --layer-loss`: the calibration loss with layer i skipped equals the loss of
    the model pruned to drop layer i; `prune --layer-method perplexity` keeps the layers whose
    skipping costs most. Without the data pass the flag is refused."""
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    from megatron_prune.prune.importance_hf import mean_loss
    from megatron_prune.prune.plan import PrunePlan
    calib = ["--data", str(sampled[0]), "--samples", "8", "--seq-length", "64",
             "--micro-batch-size", "3"]
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--layer-loss",
                 "--save", str(tmp_path / "s.pt")] + calib) == 0
    meta = ImportanceScores.load(tmp_path / "s.pt").meta
    batches = calibration_batches(load_tokenizer(stories260k_hf), [sampled[0]], 8, 64)
    src = convert.open_source(stories260k_hf)
    assert meta["loss"] == pytest.approx(mean_loss(load_hf_model(stories260k_hf), batches, 3),
                                         rel=1e-6)
    for i in range(5):
        plan = make_plan(src.config, PruneTarget(drop_layers=[i]), random_scores(src.config, 0))
        pruned = hf_model_from_source(PrunedSource(src, plan))
        assert meta["layer_loss"][i] == pytest.approx(mean_loss(pruned, batches, 3), rel=1e-6)
    assert min(meta["layer_loss"]) > meta["loss"]
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "p"),
                 "--num-layers-remain", "3", "--layer-method", "perplexity",
                 "--importance", "activation", "--scores", str(tmp_path / "s.pt")]) == 0
    costliest = sorted(sorted(range(5), key=lambda i: -meta["layer_loss"][i])[:3])
    assert PrunePlan.load(tmp_path / "p" / "prune_plan.json").keep_layers == costliest
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--importance", "magnitude",
                 "--layer-loss", "--save", str(tmp_path / "m.pt")]) == 2
    assert "--layer-loss runs the model" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_loss_equals_the_whole_model_with_the_layer_skipped(stories260k_hf, sampled, attn):
    """`layer_losses` reuses the layers before the skipped one; its losses equal, to the last
    bit, the whole model run again with `skip_layer` on that layer (the definition), with the
    attention implementation's own mask (eager builds one, sdpa with no padding none) and a last
    micro-batch smaller than the others."""
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    from megatron_prune.prune.importance_hf import layer_losses, mean_loss, skip_layer
    model = load_hf_model(stories260k_hf).eval()
    model.config._attn_implementation = attn
    batches = calibration_batches(load_tokenizer(stories260k_hf), [sampled[0]], 7, 48)
    want = [mean_loss(model, batches, 3)]
    for layer in model.model.layers:
        hook = layer.register_forward_hook(skip_layer, with_kwargs=True)
        want.append(mean_loss(model, batches, 3))
        hook.remove()
    got = layer_losses(model, batches, 3, progress=False)
    assert [got["loss"]] + got["layer_loss"] == want


def test_iterative_removal_is_the_greedy_search(stories260k_hf, sampled):
    """`layer_removal_order`: each round removes the layer whose absence, with the earlier
    rounds' layers gone, gives the lowest calibration loss; the losses equal, to the last bit,
    the whole model run with only the kept layers, and the model is left as it was."""
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    from megatron_prune.prune.importance_hf import (layer_losses, layer_removal_order, mean_loss,
                                                    only_layers)
    model = load_hf_model(stories260k_hf).eval()
    batches = calibration_batches(load_tokenizer(stories260k_hf), [sampled[0]], 7, 48)
    layers = list(model.model.layers)
    got = layer_removal_order(model, batches, 3, 3, progress=False)
    keep, want_order, want_loss = list(range(len(layers))), [], []
    for _ in range(3):
        losses = {}
        for i in keep:
            with only_layers(model, [j for j in keep if j != i]):
                losses[i] = mean_loss(model, batches, 3)
        best = min(keep, key=lambda i: (losses[i], i))
        keep.remove(best)
        want_order.append(best)
        want_loss.append(losses[best])
    assert got == {"layer_removal_order": want_order, "layer_removal_loss": want_loss}
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == len(layers)
    first = layer_losses(model, batches, 3, progress=False)["layer_loss"]  # --layer-loss's pass
    assert layer_removal_order(model, batches, 3, 3, progress=False, first=first) == got
    assert want_loss == sorted(want_loss)  # each removal costs more


def test_iterative_layer_method_end_to_end(stories260k_hf, sampled, tmp_path, capsys):
    """importance --iterative-layers K records the order; prune --layer-method iterative drops
    its first layers, auto tries it, and asking for more than K is refused with nothing written."""
    from megatron_prune.prune.choose import layer_methods
    from megatron_prune.prune.plan import PrunePlan
    calib = ["--data", str(sampled[0]), "--samples", "8", "--seq-length", "64",
             "--micro-batch-size", "3"]
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--iterative-layers", "2",
                 "--importance", "activation", "--save", str(tmp_path / "s.pt")] + calib) == 0
    scores = ImportanceScores.load(tmp_path / "s.pt")
    order = scores.meta["layer_removal_order"]
    assert len(order) == 2 and len(set(order)) == 2
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "p"),
                 "--num-layers-remain", "3", "--layer-method", "iterative",
                 "--importance", "activation", "--scores", str(tmp_path / "s.pt")]) == 0
    keep = PrunePlan.load(tmp_path / "p" / "prune_plan.json").keep_layers
    assert keep == [i for i in range(5) if i not in order]
    cfg = convert.open_source(stories260k_hf).config
    assert "iterative" in layer_methods(cfg, PruneTarget(num_layers=3, layer_method="auto"),
                                        scores)
    assert "iterative" not in layer_methods(cfg, PruneTarget(num_layers=2, layer_method="auto"),
                                            scores)
    capsys.readouterr()
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "q"),
                 "--num-layers-remain", "2", "--layer-method", "iterative",
                 "--importance", "activation", "--scores", str(tmp_path / "s.pt")]) == 2
    assert "--iterative-layers 3" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    for bad in (["--iterative-layers", "5"], ["--iterative-layers", "2", "--importance",
                                              "magnitude"]):
        assert main(["importance", "--hf-dir", str(stories260k_hf), "--save",
                     str(tmp_path / "m.pt")] + calib + bad) == 2
        assert "--iterative-layers" in capsys.readouterr().err
        assert not (tmp_path / "m.pt").exists()
    assert main(["importance", "--load", str(tmp_path / "meg"), "--backend", "megatron",
                 "--iterative-layers", "2", "--save", str(tmp_path / "m.pt")] + calib) == 2
    assert "--iterative-layers runs on the hf backend only" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_calibration_errors(stories260k_hf, sampled, tmp_path, capsys):
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--data", str(sampled[0]),
                 "--samples", "100000", "--seq-length", "64", "--save", str(tmp_path / "x.pt")]) == 2
    assert "need" in capsys.readouterr().err
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "x.pt")]) == 2
    assert "needs calibration text" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_boundary_angles_in_token_chunks(monkeypatch):
    """The layer-boundary cosines (Block Influence and the angular distances), computed from
    token chunks of the boundaries' Gram matrices, equal a direct fp64 computation, in fp32
    and from bf16 boundaries (as far as bf16 holds them)."""
    from megatron_prune.prune import importance_hf as importance
    torch.manual_seed(0)
    base = torch.randn(3, 10, 32, dtype=torch.float64)
    boundary = [base + 0.3 * i * torch.randn_like(base) for i in range(5)]  # 4 layers
    x = torch.stack([h.reshape(-1, 32) for h in boundary], 1)
    unit = torch.nn.functional.normalize(x, dim=-1)
    cos = (unit @ unit.transpose(1, 2)).clamp(-1, 1)
    want_ang = torch.arccos(cos).sum(0) / torch.pi
    want_bi = (1 - cos.diagonal(1, 1, 2)).sum(0)
    monkeypatch.setattr(importance, "_GRAM_BYTES", 4 * 5 * 32 * 7)  # chunks of 7 of 30 tokens
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        ang, bi = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        n = importance._add_boundary_angles([h.to(dtype) for h in boundary], ang, bi)
        assert n == 30
        off = ~torch.eye(5, dtype=torch.bool)  # arccos is steep at cos = 1: no diagonal
        assert torch.allclose(ang[off], want_ang[off], rtol=tol)
        assert torch.allclose(bi, want_bi, rtol=tol)
