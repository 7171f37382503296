"""bench/prune_recover.py end to end on the CPU (`--smoke`: tiny shapes, the real pipeline:
Gutenberg -> preprocess -> teacher from random init -> importance -> prune -> recovery with LM
loss and distillation, random-init baseline -> evaluation -> report). Slow (about 5 minutes):
`python3 -m pytest -m slow tests/test_prune_recover.py`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.slow
def test_prune_recover_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prune_recover.py"), "--smoke",
                           "--out", str(tmp_path), "--workers", "2", "--data", str(DATA),
                           "--recover-fraction", "1/6",
                           "--variant", "activation_kd@logits=--kd-hidden-weight 0",
                           "--prune-variant", "activation:last=--drop-layers 0",
                           "--prune-variant", "activation:ppl=--layer-method perplexity",
                           "--skip", "activation:last_lm,activation:ppl_lm",
                           "--budget-sweep", "1/2"],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    ev = res["eval"]
    methods = ("random", "magnitude", "activation", "taylor")
    assert set(ev) == {"teacher", "scratch", "activation_kd@logits", "activation:last_pruned",
                       "activation:last_kd", "activation:ppl_pruned", "activation:ppl_kd",
                       "activation_kd@tokens1/2", "scratch@tokens1/2"} | {
        f"{m}_{k}" for m in methods for k in ("pruned", "lm", "kd")}
    t = ev["teacher"]
    for m in methods:  # pruning removed parameters; training helped every pruned model
        assert ev[f"{m}_pruned"]["params"] < t["params"]
        assert ev[f"{m}_lm"]["books"] < ev[f"{m}_pruned"]["books"]
    assert ev["activation_kd"]["books"] < ev["scratch"]["books"]
    assert len(res["goals"]) == 7
    # the recovery budget: the most whole iterations within 1/6 of the teacher's tokens
    p = res["protocol"]
    per_iter = p["recover_global_batch"] * p["seq_length"]
    assert p["recover_iters"] * per_iter <= res["teacher"]["tokens"] / 6
    assert (p["recover_iters"] + 1) * per_iter > res["teacher"]["tokens"] / 6
    assert "hidden states of student layers" in (tmp_path / "run.log").read_text()
    # the budget sweep: the goal's pair again on half the tokens, tabulated beside the full one
    assert [b["tokens"] for b in res["budgets"]] == [
        round(p["recover_iters"] / 2) * per_iter, p["recover_iters"] * per_iter]
    assert "Token budget (--budget-sweep)" in (tmp_path / "results.md").read_text()
    # the prune variant kept the teacher's last layer, and distilled through its plan
    plan = json.loads((tmp_path / "work" / "pruned_activation-last" / "prune_plan.json")
                      .read_text())
    assert plan["keep_layers"] == [1]
    assert "activation (last prune) + distillation" in (tmp_path / "results.md").read_text()
    # ... and the other kept the layers whose skipping costs the most calibration loss
    from megatron_prune.prune.scores import ImportanceScores
    loss = ImportanceScores.load(tmp_path / "work" / "scores_activation.pt").meta["layer_loss"]
    plan = json.loads((tmp_path / "work" / "pruned_activation-ppl" / "prune_plan.json")
                      .read_text())
    assert plan["keep_layers"] == [max(range(len(loss)), key=loss.__getitem__)]
    for f in ("results.md", "recover_curves.png", "teacher_curve.png", "run.log"):
        assert (tmp_path / f).stat().st_size > 0


def test_recover_fraction_flag():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    p = pr.Protocol(recover_fraction="1/6")
    assert pr.recovery_iterations(p, 48_824_320) == 993  # 8.14 M tokens / (8 x 1024)
    assert pr.parse_args(["--out", "x", "--recover-fraction", "1/6"]).recover_fraction == "1/6"
    for bad in ("0", "7/6", "x"):
        with pytest.raises(SystemExit):
            pr.parse_args(["--out", "x", "--recover-fraction", bad])


def test_batch_size_variant_keeps_the_tokens():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    p = pr.Protocol(recover_iters=960, recover_global_batch=8)
    flags = pr._same_tokens(p, ["--micro-batch-size", "4", "--global-batch-size", "4"])
    assert pr._flag(flags, "--train-iters", 0) * 4 == 960 * 8  # twice the iterations of 8
    assert pr._flag(flags, "--lr-warmup-iters", 0) == 96  # 5% of them, as the base run
    # other flags, or an explicit length, are left as given
    assert pr._same_tokens(p, ["--lr", "2e-3"]) == ["--lr", "2e-3"]
    both = ["--global-batch-size", "16", "--train-iters", "10"]
    assert pr._same_tokens(p, both) == both
    with pytest.raises(SystemExit, match="multiple of the micro-batch"):
        pr.main(["--out", "x", "--variant", "activation_kd@b4=--global-batch-size 4"])


def test_prune_variant_flags():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    from prune_recover_stages import prune as pr_prune
    p = pr.Protocol()  # 12 -> 9 layers
    base = ["--importance", "activation", "--seed", 0, "--scores", "s.pt"]
    assert pr_prune.prune_flags(p, "activation", "s.pt") == base + ["--num-layers-remain", 9]
    # a variant's own layers replace the method's choice (the prune command takes one)
    assert pr_prune.prune_flags(p, "activation", "s.pt", ("--drop-layers", "8,9,10")) == \
        base + ["--drop-layers", "8,9,10"]
    assert pr_prune.prune_flags(p, "activation", "s.pt", ("--drop_layers", "8,9,10")) == \
        base + ["--drop_layers", "8,9,10"]  # the prune command's other spelling
    assert pr_prune.prune_flags(p, "activation", "s.pt", ("--layer-method", "contiguous")) == \
        base + ["--num-layers-remain", 9, "--layer-method", "contiguous"]
    assert pr_prune.prune_flags(p, "magnitude", None)[-2:] == ["--drop-layers", "8,9,10"]
    pv = pr.parse_prune_variants(["activation:last=--drop-layers 8,9,10"], ["activation"])
    assert pv == {"activation:last": ["--drop-layers", "8,9,10"]}
    assert pr.run_names(["activation", *pv], ["activation"]) == [
        "activation_lm", "activation_kd", "activation:last_lm", "activation:last_kd", "scratch"]
    for bad in ("activation=--seed 1", "activation:a_b=x", "activation:=x", "taylor:t=x"):
        with pytest.raises(SystemExit, match="--prune-variant"):
            pr.parse_prune_variants([bad], ["activation"])


def test_budget_sweep():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    from prune_recover_stages import report as pr_report
    p = pr.Protocol(recover_iters=1228)
    v = pr.budget_variants(p, pr.parse_budgets("1/2,1/8", ["activation"]))
    assert list(v) == ["activation_kd@tokens1/2", "scratch@tokens1/2",
                       "activation_kd@tokens1/8", "scratch@tokens1/8"]
    # each budget is a whole schedule of its own: its iterations, 5% of them warmup
    assert pr._flag(v["scratch@tokens1/8"], "--train-iters", 0) == 154
    assert pr._flag(v["scratch@tokens1/8"], "--lr-warmup-iters", 0) == 7
    ev = {"teacher": {"books": 30.0}, "activation_kd": {"books": 30.3},
          "scratch": {"books": 45.0}, "activation_kd@tokens1/2": {"books": 33.0},
          "scratch@tokens1/2": {"books": 90.0}, "activation_kd@tokens1/8": {"books": 40.0}}
    rows = pr_report.budget_rows(p, ev, v)  # 1/8 lacks its random init: left out
    assert [r[0] for r in rows] == [614 * 8 * 1024, 1228 * 8 * 1024]
    tokens, kd, gap, s, below = rows[0]
    assert (kd, s) == (33.0, 90.0) and abs(gap - 0.1) < 1e-9 and abs(below - 19 / 30) < 1e-9
    lines = pr_report._budget_lines(p, ev, {"tokens": 6 * 1228 * 8 * 1024}, v)
    assert lines[-2].startswith("| 5.03 M | 1/12 | 33.00 | +10.0% | 90.00 | 63% | no |")
    assert lines[-1].endswith("| +1.0% | 45.00 | 33% | no |")
    for bad in ("1", "0", "2/1", "x"):
        with pytest.raises(SystemExit, match="--budget-sweep"):
            pr.parse_budgets(bad, ["activation"])
    with pytest.raises(SystemExit, match="activation"):
        pr.parse_budgets("1/2", ["random"])


def _report(pr, ev):
    from prune_recover_stages import report as pr_report
    p = pr.Protocol(recover_iters=1228)
    teacher = {"tokens": 921 * 64 * 1024, "iterations": 921, "train_seconds": 169.0}
    meta = {"date": "2026-12-05", "command": "python bench/prune_recover.py", "device": "CPU",
            "torch": "2", "commit": "x", "train_books": 10, "valid_books": ["a"],
            "stages": {"total": 1.0}, "variants": {}}
    return pr_report.report_lines(p, meta, teacher, ev)


def test_report_verdicts_quote_the_table():
    """results.md's goals quote the table's own cells (one `table_cells` makes both), and the
    checker of bench/verdicts.py finds a verdict that does not."""
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    import verdicts
    books = {"teacher": 34.3012, "random_pruned": 3630.444, "activation_pruned": 311.5391,
             "random_lm": 38.8049, "random_kd": 34.4249, "activation_lm": 37.4351,
             "activation_kd": 34.0549, "scratch": 47.9251}
    ev = {n: {"params": 54e6, "books": b, "wikitext2": 10 * b} for n, b in books.items()}
    lines = _report(pr, ev)
    assert verdicts.check_section(lines, "report") == []
    goal_rows = [ln for ln in lines if ln.startswith("| ") and ln.count("|") == 4][1:]
    assert len(goal_rows) == 7
    assert "| 34.05 vs 34.30: -0.7% | yes |" in "\n".join(goal_rows)
    assert "| 10.06 M vs 60.36 M: 1/6.00 | yes |" in "\n".join(goal_rows)
    # a verdict that quotes a number the table does not hold, or a ratio its numbers do not give
    bad = [ln.replace("3630.44 vs 311.54", "3630.4 vs 311.5") for ln in lines]
    assert any("quotes 3630.4" in e for e in verdicts.check_section(bad))
    bad = [ln.replace(": 11.65×", ": 12.65×") for ln in lines]
    assert any("does not follow" in e for e in verdicts.check_section(bad))


def test_token_ratio_is_interpolated_never_extrapolated():
    """--efficiency: random init's tokens at a distilled perplexity come from log-log
    interpolation between the two runs that bracket it; past its largest run the ratio is a
    lower bound ("> N×"), before its smallest an upper bound ("< N×"); the section's verdict
    quotes its own cells."""
    sys.path.insert(0, str(ROOT / "bench"))
    import token_efficiency as te
    import verdicts
    pts = [(1000, 80.0), (4000, 40.0), (16000, 30.0)]
    t, where = te.tokens_at(pts, 80.0 * 0.5 ** 0.5)  # halfway from 80 to 40 in log-ppl
    assert where == "at" and t == pytest.approx(2000.0)  # halfway in log-tokens
    assert te.tokens_at(pts, 20.0) == (16000.0, "after")
    assert te.tokens_at(pts, 90.0) == (1000.0, "before")
    ev = {"activation_kd@teacher1/96": {"books": 40.0}, "activation_kd@teacher1/48": {"books": 25.0},
          "scratch@teacher1/24": {"books": 80.0}, "scratch@teacher1/6": {"books": 30.0}}
    tokens = {"activation_kd@teacher1/96": 100, "activation_kd@teacher1/48": 200,
              "scratch@teacher1/24": 1000, "scratch@teacher1/6": 16000}
    rows = te.rows(ev, tokens.get)
    assert [r["where"] for r in rows] == ["at", "after"]
    x = (math.log(40) - math.log(80)) / (math.log(30) - math.log(80))
    assert rows[0]["ratio"] == pytest.approx(math.exp(x * math.log(16)) * 1000 / 100)
    assert rows[1]["ratio_cell"] == "> 80.0×"
    lines = te.lines(ev, tokens.get, teacher_tokens=96000)
    assert verdicts.check_section(lines, "efficiency") == []
    assert lines[-1].endswith("| > 0.016 M vs 0.0002 M: 80.0× | yes |")
    # the full recovery at the recovery budget (LoRA's comparison) is a point of the KD curve;
    # LoRA's own run is not
    ev.update({"activation_kd": {"books": 20.0}, "activation_kd@lora4": {"books": 21.0}})
    tokens.update({"activation_kd": 16000, "activation_kd@lora4": 16000})
    assert [t for t, _ in te.curve(ev, te.KD_RUN, tokens.get)] == [100, 200, 16000]
    assert len(te.rows(ev, tokens.get)) == 3


@pytest.mark.slow
def test_efficiency_smoke_split_over_two_calls(tmp_path):
    """--efficiency --smoke on the CPU in two calls sharing one --work: the first trains the
    teacher, prunes, runs the distillation budgets, one random-init budget and LoRA beside full
    recovery; the second (--reuse) reuses all of that and adds a larger random-init budget.
    The report has both curves, the ratios, a verdict quoting them, and LoRA's cost table."""
    def run(*flags):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prune_recover.py"),
                               "--smoke", "--efficiency", "--out", str(tmp_path / "out"),
                               "--work", str(tmp_path / "work"), "--workers", "2",
                               "--data", str(DATA), "--lora-rank", "4", *flags],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout
    first = run("--kd-budgets", "1/96,1/48,1/24", "--scratch-budgets", "1/24")
    assert "reusing" not in first and "== teacher: " in first
    second = run("--reuse", "--kd-budgets", "1/96,1/48,1/24", "--scratch-budgets", "1/24,1/6")
    assert "reusing the teacher of an earlier call" in second
    reused = next(ln for ln in second.splitlines() if "reusing finished recoveries" in ln)
    for name in ("activation_kd", "activation_kd@teacher1/24", "scratch@teacher1/24",
                 "activation_kd@lora4"):
        assert name in reused
    assert "start scratch@teacher1/6" in second and "start scratch@teacher1/24" not in second
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {n for n in res["eval"] if "@teacher" in n} >= {
        "activation_kd@teacher1/24", "scratch@teacher1/24", "scratch@teacher1/6"}
    assert res["efficiency"] and all(r["ratio"] > 0 for r in res["efficiency"])
    assert set(res["lora_cost"]) == {"activation_kd", "activation_kd@lora4"}
    sys.path.insert(0, str(ROOT / "bench"))
    import verdicts
    md = (tmp_path / "out" / "results.md").read_text()
    section = md.split("## Token efficiency")[1].split("## LoRA")[0].splitlines()
    assert verdicts.check_section(section, "efficiency") == []
    assert "random init needs >= 30× the distillation's tokens" in md
    assert "| activation + distillation [lora4] |" in md
