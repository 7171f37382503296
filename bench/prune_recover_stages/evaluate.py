"""Stage 5, evaluate: held-out books and WikiText-2 perplexity of every model."""
from __future__ import annotations


from pathlib import Path
from typing import Dict


from prune_recover_stages.protocol import Protocol
from prune_recover_stages.runner import Runner


# ---------------------------------------------------------------------------- 5. evaluate
def evaluate_all(r: Runner, p: Protocol, data: dict, models: Dict[str, Path]) -> dict:
    """Perplexity of every checkpoint on the held-out books and WikiText-2, in this process
    (the text is tokenized once)."""
    import torch

    from megatron_prune.eval.evaluate import token_windows, windows_perplexity
    from megatron_prune.checkpoint.hf_model import load_hf_model
    from megatron_prune.data.tokenizers import build_tokenizer
    if "_windows" not in data:  # tokenized once for every call
        # as `preprocess` tokenized the training data, by construction: SentencePiece itself
        # (transformers' Llama tokenizer built from a bare tokenizer.model split the books'
        # double spaces after a full stop differently: docs/benchmarks.md, "Tokenization")
        tok = build_tokenizer("Llama2Tokenizer", data["spm"])
        data["_windows"] = {
            "books": token_windows(tok, data["valid_rows"], p.seq_length, p.eval_tokens),
            "wikitext2": token_windows(tok, data["wikitext"], p.seq_length, p.eval_tokens)}
    sets = data["_windows"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, path in models.items():
        model = load_hf_model(path, device=device, dtype=torch.float32)
        params = sum(x.numel() for x in model.parameters())
        res = {k: windows_perplexity(model, w, batch_size=8) for k, w in sets.items()}
        out[name] = {"params": params, **{k: v.value for k, v in res.items()},
                     "tokens": {k: v.count for k, v in res.items()}}
        r.say(f"  {name:>18}: {params / 1e6:6.1f} M params | held-out books ppl "
              f"{out[name]['books']:9.2f} | WikiText-2 ppl {out[name]['wikitext2']:9.2f}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out
