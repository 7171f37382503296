"""Evaluation: perplexity (token and word perplexity, bits per byte), LAMBADA last-word accuracy,
MMLU few-shot.

Models are Hugging Face LlamaForCausalLM built from any checkpoint of the project (an HF
directory, or a Megatron checkpoint at any TP/PP merged from its shards), on CUDA when available.

Perplexity protocol (`perplexity`, lm-evaluation-harness's rolling log-likelihood): each document
is tokenized on its own, a BOS put before it, and every one of its tokens is predicted exactly
once. Window k feeds the model tokens [kW, (k+1)W) of BOS + document and scores the next token
at each position, so a window's first input is the last token of the window before (or BOS),
and no token goes unscored; the document's last window is shorter. Hence the total NLL covers
the whole text, and it is divided by what that text holds:

    token perplexity = exp(NLL / predicted tokens)
    word perplexity  = exp(NLL / whitespace-separated words of the documents)
    bits per byte    = NLL / (ln 2 * UTF-8 bytes of the documents)

The last two do not depend on the tokenizer's granularity, so they compare models whose
vocabularies differ (a pruned vocabulary). The window is part of the result: longer windows give
more context and lower perplexity, so compare at the same window. The documents come from
`read_documents`, whose `txt_mode` says what a document of a .txt file is; every result's detail
names the mode and the window.

`token_windows` / `windows_perplexity` are the older protocol that `bench/prune_recover.py`'s
published tables used (documents joined by "\\n\\n", non-overlapping windows, a window's first
token not predicted); kept for that benchmark, token perplexity only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.data.calibration import iter_documents
from megatron_prune.eval.text import (TXT_MODES, data_protocol,  # noqa: F401 (the API)
                                      read_documents)
from megatron_prune.eval.wikitext import markup_spans


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    count: int       # tokens predicted, or examples
    detail: str = ""
    extra: Dict[str, float] = field(default_factory=dict)  # more metrics of the same scoring

    def line(self) -> str:
        more = "".join(f", {k} = {v:.4f}" if isinstance(v, float) else f", {k} = {v}"
                       for k, v in self.extra.items())
        return f"{self.task}: {self.metric} = {self.value:.4f} over {self.count}{more} " \
               f"({self.detail})"

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model):
    return next(model.parameters()).device


def _text_ids(tokenizer, text: str) -> List[int]:
    """The ids of `text` read as text. A transformers tokenizer otherwise reads the strings of
    its special tokens as those tokens: WikiText's literal "<unk>" (11,718 times in WikiText-2
    validation) became the unknown-token id 0, which SentencePiece, and so `preprocess`, never gives (it spells the
    text '▁<' 'unk' '>'); split, the ids equal SentencePiece's."""
    if hasattr(tokenizer, "bos_token_id"):
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return tokenizer.encode(text)


def _bos_eod(tokenizer):
    """(BOS id, end-of-document id), either may be None, of a transformers tokenizer or of one
    of the project's (`megatron_prune.data.tokenizers.Tokenizer`)."""
    if hasattr(tokenizer, "bos_token_id"):
        return tokenizer.bos_token_id, tokenizer.eos_token_id
    return tokenizer.bos, tokenizer.eod


def _encode(tokenizer, text: str):
    """(ids, BOS id or None) of a transformers tokenizer, or of one of the project's
    (Megatron-LM's tokenizer types: exactly the tokens `preprocess` gave the training data)."""
    return _text_ids(tokenizer, text), _bos_eod(tokenizer)[0]


def _context_token(tokenizer) -> int:
    """The token every document is predicted after: BOS, else end-of-document."""
    bos, eod = _bos_eod(tokenizer)
    if bos is None and eod is None:
        raise ConfigError("the tokenizer has neither a BOS nor an end-of-document token to "
                          "predict a document's first token from")
    return bos if bos is not None else eod


def _rolling(ctx: int, ids: List[int], window: int):
    """(inputs, targets) windows that predict each of `ids` once, after `ctx` (module
    docstring); the last window right-padded with 0 / -1."""
    stream, inputs, targets = [ctx] + ids, [], []
    for k in range(0, len(ids), window):
        tgt = stream[k + 1:k + 1 + window]
        pad = window - len(tgt)
        inputs.append(stream[k:k + len(tgt)] + [0] * pad)
        targets.append(tgt + [-1] * pad)
    return inputs, targets


@dataclass
class ScoredText:
    """Rolling windows of a set of documents, with the size of the text their targets cover."""
    inputs: torch.Tensor    # [n, window] token ids fed to the model (0 after a short window)
    targets: torch.Tensor   # [n, window] the id predicted at each position, -1: none (padding)
    documents: int
    words: int              # whitespace-separated words of the scored text
    bytes: int              # its UTF-8 bytes

    @property
    def window(self) -> int:
        return self.inputs.shape[1]


def rolling_windows(tokenizer, documents: List[str], window: int,
                    max_tokens: Optional[int] = None) -> ScoredText:
    """Every token of every document once a target (module docstring), in windows of `window`.
    `max_tokens`: stop after that many targets; the document cut there counts the words and
    bytes of its decoded scored tokens only."""
    ctx = _context_token(tokenizer)
    inputs, targets, words, nbytes, ndocs, left = [], [], 0, 0, 0, max_tokens
    for doc in documents:
        ids = _encode(tokenizer, doc)[0]
        if left is not None and len(ids) > left:
            ids, doc = ids[:left], tokenizer.decode(ids[:left])
        if not ids:
            continue
        x, y = _rolling(ctx, ids, window)
        inputs += x
        targets += y
        ndocs, words, nbytes = ndocs + 1, words + len(doc.split()), nbytes + len(doc.encode())
        if left is not None:
            left -= len(ids)
            if left == 0:
                break
    if not inputs:
        raise ConfigError("the evaluation text gives no tokens")
    return ScoredText(torch.tensor(inputs), torch.tensor(targets), ndocs, words, nbytes)


NLL_CHUNK_ELEMENTS = 1 << 25  # fp64 logits a time: 256 MiB, whatever the vocab


def logits_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log_softmax(logits)[target] in fp64 for logits [..., vocab] and targets [...] (>= 0),
    as logsumexp - logit, a block of positions at a time: a whole batch's fp64 logits would be
    16 GiB at Llama-3's vocab (8 x 2048 x 128256)."""
    flat, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
    out = torch.empty(y.shape[0], dtype=torch.float64, device=logits.device)
    rows = max(1, NLL_CHUNK_ELEMENTS // flat.shape[1])
    for i in range(0, flat.shape[0], rows):
        block = flat[i:i + rows].double()
        out[i:i + rows] = torch.logsumexp(block, -1) - block.gather(-1, y[i:i + rows])[:, 0]
    return out.view(targets.shape)


def token_nll(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 8,
              desc: str = "perplexity") -> torch.Tensor:
    """[n, window] NLL (fp64) of each target given the inputs up to its position; 0 where the
    target is -1. Right padding is harmless: the model is causal."""
    out = torch.zeros(targets.shape, dtype=torch.float64)
    device = _device(model)
    with torch.no_grad():
        for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch"):
            x = inputs[start:start + batch_size].to(device)
            y = targets[start:start + batch_size].to(device)
            nll = logits_nll(model(input_ids=x).logits, y.clamp(min=0))
            out[start:start + batch_size] = torch.where(y >= 0, nll, 0.0).cpu()
    return out


def score(model, text: ScoredText, batch_size: int = 8, protocol: str = "") -> EvalResult:
    """Token perplexity, word perplexity and bits per byte of `text` (module docstring)."""
    nll = token_nll(model, text.inputs, text.targets, batch_size,
                    f"perplexity (window {text.window})").sum().item()
    count = int((text.targets >= 0).sum())
    extra = {"word_perplexity": math.exp(nll / text.words) if text.words else float("nan"),
             "bits_per_byte": nll / (math.log(2) * text.bytes),
             "words": text.words, "bytes": text.bytes}
    docs = f"{text.documents} document{'s' if text.documents != 1 else ''}"
    detail = f"window {text.window}, {protocol + ', ' if protocol else ''}{docs} scored " \
             "separately from BOS, every token predicted once"
    return EvalResult("ppl", "perplexity", math.exp(nll / count), count, detail, extra)


def perplexity(model, tokenizer, documents: List[str], window: int, batch_size: int = 8,
               max_tokens: Optional[int] = None, protocol: str = "") -> EvalResult:
    """`score` of `rolling_windows`; `protocol` (e.g. "txt mode document") goes into the
    detail."""
    return score(model, rolling_windows(tokenizer, documents, window, max_tokens), batch_size,
                 protocol)


def loss_breakdown(model, tokenizer, text: str, window: int, batch_size: int = 8,
                   max_tokens: Optional[int] = None) -> Dict[str, dict]:
    """How a model's loss on tokenized WikiText splits over its markup (`wikitext.MARKUP`):
    {category: {tokens, nll, token_share, loss_share}}, "other" for the rest and "total".
    `text` is scored as one document by the rolling protocol; a token belongs to the first
    category whose characters it overlaps (a transformers fast tokenizer gives the offsets)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=True)  # text as text (see _text_ids)
    ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
    inputs, targets = _rolling(_context_token(tokenizer), ids, window)
    nll = token_nll(model, torch.tensor(inputs), torch.tensor(targets), batch_size,
                    "loss breakdown").flatten()[:len(ids)]
    category = _token_categories(text, offsets)
    total = nll.sum().item()
    out = {}
    for name in [*markup_spans(""), "other"]:
        mask = torch.tensor([c == name for c in category])
        part = nll[mask].sum().item()
        out[name] = {"tokens": int(mask.sum()), "nll": part, "token_share": mask.float().mean()
                     .item(), "loss_share": part / total}
    out["total"] = {"tokens": len(ids), "nll": total, "token_share": 1.0, "loss_share": 1.0}
    return out


def _token_categories(text: str, offsets: list) -> List[str]:
    """The `MARKUP` category of each token's (start, end) character span, "other" if none."""
    owner = [""] * (len(text) + 1)
    for name, spans in reversed(list(markup_spans(text).items())):  # the first one wins
        for a, b in spans:
            owner[a:b] = [name] * (b - a)
    return [next((owner[i] for i in range(a, max(b, a + 1)) if owner[i]), "other")
            for a, b in offsets]


def token_windows(tokenizer, rows: list, window: int,
                  max_tokens: Optional[int] = None) -> torch.Tensor:
    """[n, window] token ids of the rows joined by blank lines (BOS first), cut into
    non-overlapping windows: what `windows_perplexity` scores (the older protocol); computed
    once, scored for many models.
    `tokenizer`: a transformers tokenizer or a `megatron_prune.data.tokenizers.Tokenizer`."""
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
    """Token perplexity of the next-token predictions inside each window (the older protocol:
    a window's first token is not predicted)."""
    n, window = windows.shape
    targets = torch.cat([windows[:, 1:], torch.full((n, 1), -1)], 1)  # last position: none
    nll = token_nll(model, windows, targets, batch_size,
                    f"perplexity (window {window})").sum().item()
    count = n * (window - 1)
    return EvalResult("ppl", "perplexity", math.exp(nll / count), count,
                      f"window {window}, {n} non-overlapping windows, documents joined by \\n\\n")


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
            ctx = bos + _text_ids(tokenizer, context)
            full = bos + _text_ids(tokenizer, context + " " + word)
            target = full[len(ctx):] if full[:len(ctx)] == ctx else \
                _text_ids(tokenizer, " " + word)
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
                ids = bos + _text_ids(tokenizer, prompt)
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
