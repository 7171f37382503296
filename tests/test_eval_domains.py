"""bench/eval_domains.py: its pure parts (C4 split, blend argument, checkpoint views, the report and
its verdicts), and the whole run on the CPU (`--smoke`, slow: `python3 -m pytest -m slow
tests/test_eval_domains.py`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))
import eval_domains as ed  # noqa: E402
import verdicts  # noqa: E402


def test_split_c4_holds_out_the_last_documents(tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    train, valid = ed.split_c4(path, 3)
    assert train == [f"doc {i}" for i in range(7)] and valid == ["doc 7", "doc 8", "doc 9"]
    with pytest.raises(SystemExit):
        ed.split_c4(path, 10)


def test_blend_is_one_argument_the_trainer_splits(tmp_path):
    from megatron_prune.train.data import parse_blend
    for name in ("books", "c4"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    arg = ed.blend(tmp_path / "books", tmp_path / "c4", 0.2)
    assert parse_blend([arg]) == ([str(tmp_path / "books"), str(tmp_path / "c4")], [0.8, 0.2])


def test_checkpoint_views_name_each_earlier_iteration(tmp_path):
    from megatron_prune.checkpoint.megatron_dirs import TRACKER, read_tracker
    root = tmp_path / "teacher"
    for it in (10, 20, 30):
        (root / f"iter_{it:07d}").mkdir(parents=True)
    (root / TRACKER).write_text("30")
    views = ed.checkpoint_views(root, tmp_path / "views")
    assert sorted(views) == [10, 20]
    assert int(read_tracker(views[10])) == 10
    assert (views[10] / "iter_0000010").resolve() == (root / "iter_0000010").resolve()


def _fake_results() -> dict:
    """results.json's shape with made-up numbers: the issue's inversion (teacher worse than
    random init on WikiText-2, better on the books)."""
    def row(books, wiki):
        sets = {k: {"ppl": wiki if k.startswith("wikitext") else books, "word_ppl": 2 * books,
                    "bpb": 1.23456, "tokens": 100} for k in ed.SETS}
        sets.update({k: {"ppl": wiki if k.startswith("wikitext") else books, "tokens": 99}
                     for k in ed.BENCH})
        cats = {c: {"tokens": 10, "nll": 20.0, "token_share": 0.2, "loss_share": 0.2}
                for c in ("newline", "<unk>", "other", "total")}
        return {"params": 1000, **sets, "breakdown": cats}
    ev = {"teacher@10": row(90.0, 4000.0), "teacher": row(61.78, 7081.0),
          "teacher_mix@10": row(95.0, 3000.0), "teacher_mix": row(64.0, 900.0),
          "activation_pruned": row(500.0, 3530.0), "activation_kd": row(57.2, 5810.0),
          "scratch": row(66.7, 4394.0)}
    check = {k: {"project_nll": 4.123456, "transformers_nll": 4.123457, "tokens": 99,
                 "relative_difference": 2.4e-7} for k in ed.BENCH}
    teachers = {n: {"iterations": 20, "tokens": 20 * 64, "checkpoints": {"10": "x"}}
                for n in ("teacher", "teacher_mix")}
    meta = {"date": "2026-01-01", "command": "python bench/eval_domains.py", "device": "cpu",
            "torch": "2", "commit": "abc", "stages": {"total": 1.0}}
    return {"meta": meta, "protocol": {"teacher_global_batch": 8, "seq_length": 8,
                                       "teacher_seconds": 20, "eval_tokens": 100},
            "eval": ev, "check": check, "teachers": teachers, "recover_tokens": 100,
            "teacher_mix_data": "0.8 a 0.2 b",
            "tokenizer_agreement": {"tokens": 100, "differing_positions": 1}}


def test_report_verdicts_quote_the_tables():
    res = _fake_results()
    lines = ed.report_lines(res)
    assert verdicts.check_section(lines, "eval_domains") == []
    text = "\n".join(lines)
    assert "| teacher @ iteration 10 | 0.00 M |" in text
    met = {g: ok for g, _, ok in ed.verdicts(res)}
    assert met["WikiText-2 (lines): teacher below random init"] is False
    assert met["held-out books: teacher below random init"] is True
    assert met[next(g for g in met if g.startswith("transformers"))] is True
    assert met[next(g for g in met if g.startswith("WikiText-2 (wikitext) of the books"))]


@pytest.mark.slow
def test_eval_domains_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_domains.py"), "--smoke",
                           "--out", str(tmp_path), "--workers", "2", "--data", str(DATA)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    names = {"teacher", "teacher_mix", "activation_pruned", "activation_kd", "scratch"}
    assert names <= set(res["eval"]) and any("@" in n for n in res["eval"])
    for row in res["eval"].values():
        assert set(ed.SETS) | set(ed.BENCH) <= set(row)
        assert abs(sum(c["nll"] for n, c in row["breakdown"].items() if n != "total")
                   - row["breakdown"]["total"]["nll"]) < 1e-6 * row["breakdown"]["total"]["nll"]
    for check in res["check"].values():  # transformers' own loss agrees, in fp32
        assert abs(check["relative_difference"]) < 1e-4
    # the same windows and tokens as prune_recover.py's own protocol: the same perplexity
    ev = res["eval"]["teacher"]
    assert ev["wikitext_lines"]["tokens"] >= ev["wikitext_bench"]["tokens"]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert verdicts.check_section(md, "results.md") == []
    assert res["tokenizer_agreement"]["differing_positions"] <= 1
