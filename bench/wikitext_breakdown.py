"""Where a model's WikiText-2 loss goes: the share of the total NLL on the tokenized release's
markup, and the perplexities of the tokenized and the detokenized text side by side.

The tokenized WikiText-2 (`../shared/data/wikitext-2/valid.txt`) is scored as one document by
`megatron-prune eval`'s rolling protocol (every token predicted once); each token is put in the
first `megatron_prune.eval.wikitext.MARKUP` category whose characters it overlaps: newlines,
` @-@ ` / ` @,@ ` / ` @.@ `, `<unk>`, a space before punctuation, or other. Then the same text is
scored as `--txt-mode lines` (the older reading: lines joined by blank lines) and as
`--txt-mode wikitext` (articles, detokenized, as lm-eval's wikitext task), with token and word
perplexity and bits per byte.

    python bench/wikitext_breakdown.py --model HF_DIR_OR_MEGATRON_CKPT [--window 512]
        [--max-tokens N] [--save out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def breakdown_lines(parts: dict) -> list:
    """A markdown table of `evaluate.loss_breakdown`'s result."""
    lines = ["| tokens of | tokens | share of tokens | share of the loss | mean NLL |",
             "|---|---|---|---|---|"]
    for name, p in parts.items():
        mean = p["nll"] / p["tokens"] if p["tokens"] else float("nan")
        lines.append(f"| {name} | {p['tokens']} | {100 * p['token_share']:.1f}% | "
                     f"{100 * p['loss_share']:.1f}% | {mean:.2f} |")
    return lines


def run(model_path: str, data: Path, window: int, max_tokens=None, batch_size: int = 8) -> dict:
    from megatron_prune.eval import evaluate
    from megatron_prune.data.calibration import load_tokenizer
    from megatron_prune.checkpoint.hf import model_tokenizer_dir
    from megatron_prune.checkpoint.hf_model import load_hf_model
    model = load_hf_model(model_path)
    tok = load_tokenizer(model_tokenizer_dir(model_path))
    parts = evaluate.loss_breakdown(model, tok, data.read_text(encoding="utf-8"), window,
                                    batch_size, max_tokens)
    ppl = {mode: evaluate.perplexity(model, tok, evaluate.read_documents([data], txt_mode=mode),
                                     window, batch_size, max_tokens, f"txt mode {mode}").to_dict()
           for mode in ("lines", "wikitext")}
    return {"model": str(model_path), "data": str(data), "window": window,
            "max_tokens": max_tokens, "breakdown": parts, "perplexity": ppl}


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF directory or Megatron checkpoint")
    ap.add_argument("--data", type=Path,
                    default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, help="score the first N tokens only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--save", help="write the results as JSON here")
    a = ap.parse_args(argv)
    res = run(a.model, a.data, a.window, a.max_tokens, a.batch_size)
    print("\n".join(breakdown_lines(res["breakdown"])))
    for mode, r in res["perplexity"].items():
        print(f"{mode:>8}: token ppl {r['value']:.3f}, word ppl "
              f"{r['extra']['word_perplexity']:.3f}, bits per byte "
              f"{r['extra']['bits_per_byte']:.4f} ({r['detail']})")
    if a.save:
        Path(a.save).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
