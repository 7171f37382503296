"""importance: measure importance scores on calibration data."""
from __future__ import annotations

from pathlib import Path

from ..calibration import calibration_batches, load_tokenizer
from ..config import ConfigError
from ..convert import HFSource, open_source


def _run(a) -> int:
    import torch

    from ..importance import compute_importance
    from ..scores import magnitude_scores, random_scores
    path = a.hf_dir or a.load
    source = open_source(path)
    if a.hf_dir and not isinstance(source, HFSource):
        raise ConfigError(f"--hf-dir {a.hf_dir} is not a Hugging Face model directory")
    if a.save and Path(a.save).exists() and not a.force:
        raise ConfigError(f"{a.save} exists; pass --force to overwrite it")
    cfg = source.config
    if a.importance == "random":
        scores = random_scores(cfg, a.seed)
    elif a.importance == "magnitude":
        scores = magnitude_scores(source, cfg)
    else:
        if not a.data:
            raise ConfigError(f"--importance {a.importance} needs calibration text: --data FILE...")
        tok_path = a.tokenizer or (a.hf_dir if a.hf_dir else Path(a.load) / "tokenizer")
        tokenizer = load_tokenizer(tok_path)
        batches = calibration_batches(tokenizer, a.data, a.samples, a.seq_length, a.json_key)
        torch.manual_seed(a.seed)
        scores = compute_importance(source, a.importance, batches, a.micro_batch_size)
    scores.meta.setdefault("source", str(path))
    tmp = Path(str(a.save) + ".tmp")
    scores.save(tmp)
    tmp.replace(a.save)
    print(f"wrote {a.importance} scores of {cfg.num_layers} layers to {a.save}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "importance", help="importance scores on calibration data (for prune --scores)",
        description="Compute importance scores of hidden channels, attention heads, KV groups, "
                    "FFN neurons and layers. activation: Minitron-style activation norms "
                    "(forward only); taylor: |w * dL/dw| per structure; magnitude: weight norms "
                    "(no data); random: seeded random scores. Runs on CUDA when available.",
        epilog="example: megatron-prune importance --hf-dir Llama-3.2-1B --data c4.jsonl "
               "--samples 1024 --seq-length 2048 --save scores.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron checkpoint (any TP/PP)")
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    p.add_argument("--data", nargs="+", help="calibration text: .txt files or .jsonl (--json-key)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--importance", choices=("activation", "taylor", "magnitude", "random"),
                   default="activation")
    p.add_argument("--samples", type=int, default=1024, help="calibration sequences")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", required=True, help="output scores file (.pt)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_run)
