"""prune/stream.py: the calibration loss of a (pruned) source computed one decoder layer at a time
equals the whole LlamaForCausalLM's, bit for bit, and `auto` / the size search never build a
whole candidate model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prune.checkpoint import convert
from megatron_prune.checkpoint.hf_model import hf_model_from_source
from megatron_prune.cli import main
from megatron_prune.prune.apply import PLAN_FILE, PrunedSource
from megatron_prune.prune.importance_hf import mean_loss
from megatron_prune.prune.plan import PrunePlan
from megatron_prune.prune.reconstruct import fit, fit_rows
from megatron_prune.prune.scores import ImportanceScores
from megatron_prune.prune.stream import LayerStream

# stories260K: 8 heads / 4 groups, hidden 64, FFN 172, 5 layers, tied
SHAPE = ["--hidden-size-remain", "48", "--num-attention-heads-remain", "4",
         "--ffn-hidden-size-remain", "96", "--num-layers-remain", "4"]


@pytest.fixture(scope="module")
def scores(stories260k_hf, stories260k_calib_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--data",
                 str(stories260k_calib_text), "--importance", "activation", "--samples", "12",
                 "--seq-length", "64", "--save", str(d / "act.pt")]) == 0
    return d / "act.pt"


def untied(src, dst):
    """A copy of stories260K with its own output layer (the tied one, perturbed)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    state = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    emb = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = emb + 0.05 * torch.randn(emb.shape, generator=g)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_loss_equals_the_whole_models(stories260k_hf, scores, tmp_path, tied):
    hf = stories260k_hf if tied else untied(stories260k_hf, tmp_path / "untied")
    assert main(["prune-hf", "--hf-dir", str(hf), "--save", str(tmp_path / "p"),
                 "--scores", str(scores), "--importance", "activation", *SHAPE]) == 0
    plan = PrunePlan.load(tmp_path / "p" / PLAN_FILE)
    source = convert.open_source(hf)
    rows = fit_rows(ImportanceScores.load(scores))
    recon = fit(source, rows, progress=False)
    for src in (source, PrunedSource(source, plan, recon)):  # the teacher, a refitted candidate
        assert src.config.tie_embeddings == tied
        whole = mean_loss(hf_model_from_source(src), rows, 4)
        assert LayerStream(src, rows, 4).run(progress=False).mean_loss() == whole


def test_auto_and_size_search_build_no_whole_model(stories260k_hf, stories260k_calib_text,
                                                    tmp_path, monkeypatch):
    """Every candidate is scored by streaming its layers: building a LlamaForCausalLM would
    hold the whole candidate in fp32 (28 GB for a 7B model)."""
    assert main(["importance", "--hf-dir", str(stories260k_hf), "--data",
                 str(stories260k_calib_text), "--samples", "12", "--seq-length", "64",
                 "--save", str(tmp_path / "auto.pt")]) == 0  # auto: the default
    import transformers

    class Refused(transformers.LlamaForCausalLM):
        def __init__(self, *a, **k):
            raise AssertionError("a whole model was built")
    monkeypatch.setattr(transformers, "LlamaForCausalLM", Refused)
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "a"),
                 "--scores", str(tmp_path / "auto.pt"), *SHAPE]) == 0
    assert len(PrunePlan.load(tmp_path / "a" / PLAN_FILE).meta["auto"]["trials"]) > 1
    assert main(["prune-hf", "--hf-dir", str(stories260k_hf), "--save", str(tmp_path / "s"),
                 "--scores", str(tmp_path / "auto.pt"), "--target-params", "0.18M"]) == 0
    assert PrunePlan.load(tmp_path / "s" / PLAN_FILE).meta["search"]["candidates"]
