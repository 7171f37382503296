"""generate: sample or greedy-decode text from a model (HF dir or Megatron checkpoint)."""
from __future__ import annotations

import json

from megatron_prune.checkpoint.config import ConfigError


def _run(a) -> int:
    import torch

    from megatron_prune.checkpoint.hf import model_tokenizer_dir
    from megatron_prune.checkpoint.hf_model import load_hf_model
    from megatron_prune.data.calibration import load_tokenizer
    model = load_hf_model(a.model)
    tok_path = a.tokenizer or model_tokenizer_dir(a.model)
    tok = load_tokenizer(tok_path)
    if a.prompt:
        ids = torch.tensor([tok.encode(a.prompt)] * a.num_samples)
    elif tok.bos_token_id is not None:
        ids = torch.full((a.num_samples, 1), tok.bos_token_id, dtype=torch.long)
    else:
        raise ConfigError("the tokenizer has no BOS token: give --prompt")
    torch.manual_seed(a.seed)
    sampling = dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0) \
        if a.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **sampling,
                             max_new_tokens=a.max_new_tokens, pad_token_id=tok.eos_token_id)
    texts = [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
    if a.save:
        with open(a.save, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        print(f"wrote {len(texts)} samples to {a.save}")
    else:
        for t in texts:
            print(t)
            print("---")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a model (calibration data, smoke checks)",
        description="Generate text with a Hugging Face model or a Megatron checkpoint (merged "
                    "on CPU). With --save, writes jsonl usable as --data for importance.",
        epilog="example: megatron-prune generate --model stories260K-hf --num-samples 64 "
               "--max-new-tokens 256 --save calib.jsonl")
    p.add_argument("--model", required=True, help="HF directory or Megatron checkpoint")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--prompt", default=None, help="prompt (default: start from BOS)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", help="write samples as jsonl here instead of printing them")
    p.set_defaults(func=_run)
