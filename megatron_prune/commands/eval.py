"""eval: perplexity, LAMBADA and MMLU on HF or Megatron checkpoints."""
from __future__ import annotations

import argparse
import textwrap

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.data.tokenizers import add_tokenizer_args
from megatron_prune.eval.text import TXT_MODES


def _run(a) -> int:
    import torch

    from megatron_prune.checkpoint.hf import model_tokenizer_dir
    from megatron_prune.checkpoint.hf_model import load_hf_model
    from megatron_prune.data.calibration import load_tokenizer
    from megatron_prune.data.tokenizers import tokenizer_from_args
    from megatron_prune.eval import evaluate
    if bool(a.tokenizer_type) != bool(a.tokenizer_model):
        raise ConfigError("--tokenizer-type and --tokenizer-model go together")
    if a.tokenizer_type and a.task != "ppl":
        raise ConfigError("--tokenizer-type/--tokenizer-model tokenize --task ppl only; "
                          "lambada and mmlu read a transformers tokenizer (--tokenizer)")
    path = a.hf_dir or a.load
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.task == "lm-eval":
        if not a.hf_dir:
            raise ConfigError("--task lm-eval runs on a Hugging Face export: pass --hf-dir "
                              "(megatron-prune megatron-to-hf makes one)")
        results = evaluate.lm_eval_harness(a.hf_dir, a.lm_eval_tasks.split(","), device)
    else:
        model = load_hf_model(path, device=device, dtype=getattr(torch, a.dtype))
        if a.tokenizer_type:  # tokens exactly as `preprocess` gave the training data
            tok = tokenizer_from_args(a)
        else:
            tok = load_tokenizer(a.tokenizer or model_tokenizer_dir(path))
        if not a.data:
            raise ConfigError(f"--task {a.task} needs --data")
        if a.task == "ppl":
            docs = evaluate.read_documents(a.data, a.json_key, a.txt_mode)
            protocol = evaluate.data_protocol(a.data, a.txt_mode)
            longest = min(2048, model.config.max_position_embeddings)
            windows = a.window or sorted({longest, 128}, reverse=True)
            results = [evaluate.perplexity(model, tok, docs, w, a.batch_size, a.max_tokens,
                                           protocol) for w in windows]
        elif a.task == "lambada":
            results = [evaluate.lambada(model, tok, a.data, a.limit)]
        else:
            results = [evaluate.mmlu(model, tok, a.data[0], a.shots, a.limit)]
    for r in results:
        print(r.line())
    if a.save:
        evaluate.save_results(results, a.save)
    return 0


def _paragraphs(*texts: str) -> str:
    """--help text in paragraphs (the raw formatter keeps the examples' line breaks)."""
    return "\n\n".join(textwrap.fill(t, 79) for t in texts)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity / LAMBADA / MMLU of an HF or Megatron checkpoint",
        description=_paragraphs(
            "Evaluate a model.",
            "ppl: token perplexity, word perplexity and bits per byte. Each document is "
            "tokenized on its own after a BOS and every one of its tokens is predicted "
            "exactly once, in windows of W tokens whose first input is the previous "
            "window's last token (lm-eval's rolling log-likelihood); the total NLL is "
            "divided by the predicted tokens (token perplexity), by the documents' "
            "whitespace-separated words (word perplexity: exp) and by ln 2 x their UTF-8 "
            "bytes (bits per byte). Word perplexity and bits per byte compare models "
            "whose tokenizers differ. Windows: by default both the model's max up to "
            "2048 and 128. A document is a .jsonl row, or what --txt-mode makes of a "
            ".txt; every result line names the window and the mode.",
            "lambada: last-word accuracy from a local jsonl. mmlu: multiple choice from "
            "the local dev set (a datasets.save_to_disk folder). lm-eval: "
            "lm-evaluation-harness tasks on an HF export (needs `pip install lm-eval` "
            "and its datasets)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  megatron-prune eval --load ckpt/tp2pp2 --task ppl "
               "--data ../shared/data/wikitext-2/valid.txt\n"
               "  # tokens exactly as `preprocess` gave the training data (a transformers "
               "Llama tokenizer\n"
               "  # built from a bare tokenizer.model splits runs of spaces differently):\n"
               "  megatron-prune eval --load ckpt --task ppl --data held_out.jsonl "
               "--tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    src.add_argument("--load", help="Megatron checkpoint (any TP/PP, merged on load)")
    p.add_argument("--task", choices=("ppl", "lambada", "mmlu", "lm-eval"), default="ppl")
    p.add_argument("--data", nargs="+", help="ppl: .txt (see --txt-mode) or .jsonl (one "
                   "document per row); lambada: jsonl; mmlu: the dev set folder")
    p.add_argument("--txt-mode", choices=tuple(TXT_MODES), default="document",
                   help="ppl: what a .txt file of --data is. " + "; ".join(
                       f"{k}: {v}" for k, v in TXT_MODES.items()) + " (default: document)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    add_tokenizer_args(p, required=False)
    p.add_argument("--window", type=int, nargs="+", help="ppl window(s) in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, help="ppl: score only the first N tokens (words and "
                   "bytes counted on what was scored)")
    p.add_argument("--limit", type=int, help="lambada/mmlu: first N examples only")
    p.add_argument("--shots", type=int, default=5, help="mmlu shots (at most 4 from the dev set)")
    p.add_argument("--lm-eval-tasks", default="hellaswag,arc_easy,lambada_openai")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--save", help="write the results as JSON here")
    p.set_defaults(func=_run)
