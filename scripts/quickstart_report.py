"""Report of the quickstart: a markdown table and a PNG of the recovery loss curves.

    python scripts/quickstart_report.py OUTDIR

Reads OUTDIR/recover.jsonl and OUTDIR/scratch.jsonl (the trainer's --log-json of the pruned and
the random-init run) and OUTDIR/eval_*.json (megatron-prune eval --save), writes
OUTDIR/report.md and OUTDIR/loss_curves.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {"recover": "pruned + recovered (distillation)", "scratch": "same shape, random init, same tokens"}
EVALS = [("teacher", "stories260K (teacher, unpruned)"), ("pruned", "pruned, before recovery"),
         ("recovered", "pruned + recovered"), ("scratch", "random init, same tokens")]


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(path: Path) -> tuple:
    rows = read_jsonl(path)
    train = [(r["iteration"], r["lm_loss"]) for r in rows if "eval" not in r]
    valid = [(r["iteration"], r["lm_loss"]) for r in rows if r.get("eval") == "validation"]
    return train, valid


def plot(out: Path, data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for (name, (train, valid)), color in zip(data.items(), ("tab:blue", "tab:orange")):
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{RUNS[name]}: train")
        if valid:
            ax.plot(*zip(*valid), color=color, marker="o", lw=2, label=f"{RUNS[name]}: validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title("stories260K pruned to ~half: recovery vs random init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")


def main(out: Path) -> int:
    data = {name: curves(out / f"{name}.jsonl") for name in RUNS}
    plot(out, data)
    lines = ["# Quickstart report", "",
             "Validation perplexity on held-out text sampled from stories260K (`megatron-prune eval`):", "",
             "| model | perplexity | window |", "|---|---|---|"]
    for key, label in EVALS:
        f = out / f"eval_{key}.json"
        if f.is_file():
            r = json.loads(f.read_text())[0]
            lines.append(f"| {label} | {r['value']:.3f} | {r['detail'].split(',')[0]} |")
    lines += ["", "Final validation LM loss of the two recovery runs (same data, same tokens):", "",
              "| run | validation loss | iterations |", "|---|---|---|"]
    final = {}
    for name, (_, valid) in data.items():
        if valid:
            final[name] = valid[-1][1]
            lines.append(f"| {RUNS[name]} | {valid[-1][1]:.4f} | {valid[-1][0]} |")
    if len(final) == 2:
        lines += ["", f"The recovered pruned model ends {final['scratch'] - final['recover']:.3f} nats "
                      "below the random-init model of the same shape."]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines[:-2]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
