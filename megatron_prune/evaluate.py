"""Evaluation: perplexity (standard protocol), LAMBADA last-word accuracy, MMLU few-shot.

Models are Hugging Face LlamaForCausalLM built from any checkpoint of the project (an HF
directory, or a Megatron checkpoint at any TP/PP merged from its shards), on CUDA when available.

Perplexity protocol (as the Hugging Face perplexity guide and most papers): the documents are
joined with "\\n\\n", tokenized once, and cut into non-overlapping windows of `window` tokens;
every token of a window except its first is predicted from the tokens before it in the same
window; ppl = exp(total NLL / predicted tokens). The window is part of the result: longer windows
give lower perplexity, so always compare at the same window.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .calibration import iter_documents
from .config import ConfigError


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    count: int       # tokens predicted, or examples
    detail: str = ""

    def line(self) -> str:
        return f"{self.task}: {self.metric} = {self.value:.4f} over {self.count} ({self.detail})"

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model):
    return next(model.parameters()).device


def read_rows(files, json_key: str = "text") -> list:
    """Rows to join: lines of a text file (as in WikiText's raw rows), documents of a jsonl."""
    rows = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"--data {f}: no such file")
        if p.suffix in (".jsonl", ".json"):
            rows.extend(iter_documents([p], json_key))
        else:
            rows.extend(p.read_text(encoding="utf-8").splitlines())
    if not rows:
        raise ConfigError("no evaluation text in --data")
    return rows


def _encode(tokenizer, text: str):
    """(ids, BOS id or None) of a transformers tokenizer, or of one of the project's
    (`megatron_prune.tokenizers.Tokenizer`, Megatron-LM's tokenizer types: exactly the tokens
    `preprocess` gave the training data)."""
    if hasattr(tokenizer, "bos_token_id"):
        return tokenizer.encode(text, add_special_tokens=False), tokenizer.bos_token_id
    return tokenizer.encode(text), tokenizer.bos


def token_windows(tokenizer, rows: list, window: int,
                  max_tokens: Optional[int] = None) -> torch.Tensor:
    """[n, window] token ids of the rows joined by blank lines (BOS first), cut into
    non-overlapping windows: what `perplexity` scores; computed once, scored for many models.
    `tokenizer`: a transformers tokenizer or a `megatron_prune.tokenizers.Tokenizer`."""
    ids, bos = _encode(tokenizer, "\n\n".join(rows))
    if bos is not None:
        ids = [bos] + ids
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise ConfigError(f"the text gives {len(ids)} tokens, less than one window of {window}")
    return torch.tensor(ids[: n * window]).reshape(n, window)


def windows_perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> EvalResult:
    """Perplexity of the next-token predictions inside each window (fp64 log-softmax)."""
    n, window = windows.shape
    nll, count = 0.0, 0
    device = _device(model)
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"perplexity (window {window})",
                          unit="batch"):
            x = windows[start:start + batch_size].to(device)
            logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)
            nll -= logp[:, :-1].gather(-1, x[:, 1:, None]).sum().item()
            count += x[:, 1:].numel()
    return EvalResult("ppl", "perplexity", math.exp(nll / count), count,
                      f"window {window}, {n} non-overlapping windows, documents joined by \\n\\n")


def perplexity(model, tokenizer, rows: list, window: int, batch_size: int = 8,
               max_tokens: Optional[int] = None) -> EvalResult:
    return windows_perplexity(model, token_windows(tokenizer, rows, window, max_tokens),
                              batch_size)


def lambada(model, tokenizer, files, limit: Optional[int] = None) -> EvalResult:
    """Last-word accuracy: the target word (with its leading space) must come out of greedy
    decoding, every one of its tokens the argmax given the context (lm-evaluation-harness)."""
    docs = list(iter_documents(files))[:limit]
    correct, device = 0, _device(model)
    max_len = model.config.max_position_embeddings
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    with torch.no_grad():
        for text in tqdm(docs, desc="lambada", unit="doc"):
            context, word = text.rsplit(" ", 1)
            ctx = bos + tokenizer.encode(context, add_special_tokens=False)
            full = bos + tokenizer.encode(context + " " + word, add_special_tokens=False)
            target = full[len(ctx):] if full[:len(ctx)] == ctx else \
                tokenizer.encode(" " + word, add_special_tokens=False)
            ctx = ctx[-(max_len - len(target)):]  # keep the end of a context that is too long
            x = torch.tensor([ctx + target], device=device)
            logits = model(input_ids=x).logits[0, len(ctx) - 1:-1]
            correct += int(torch.equal(logits.argmax(-1).cpu(), torch.tensor(target)))
    return EvalResult("lambada", "accuracy", correct / len(docs), len(docs), "last word, greedy")


def read_mmlu(path) -> list:
    import pyarrow as pa
    files = sorted(Path(path).glob("*.arrow")) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise ConfigError(f"{path}: no .arrow file (a datasets.save_to_disk folder)")
    rows = []
    for f in files:
        with pa.ipc.open_stream(f) as r:
            rows += r.read_all().to_pylist()
    return rows


def _mmlu_prompt(q: dict, with_answer: bool) -> str:
    text = q["question"].strip() + "\n" + "".join(
        f"{letter}. {choice}\n" for letter, choice in zip("ABCD", q["choices"])) + "Answer:"
    return text + (f" {'ABCD'[q['answer']]}\n\n" if with_answer else "")


def mmlu(model, tokenizer, path, shots: int = 5, limit: Optional[int] = None) -> EvalResult:
    """MMLU multiple choice from the local dev set: each question is asked after `shots` other
    dev questions of its subject (leave-one-out: the dev set has 5 per subject, so at most 4
    shots), and scored by the logits of " A".." D" after "Answer:"."""
    rows = read_mmlu(path)
    by_subject = {}
    for q in rows:
        by_subject.setdefault(q["subject"], []).append(q)
    letters = [tokenizer.encode(f" {c}", add_special_tokens=False)[-1] for c in "ABCD"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    correct, n, used_shots, device = 0, 0, shots, _device(model)
    max_len = model.config.max_position_embeddings
    with torch.no_grad():
        for q in tqdm(rows[:limit], desc="mmlu", unit="question"):
            others = [o for o in by_subject[q["subject"]] if o is not q][:shots]
            head = f"The following are multiple choice questions (with answers) about " \
                   f"{q['subject'].replace('_', ' ')}.\n\n"
            while True:  # drop shots until the prompt fits the model's context
                prompt = head + "".join(_mmlu_prompt(o, True) for o in others) + _mmlu_prompt(q, False)
                ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
                if len(ids) <= max_len or not others:
                    break
                others = others[:-1]
            used_shots = min(used_shots, len(others))
            x = torch.tensor([ids[-max_len:]], device=device)
            logits = model(input_ids=x).logits[0, -1, letters]
            correct += int(int(logits.argmax()) == q["answer"])
            n += 1
    return EvalResult("mmlu", "accuracy", correct / n, n,
                      f"dev set, up to {used_shots}-shot leave-one-out (chance 0.25)")


def lm_eval_harness(hf_dir, tasks: list, device: str) -> list:
    """Run lm-evaluation-harness on an HF export (needs `pip install lm-eval` and its datasets)."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("the lm-evaluation-harness route needs `pip install lm-eval` "
                          "(and network access to its datasets)") from None
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir}", tasks=tasks,
                                  device=device)
    return [EvalResult(task, metric, float(v), 0, "lm-evaluation-harness")
            for task, res in out["results"].items() for metric, v in res.items()
            if isinstance(v, (int, float))]


def save_results(results: list, path) -> None:
    Path(path).write_text(json.dumps([r.to_dict() for r in results], indent=1))
