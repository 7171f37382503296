"""Importance scores on megatron-core (TP/PP/DP over gloo, CPU) equal the Hugging Face path's.

Every multi-rank run is a real launch: `torchrun --nproc_per_node 2 -m megatron_prune importance
--load DIR` (backend auto = megatron), or a script launched the same way. Tolerances (atol 0):
activation scores agree to rtol 1e-5 (measured: <= 4e-7 relative, every field and the angular
matrix), taylor scores to rtol 2e-5 (measured: <= 3e-7 on the random model here, <= 2.2e-6 on
stories260K at TP=2: products of fp32 gradients), `--layer-loss` losses to rtol 1e-5 (and at
TP=2 and PP=2, where layers before the skipped one are not rerun, equal to the last bit to the
whole pipeline run again with that layer skipped).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import convert
from megatron_prune.cli import main
from megatron_prune.prune.scores import ImportanceScores

from hf_models import make_hf_llama

pytest.importorskip("megatron.core")

RTOL_ACTIVATION = 1e-5
RTOL_TAYLOR = 2e-5
RTOL_LOSS = 1e-5
FIELDS = ("hidden", "heads", "groups", "ffn", "layers")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(nproc: int, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = (TORCHRUN if nproc == 2 else [sys.executable]) + ["-m", "megatron_prune", *args]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc


def assert_same(a: ImportanceScores, b: ImportanceScores, rtol: float, angular: bool = True):
    assert a.shape == b.shape
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert x.shape == y.shape, field
        assert torch.allclose(x, y, rtol=rtol, atol=0), \
            f"{field}: max rel {((x - y).abs() / y.abs()).max():.3e}"
    if angular:
        x, y = torch.tensor(a.meta["angular"]), torch.tensor(b.meta["angular"])
        assert x.shape == y.shape and torch.allclose(x, y, rtol=rtol, atol=0)
    assert ("norm_energy" in a.meta) == ("norm_energy" in b.meta)
    if "norm_energy" in a.meta:  # sum(x^2) per channel of every norm's input, final norm last
        x, y = a.meta["norm_energy"], b.meta["norm_energy"]
        assert x.shape == y.shape and (x[-1] > 0).all() and torch.allclose(x, y, rtol=rtol, atol=0)
    assert ("norm_l2" in a.meta) == ("norm_l2" in b.meta)
    if "norm_l2" in a.meta:  # each norm's L2 vector (prune --hidden-aggregation sum)
        x, y = a.meta["norm_l2"], b.meta["norm_l2"]
        assert x.shape == y.shape and torch.allclose(x, y, rtol=rtol, atol=0)
    assert ("layer_loss" in a.meta) == ("layer_loss" in b.meta)
    if "layer_loss" in a.meta:  # --layer-loss: the loss with each layer skipped
        x, y = (torch.tensor([m["loss"]] + m["layer_loss"]) for m in (a.meta, b.meta))
        assert x.shape == y.shape and torch.allclose(x, y, rtol=RTOL_LOSS, atol=0), (x, y)


@pytest.fixture(scope="module")
def calib(stories260k_hf, tmp_path_factory):
    """Text sampled from stories260K, and the HF path's activation scores on it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from prune_quality import sample_text

    from megatron_prune.data.calibration import load_tokenizer
    from megatron_prune.checkpoint.hf_model import load_hf_model
    d = tmp_path_factory.mktemp("calib")
    text = d / "calib.txt"
    text.write_text("\n\n".join(sample_text(load_hf_model(stories260k_hf),
                                            load_tokenizer(stories260k_hf), 12, 96, 0)))
    args = {"activation": ["--data", text, "--samples", "8", "--seq-length", "64",
                           "--micro-batch-size", "3", "--importance", "activation",
                           "--layer-loss"]}
    args = {k: [str(x) for x in v] for k, v in args.items()}
    hf = {}
    for method in args:
        assert main(["importance", "--hf-dir", str(stories260k_hf), "--save",
                     str(d / f"hf_{method}.pt")] + args[method]) == 0
        hf[method] = ImportanceScores.load(d / f"hf_{method}.pt")
    return {"args": args, "hf": hf}


def test_activation_tp2_equals_hf_and_tp1(stories260k_hf, calib, tmp_path):
    """stories260K at TP=2 (Transformer Engine names, loaded into the local spec) on 2 gloo
    ranks; the same checkpoint at TP=1 in one process (resharded on load)."""
    convert.hf_to_megatron(stories260k_hf, tmp_path / "tp2", tp=2)
    args = calib["args"]["activation"]
    proc = launch(2, "importance", "--load", tmp_path / "tp2", "--save", tmp_path / "tp2.pt",
                  *args)
    assert proc.stdout.count("wrote activation scores") == 1  # rank 0 alone writes
    launch(1, "importance", "--backend", "megatron", "--load", tmp_path / "tp2",
           "--save", tmp_path / "tp1.pt", *args)
    tp2 = ImportanceScores.load(tmp_path / "tp2.pt")
    tp1 = ImportanceScores.load(tmp_path / "tp1.pt")
    assert (tp2.meta["backend"], tp2.meta["tp"], tp2.meta["pp"]) == ("megatron", 2, 1)
    assert (tp1.meta["backend"], tp1.meta["tp"], tp1.meta["pp"]) == ("megatron", 1, 1)
    assert_same(tp2, calib["hf"]["activation"], RTOL_ACTIVATION)
    assert_same(tp2, tp1, RTOL_ACTIVATION)
    assert (tp2.heads > 0).all() and (tp2.ffn > 0).all() and (tp2.layers > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp1.pt", "tp2", "tp2.pt"]


def test_activation_pp2_uneven_tied_equals_hf(stories260k_hf, calib, tmp_path):
    """PP=2 with stages of 3 + 2 layers and the tied embedding's copy on the last stage: the
    angular distances need boundaries of both stages."""
    convert.hf_to_megatron(stories260k_hf, tmp_path / "pp2", pp=2, first=3, impl="local")
    launch(2, "importance", "--load", tmp_path / "pp2", "--save", tmp_path / "pp2.pt",
           *calib["args"]["activation"])
    pp2 = ImportanceScores.load(tmp_path / "pp2.pt")
    assert (pp2.meta["tp"], pp2.meta["pp"]) == (1, 2)
    assert_same(pp2, calib["hf"]["activation"], RTOL_ACTIVATION)


def test_untied_padded_vocab_tp2_pp2_dp2(tmp_path):
    """A random GQA model, untied, vocab 300 (Megatron pads it: those logits are masked out of
    the loss): activation and taylor on one 2-rank launch at PP=2 (the checkpoint's), at TP=2
    (resharded on load) and at TP=PP=1 with 2 data-parallel replicas sharing an odd number of
    micro-batches; all equal the HF path."""
    from megatron_prune.checkpoint.hf_model import load_hf_model
    from megatron_prune.prune.importance_hf import activation_scores, layer_losses, taylor_scores
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
    from megatron_prune.eval.verify import random_tokens

    hf = make_hf_llama(tmp_path / "hf")
    convert.hf_to_megatron(hf, tmp_path / "pp2", pp=2)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        import torch.distributed as dist
        from megatron_prune.prune.importance_mcore import compute_importance_megatron
        from megatron_prune.eval.verify import random_tokens
        x = random_tokens(300, 6, 24, 0)
        dist.init_process_group("gloo")  # kept across the calls below
        for method in ("activation", "taylor"):
            for tp, pp in ((1, 2), (2, 1), (1, 1)):
                s = compute_importance_megatron({str(tmp_path / "pp2")!r}, method, x, 2,
                                                tp=tp, pp=pp, progress=False,
                                                layer_loss=method == "taylor")
                if s is not None:
                    s.save({str(tmp_path)!r} + f"/{{method}}_tp{{tp}}pp{{pp}}.pt")
                    print("DP", s.meta["dp"])
        s = compute_importance_megatron({str(tmp_path / "pp2")!r}, "auto", x, 2, tp=2, pp=1,
                                        progress=False)
        if s is not None:
            s.save({str(tmp_path)!r} + "/auto.pt")
        # the layer losses as defined: the whole pipeline again with each layer skipped
        import megatron_prune.prune.importance_mcore as im
        from megatron_prune.mcore.parallel import pipeline_forward
        from megatron_prune.prune.loss_mcore import batch_loss, mean_losses
        from megatron_prune.prune.importance_hf import skip_layer

        def rerun(run, batches, micro_batch, progress):
            sums = torch.zeros(run.cfg.num_layers + 1, dtype=torch.float64)
            run.model.eval()
            with torch.no_grad():
                for i in range(-1, run.cfg.num_layers):
                    hook = None
                    if run.start <= i < run.end:
                        hook = run.model.decoder.layers[i - run.start].register_forward_hook(
                            skip_layer, with_kwargs=True)
                    for ids in run.my_batches(batches, micro_batch):
                        sums[i + 1] += batch_loss(run, pipeline_forward(run.model, ids), ids)
                    if hook is not None:
                        hook.remove()
            return mean_losses(run, sums, len(batches))
        im.layer_losses = rerun
        for tp, pp in ((2, 1), (1, 2)):
            s = compute_importance_megatron({str(tmp_path / "pp2")!r}, "activation", x, 2,
                                            tp=tp, pp=pp, progress=False, layer_loss=True)
            if s is not None:
                s.save({str(tmp_path)!r} + f"/rerun_tp{{tp}}pp{{pp}}.pt")
    """))
    proc = subprocess.run(TORCHRUN + [str(script)], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.split().count("DP") == 6 and "DP 2" in proc.stdout
    cfg = LegacyCheckpoint(tmp_path / "pp2").config
    x = random_tokens(300, 6, 24, 0)
    want = {"activation": activation_scores(load_hf_model(hf), x, cfg, 2, progress=False),
            "taylor": taylor_scores(load_hf_model(hf), x, cfg, 2, progress=False)}
    want["taylor"].meta.update(layer_losses(load_hf_model(hf), x, 2, progress=False))
    for method, rtol in (("activation", RTOL_ACTIVATION), ("taylor", RTOL_TAYLOR)):
        for tp, pp in ((1, 2), (2, 1), (1, 1)):
            got = ImportanceScores.load(tmp_path / f"{method}_tp{tp}pp{pp}.pt")
            assert (got.meta["tp"], got.meta["pp"], got.meta["dp"]) == (tp, pp, 2 // (tp * pp))
            assert_same(got, want[method], rtol, angular=method == "activation")
    for tp, pp in ((2, 1), (1, 2)):  # layers before the skipped one not rerun: the same bits
        fast, rerun = (ImportanceScores.load(tmp_path / f"{m}_tp{tp}pp{pp}.pt").meta
                       for m in ("taylor", "rerun"))
        assert [fast["loss"]] + fast["layer_loss"] == [rerun["loss"]] + rerun["layer_loss"]
    auto = ImportanceScores.load(tmp_path / "auto.pt")  # activation's fields, taylor's in meta
    assert auto.method == "auto" and torch.equal(auto.meta["calibration"].long(), x[:16])
    want["activation"].meta.pop("layer_loss", None)
    assert_same(auto, want["activation"], RTOL_ACTIVATION)
    for field, value in auto.meta["taylor"].items():
        assert torch.allclose(value, getattr(want["taylor"], field), rtol=RTOL_TAYLOR), field


def test_backend_selection_errors(stories260k_hf, calib, tmp_path, monkeypatch, capsys):
    convert.hf_to_megatron(stories260k_hf, tmp_path / "tp2", tp=2)
    args = calib["args"]["activation"]
    save = tmp_path / "x.pt"
    # TP=2 asked for in one process: refused before any model runs or file is written
    assert main(["importance", "--backend", "megatron", "--load", str(tmp_path / "tp2"),
                 "--tensor-model-parallel-size", "2", "--save", str(save)] + args) == 2
    assert "--nproc_per_node 2" in capsys.readouterr().err
    assert main(["importance", "--backend", "megatron", "--hf-dir", str(stories260k_hf),
                 "--save", str(save)] + args) == 2
    assert "--load" in capsys.readouterr().err
    assert main(["importance", "--load", str(tmp_path / "tp2"), "--tensor-model-parallel-size",
                 "2", "--backend", "hf", "--save", str(save)] + args) == 2
    assert "need --backend megatron" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["importance", "--backend", "hf", "--hf-dir", str(stories260k_hf),
                 "--save", str(save)] + args) == 2
    assert "runs in one process" in capsys.readouterr().err
    # data-free methods under a multi-rank launch: rank 0 alone writes
    monkeypatch.setenv("RANK", "1")
    assert main(["importance", "--load", str(tmp_path / "tp2"), "--importance", "random",
                 "--save", str(save)]) == 0
    assert not save.exists()
    monkeypatch.setenv("RANK", "0")
    assert main(["importance", "--load", str(tmp_path / "tp2"), "--importance", "random",
                 "--save", str(save)]) == 0
    assert save.exists()
