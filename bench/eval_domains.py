"""Where the WikiText-2 numbers of bench/prune_recover.py come from (issue 22): every model of
one run scored on four text sets, three metrics each, and the loss split over WikiText's markup.

One call on one GPU (~8 min on an H200), or on the CPU with `--smoke` (minutes):

1. data      prune_recover.py's books (held-out ones scored), plus the C4 sample of ../shared/data:
             its last --c4-valid-docs documents held out, the rest tokenized for training.
2. teachers  two of prune_recover.py's teachers, trained side by side on the GPU for the same
             wall time (probed side by side, so each plans the iterations its share allows):
             `teacher` on the books, `teacher_mix` on a weighted blend of books and C4
             (`--train-data-path 1-W BOOKS W C4`); each saves --checkpoints checkpoints on the
             way, so WikiText can be followed along the training.
3. prune     activation importance of `teacher`, pruned to prune_recover.py's student shape.
4. recover   activation + distillation and random init (`scratch`) on the books, the budget
             --recover-fraction of the teacher's tokens.
5. evaluate  (while the recoveries train, for the models that exist) with the training
             tokenization (SentencePiece) and windows of the sequence length: held-out books
             (document mode), WikiText-2 as `--txt-mode lines` (what prune_recover.py read) and
             `--txt-mode wikitext` (articles, detokenized: lm-eval's wikitext), C4 validation:
             token / word perplexity and bits per byte (`evaluate.score`); the exact numbers of
             prune_recover.py's protocol (`windows_perplexity`); `evaluate.loss_breakdown` on
             WikiText-2; and the teacher's loss recomputed by transformers on its HF export.
             -> results.json, results.md (generated from results.json) in --out.

usage: python bench/eval_domains.py --out results/eval_domains          # GPU, ~8 min
       python bench/eval_domains.py --smoke --out /tmp/eval_domains     # CPU, minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import prune_recover as pr  # noqa: E402
from prune_recover_stages.data import prepare_data, preprocess_job  # noqa: E402
from prune_recover_stages.protocol import Protocol, smoke_protocol  # noqa: E402
from prune_recover_stages.prune import prune_all  # noqa: E402
from prune_recover_stages.recover import recovery_jobs  # noqa: E402
from prune_recover_stages.runner import CLI, Runner, _cuda  # noqa: E402
from prune_recover_stages.teacher import probe_job, teacher_iterations, teacher_job, teacher_summary  # noqa: E402

C4 = Path("corpus") / "c4_sample" / "c4_en_train-00000-of-01024_first1000.jsonl"
SETS = {"books": "held-out books", "wikitext_lines": "WikiText-2 (lines)",
        "wikitext": "WikiText-2 (wikitext)", "c4": "C4 validation",
        # `megatron-prune eval`'s default before it split special-token strings: the model's
        # transformers tokenizer read the text "<unk>" as the unknown-token id 0 (SentencePiece,
        # and so the training data, spells it '▁<' 'unk' '>'; id 0 never occurs in training)
        "wikitext_hf": "WikiText-2 (wikitext, HF tokenizer, '<unk>' as id 0)"}
# prune_recover.py's own protocol (documents joined by blank lines, non-overlapping windows)
BENCH = {"books_bench": "books, prune_recover.py", "wikitext_bench": "WikiText-2, prune_recover.py"}
METRICS = {"ppl": ("token ppl", "{:.2f}"), "word_ppl": ("word ppl", "{:.2f}"),
           "bpb": ("bits/byte", "{:.4f}")}
BATCH = 8


# ---------------------------------------------------------------------------- data
def split_c4(path: Path, valid_docs: int) -> tuple:
    """(training texts, held-out texts): the last `valid_docs` rows held out."""
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    if not 0 < valid_docs < len(rows):
        raise SystemExit(f"--c4-valid-docs {valid_docs}: {path} has {len(rows)} documents")
    return rows[:-valid_docs], rows[-valid_docs:]


def prepare_c4(r: Runner, data: dict, path: Path, valid_docs: int, workers: int) -> dict:
    train, valid = split_c4(path, valid_docs)
    jsonl = r.work / "data" / "c4_train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    r.run("preprocess_c4", preprocess_job(jsonl, r.work / "data" / "c4_train", data["spm"],
                                             workers))
    return {"train": r.work / "data" / "c4_train_text_document", "valid": valid,
            "train_docs": len(train)}


def blend(books: Path, c4: Path, weight: float) -> str:
    """A --train-data-path blend, one argument (the trainer splits it at spaces)."""
    return f"{1 - weight:g} {books} {weight:g} {c4}"


# ---------------------------------------------------------------------------- teachers
def train_teachers(r: Runner, p: Protocol, datas: dict, checkpoints: int) -> dict:
    """prune_recover.py's teacher once per {name: data}, all at once (probes too), each for
    the iterations the slowest probe allows in --teacher-seconds."""
    r.run_many(dict(probe_job(r, p, d, n) for n, d in datas.items()), parallel=len(datas))
    plans = {n: teacher_iterations(r, p, n) for n in datas}
    slowest = max(plans.values(), key=lambda plan: plan[1])  # the same tokens for every teacher
    plans = {n: slowest for n in datas}
    jobs = {n: teacher_job(r, p, d, plans[n][0], n) + [
        "--save-interval", max(1, plans[n][0] // checkpoints), "--no-save-optim"]
        for n, d in datas.items()}
    t0 = time.time()
    r.run_many(jobs, parallel=len(jobs))
    return {n: teacher_summary(r, p, *plans[n], t0, n) for n in datas}


def checkpoint_views(root: Path, views: Path) -> dict:
    """{iteration: folder} of the checkpoints a run saved before its last, each a folder whose
    tracker names it (the loaders read the tracker's iteration)."""
    from megatron_prune.checkpoint.megatron_dirs import TRACKER, iter_dir_name, read_tracker
    last, out = int(read_tracker(root)), {}
    for d in sorted(root.glob("iter_*")):
        it = int(d.name[len("iter_"):])
        if it < last:
            view = views / f"{root.name}_{it}"
            view.mkdir(parents=True, exist_ok=True)
            (view / iter_dir_name(it)).symlink_to(d.resolve())
            (view / TRACKER).write_text(str(it))
            out[it] = view
    return out


# ---------------------------------------------------------------------------- evaluate
class SpecialStringsAsTokens:
    """A transformers tokenizer as `eval` used it before evaluate._text_ids: special-token
    strings in the text ("<unk>") read as those tokens. Kept to measure what that cost."""

    def __init__(self, tok):
        self.tok, self.bos, self.eod = tok, tok.bos_token_id, tok.eos_token_id

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


def text_sets(p: Protocol, data: dict, c4_valid: list, wiki: Path, hf_tok) -> dict:
    """The token windows every model is scored on, tokenized once with SentencePiece (as
    `preprocess` tokenized the training data), but "wikitext_hf" (`SETS`)."""
    from megatron_prune.eval.evaluate import read_documents, rolling_windows, token_windows
    from megatron_prune.data.tokenizers import build_tokenizer
    tok = build_tokenizer("Llama2Tokenizer", data["spm"])
    docs = {"books": data["valid_rows"], "c4": c4_valid,
            "wikitext_lines": read_documents([wiki], txt_mode="lines"),
            "wikitext": read_documents([wiki], txt_mode="wikitext")}
    rows = {"books_bench": data["valid_rows"], "wikitext_bench": data["wikitext"]}
    rolling = {k: rolling_windows(tok, d, p.seq_length, p.eval_tokens) for k, d in docs.items()}
    rolling["wikitext_hf"] = rolling_windows(SpecialStringsAsTokens(hf_tok), docs["wikitext"],
                                             p.seq_length, p.eval_tokens)
    return {"rolling": rolling,
            "bench": {k: token_windows(tok, d, p.seq_length, p.eval_tokens)
                      for k, d in rows.items()},
            "wiki_text": wiki.read_text(encoding="utf-8"), "sp": tok}


def score_models(r: Runner, p: Protocol, sets: dict, hf_tok, models: dict) -> dict:
    """Every set and metric, and the WikiText-2 loss breakdown, of each checkpoint."""
    import torch

    from megatron_prune.eval.evaluate import loss_breakdown, score, windows_perplexity
    from megatron_prune.checkpoint.hf_model import load_hf_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, path in models.items():
        model = load_hf_model(path, device=device, dtype=torch.float32)
        row = {"params": sum(x.numel() for x in model.parameters())}
        for k, text in sets["rolling"].items():
            res = score(model, text, BATCH)
            row[k] = {"ppl": res.value, "word_ppl": res.extra["word_perplexity"],
                      "bpb": res.extra["bits_per_byte"], "tokens": res.count,
                      "words": text.words, "bytes": text.bytes, "documents": text.documents}
        for k, windows in sets["bench"].items():
            res = windows_perplexity(model, windows, BATCH)
            row[k] = {"ppl": res.value, "tokens": res.count}
        row["breakdown"] = loss_breakdown(model, hf_tok, sets["wiki_text"], p.seq_length, BATCH,
                                          p.eval_tokens)
        out[name] = row
        r.say(f"  {name:>16}: " + " | ".join(f"{k} {row[k]['ppl']:.2f}" for k in [*SETS, *BENCH]))
        del model
    return out


def transformers_check(r: Runner, sets: dict, teacher: Path) -> dict:
    """The teacher's mean NLL on prune_recover.py's windows, by the project (`windows_perplexity`
    of `load_hf_model`) and by transformers alone (LlamaForCausalLM.from_pretrained of the
    `megatron-to-hf` export, its own `labels=` loss)."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron_prune.eval.evaluate import windows_perplexity
    from megatron_prune.checkpoint.hf_model import load_hf_model
    hf_dir = r.work / "teacher_hf"
    r.run("export_teacher", CLI + ["megatron-to-hf", "--load", teacher, "--save", hf_dir,
                                      "--dtype", "fp32", "--force"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    ours = load_hf_model(teacher, device=device, dtype=torch.float32)
    out = {}
    for k, windows in sets["bench"].items():
        project = math.log(windows_perplexity(ours, windows, BATCH).value)
        nll = 0.0
        with torch.no_grad():
            for batch in windows.split(BATCH):
                x = batch.to(device)  # labels = inputs: transformers shifts them itself
                nll += hf(input_ids=x, labels=x).loss.double().item() * x[:, 1:].numel()
        theirs = nll / windows[:, 1:].numel()
        out[k] = {"project_nll": project, "transformers_nll": theirs,
                  "relative_difference": theirs / project - 1, "tokens": windows[:, 1:].numel()}
        r.say(f"  check {k}: project {project:.6f}, transformers {theirs:.6f} (mean NLL)")
    return out


def tokenizer_agreement(hf_tok, sp, text: str, max_tokens: int) -> dict:
    """How many of the breakdown's tokens (transformers' tokenizer, for the offsets) differ
    from SentencePiece's, which the training data and the perplexities use."""
    a = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"][:max_tokens]
    b = sp.encode(text)[:max_tokens]
    return {"tokens": len(a), "sentencepiece_tokens": len(b),
            "differing_positions": sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))}


# ---------------------------------------------------------------------------- report
def model_rows(res: dict) -> list:
    """(key, label, training tokens or None) of every scored model, in table order."""
    t, rows = res["teachers"], []
    for name in t:
        per_iter = res["protocol"]["teacher_global_batch"] * res["protocol"]["seq_length"]
        rows += [(f"{name}@{it}", f"{name} @ iteration {it}", int(it) * per_iter)
                 for it in sorted(t[name]["checkpoints"], key=int)]
        rows.append((name, f"{name} (final, {t[name]['iterations']} iterations)",
                     t[name]["tokens"]))
    rec = res["recover_tokens"]
    rows += [("activation_pruned", "activation: pruned, no training", None),
             ("activation_kd", "activation + distillation", rec),
             ("scratch", "random init, pruned shape", rec)]
    return [row for row in rows if row[0] in res["eval"]]


def cell(res: dict, model: str, key: str, metric: str = "ppl") -> str:
    """A table's string of one number: the one source of what the tables and verdicts show."""
    return METRICS[metric][1].format(res["eval"][model][key][metric])


def verdicts(res: dict) -> list:
    """(goal, measured, met) rows quoting the tables (bench/verdicts.py's rule)."""
    ev, rows = res["eval"], []
    check = res["check"]["wikitext_bench"]
    rows.append(("transformers' own loss = the project's (teacher, WikiText-2 windows of "
                 "prune_recover.py; relative difference within 1e-4)",
                 f"{check['project_nll']:.6f} vs {check['transformers_nll']:.6f}",
                 abs(check["relative_difference"]) <= 1e-4))
    if "scratch" in ev:
        for key in [*SETS, *BENCH]:
            a, b = cell(res, "teacher", key), cell(res, "scratch", key)
            rows.append((f"{SETS.get(key) or BENCH[key]}: teacher below random init",
                         f"{a} vs {b}: {float(a) / float(b):.2f}×",
                         ev["teacher"][key]["ppl"] < ev["scratch"][key]["ppl"]))
    for key in ("wikitext", "c4"):
        a, b = cell(res, "teacher_mix", key), cell(res, "teacher", key)
        rows.append((f"{SETS[key]}: the books + C4 teacher below the books teacher",
                     f"{a} vs {b}: {100 * (float(a) / float(b) - 1):+.1f}%",
                     ev["teacher_mix"][key]["ppl"] < ev["teacher"][key]["ppl"]))
    first = next((k for k, _, _ in model_rows(res) if k.startswith("teacher@")), None)
    if first:
        a, b = cell(res, "teacher", "wikitext"), cell(res, first, "wikitext")
        rows.append((f"WikiText-2 (wikitext) of the books teacher rises as it trains ({first} "
                     "-> final)", f"{a} vs {b}: {100 * (float(a) / float(b) - 1):+.1f}%",
                     ev["teacher"]["wikitext"]["ppl"] > ev[first]["wikitext"]["ppl"]))
    return rows


def report_lines(res: dict) -> list:
    m, rows = res["meta"], model_rows(res)
    cols = [(k, mt) for k in SETS for mt in METRICS] + [(k, "ppl") for k in BENCH]
    lines = [f"# Where the WikiText-2 numbers come from ({m['date']})", "",
             f"`{m['command']}` — {m['device']}, torch {m['torch']}, commit {m['commit']}", "",
             f"Teachers trained side by side for {res['protocol']['teacher_seconds']:g} s; "
             f"teacher_mix on `{res['teacher_mix_data']}`. Windows of "
             f"{res['protocol']['seq_length']} tokens, SentencePiece (the training "
             "tokenization) but for the HF-tokenizer column; at most "
             f"{res['protocol']['eval_tokens']} tokens per set.", "",
             "| model | training tokens | " + " | ".join(
                 f"{SETS.get(k) or BENCH[k]} {METRICS[mt][0]}" for k, mt in cols) + " |",
             "|" + "---|" * (2 + len(cols))]
    for key, label, tokens in rows:
        lines.append(f"| {label} | {f'{tokens / 1e6:.2f} M' if tokens else ''} | "
                     + " | ".join(cell(res, key, k, mt) for k, mt in cols) + " |")
    cats = list(res["eval"]["teacher"]["breakdown"])
    lines += ["", "WikiText-2 loss breakdown (`evaluate.loss_breakdown`, the tokenized file as "
              "one document, SentencePiece's tokens): mean NLL per token (share of the loss)", "",
              "| model | " + " | ".join(
                  f"{c} ({100 * res['eval']['teacher']['breakdown'][c]['token_share']:.1f}% "
                  "of tokens)" for c in cats) + " |", "|" + "---|" * (1 + len(cats))]
    for key, label, _ in rows:
        b = res["eval"][key]["breakdown"]
        lines.append(f"| {label} | " + " | ".join(
            f"{b[c]['nll'] / max(1, b[c]['tokens']):.3f} ({100 * b[c]['loss_share']:.1f}%)"
            for c in cats) + " |")
    agree = res["tokenizer_agreement"]
    lines += ["", f"Breakdown tokens: {agree['differing_positions']} of {agree['tokens']} "
              "differ from SentencePiece's.", "",
              "| check: teacher on prune_recover.py's windows | tokens | project mean NLL | "
              "transformers mean NLL | relative difference |", "|---|---|---|---|---|"]
    for k, c in res["check"].items():
        lines.append(f"| {BENCH[k]} | {c['tokens']} | {c['project_nll']:.6f} | "
                     f"{c['transformers_nll']:.6f} | {c['relative_difference']:.1e} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {ms} | {'yes' if ok else '**no**'} |" for g, ms, ok in verdicts(res)]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}"
                                                 for k, v in m["stages"].items()), ""]
    return lines


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="results.md/.json, run.log, work/ go here")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-sized: minutes")
    ap.add_argument("--teacher-seconds", type=float, default=None,
                    help="wall time of the two teachers, trained at once (default 110; smoke 20)")
    ap.add_argument("--recover-fraction", type=pr._fraction, default="1/6")
    ap.add_argument("--c4-weight", type=float, default=0.2,
                    help="C4's share of teacher_mix's training tokens")
    ap.add_argument("--c4-valid-docs", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, default=None,
                    help="checkpoints each teacher saves on the way, the last one the final "
                         "(default 4; smoke 2)")
    ap.add_argument("--jobs", type=int, default=2, help="recovery runs at once")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="tokens scored of each set (default: the protocol's, 1 M; smoke 2048)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before the imports that bring tqdm in
    a = parse_args(argv)
    p = smoke_protocol() if a.smoke else Protocol()
    p.teacher_seconds = a.teacher_seconds or (p.teacher_seconds if a.smoke else 110.0)
    p.recover_fraction = a.recover_fraction
    if a.smoke:  # ~10 forward passes of each set per model: keep the CPU's share small
        p.eval_tokens = 2048
    if a.eval_tokens:
        p.eval_tokens = a.eval_tokens
    cuda = _cuda()
    p.bf16 = p.bf16 and cuda
    out, t_start = Path(a.out), time.time()
    work = out / "work"
    if work.exists():
        import shutil
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    (work / "recovered").mkdir()
    r = Runner(work, out / "run.log", gpus=1 if cuda else 0)
    (out / "run.log").write_text("")
    from megatron_prune.data.calibration import load_tokenizer
    with r.stage("data"):
        data = prepare_data(r, p, a.data, a.workers)
        c4 = prepare_c4(r, data, a.data / C4, a.c4_valid_docs, a.workers)
        hf_tok = load_tokenizer(data["tokenizer"])
        sets = text_sets(p, data, c4["valid"], a.data / "wikitext-2" / "valid.txt", hf_tok)
    mix = dict(data, train=blend(data["train"], c4["train"], a.c4_weight))
    with r.stage("teachers"):
        teachers = train_teachers(r, p, {"teacher": data, "teacher_mix": mix},
                                  a.checkpoints or (2 if a.smoke else 4))
    for name, t in teachers.items():
        t["checkpoints"] = checkpoint_views(work / name, work / "views")
        r.say(f"  {name}: {t['iterations']} iterations, {t['tokens'] / 1e6:.1f} M tokens, "
              f"checkpoints at {sorted(t['checkpoints'])}")
    p.recover_iters = pr.recovery_iterations(p, teachers["teacher"]["tokens"])
    with r.stage("prune"):
        pruned = prune_all(r, p, data, ["activation"])
    jobs, _ = recovery_jobs(r, p, data, pruned, ["activation"], skip=("activation_lm",))
    models = {n: work / n for n in teachers}
    models.update({f"{n}@{it}": view for n, t in teachers.items()
                   for it, view in t["checkpoints"].items()})
    models["activation_pruned"] = pruned["activation"]
    ev, check, failed = {}, {}, []

    def early():  # on the GPU beside the recoveries
        try:
            ev.update(score_models(r, p, sets, hf_tok, models))
            check.update(transformers_check(r, sets, work / "teacher"))
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            failed.append(e)
    scorer = threading.Thread(target=early)
    with r.stage("recover"):
        scorer.start()
        r.run_many(jobs, parallel=a.jobs)
    with r.stage("evaluate"):
        scorer.join()
        if failed:
            raise failed[0]
        ev.update(score_models(r, p, sets, hf_tok, {n: work / "recovered" / n for n in jobs}))
    r.stage_seconds["total"] = time.time() - t_start
    meta = pr._meta(a, data, r.stage_seconds)
    meta["command"] = "python bench/eval_domains.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv)
    import dataclasses
    res = {"meta": meta, "protocol": dataclasses.asdict(p), "eval": ev, "check": check,
           "teachers": {n: {k: v for k, v in t.items() if k != "log"} for n, t in teachers.items()},
           "teacher_mix_data": f"--train-data-path {mix['train']}",
           "c4_train_docs": c4["train_docs"], "c4_valid_docs": a.c4_valid_docs,
           "recover_tokens": p.recover_iters * p.recover_global_batch * p.seq_length,
           "tokenizer_agreement": tokenizer_agreement(hf_tok, sets["sp"], sets["wiki_text"],
                                                      p.eval_tokens)}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    res = json.loads((out / "results.json").read_text())  # the report shows what was written
    (out / "results.md").write_text("\n".join(report_lines(res)))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
