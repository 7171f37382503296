"""importance: measure importance scores on calibration data."""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.convert import HFSource, open_source
from megatron_prune.checkpoint.hf import model_tokenizer_dir
from megatron_prune.data.calibration import calibration_batches, load_tokenizer


def _backend(a, world: int) -> str:
    """'megatron' or 'hf': auto is megatron when launched with WORLD_SIZE > 1."""
    backend = a.backend
    if backend == "auto":
        backend = "megatron" if world > 1 else "hf"
    if a.importance in ("random", "magnitude"):
        for flag, on in (("--layer-loss", a.layer_loss),
                         ("--iterative-layers", a.iterative_layers)):
            if on:
                raise ConfigError(f"{flag} runs the model on calibration data; use it with "
                                  f"--importance auto, activation or taylor, not {a.importance}")
        return "none"  # data-free: no model runs
    if backend == "megatron" and a.hf_dir:
        raise ConfigError("--backend megatron runs a Megatron checkpoint (--load DIR); for "
                          "--hf-dir run one process with --backend hf (or convert it first: "
                          "megatron-prune hf-to-megatron)")
    if backend == "hf" and world > 1:
        raise ConfigError(f"--backend hf runs in one process, but this launch has {world}; "
                          "use --backend megatron (or auto) under torchrun")
    if backend == "megatron" and a.iterative_layers:
        raise ConfigError("--iterative-layers runs on the hf backend only: run it in one process "
                          "(--backend hf, with --load DIR or --hf-dir); the scores apply to any "
                          "TP/PP checkpoint of the same model")
    if backend == "hf" and (a.tensor_model_parallel_size or a.pipeline_model_parallel_size):
        raise ConfigError("--tensor/pipeline-model-parallel-size need --backend megatron")
    return backend


def _run(a) -> int:
    import torch

    from megatron_prune.mcore.parallel import launched_rank, launched_world_size
    from megatron_prune.prune.choose import CALIB_ROWS
    from megatron_prune.prune.reconstruct import FIT_ROWS
    from megatron_prune.prune.importance_hf import compute_importance
    from megatron_prune.prune.importance_mcore import compute_importance_megatron
    from megatron_prune.prune.scores import magnitude_scores, random_scores
    world, rank = launched_world_size(), launched_rank()
    backend = _backend(a, world)
    if backend == "none" and rank != 0:
        return 0  # data-free methods: rank 0 alone computes and writes
    path = a.hf_dir or a.load
    source = open_source(path)
    if a.hf_dir and not isinstance(source, HFSource):
        raise ConfigError(f"--hf-dir {a.hf_dir} is not a Hugging Face model directory")
    if a.save and Path(a.save).exists() and not a.force:
        raise ConfigError(f"{a.save} exists; pass --force to overwrite it")
    cfg = source.config
    if a.iterative_layers and not 0 < a.iterative_layers < cfg.num_layers:
        raise ConfigError(f"--iterative-layers {a.iterative_layers}: the model has "
                          f"{cfg.num_layers} layers; remove between 1 and {cfg.num_layers - 1}")
    if a.importance == "random":
        scores = random_scores(cfg, a.seed)
    elif a.importance == "magnitude":
        scores = magnitude_scores(source, cfg)
    else:
        if not a.data:
            raise ConfigError(f"--importance {a.importance} needs calibration text: --data FILE...")
        tok_path = a.tokenizer or model_tokenizer_dir(path)
        tokenizer = load_tokenizer(tok_path)
        held = CALIB_ROWS if a.importance == "auto" else 0
        try:
            batches = calibration_batches(tokenizer, a.data, a.samples + held, a.seq_length,
                                          a.json_key)
        except ConfigError as e:
            raise ConfigError(f"{e}" + (f" (auto reads {held} sequences more, held out from the "
                                        "scores to choose on)" if held else "")) from None
        # auto: the sequences after --samples judge prune's choices; none of them was scored,
        # so a criterion fitted to the scored ones (Taylor, layer loss) has no in-sample edge
        batches, choice_rows = batches[:a.samples], batches[a.samples:]
        torch.manual_seed(a.seed)
        if backend == "megatron":
            scores = compute_importance_megatron(
                a.load, a.importance, batches, a.micro_batch_size,
                tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                seed=a.seed, progress=rank == 0, layer_loss=a.layer_loss)
            if scores is None:  # not global rank 0: only rank 0 writes the scores file
                return 0
        else:
            scores = compute_importance(source, a.importance, batches, a.micro_batch_size,
                                        layer_loss=a.layer_loss,
                                        iterative_layers=a.iterative_layers)
        if a.importance == "auto":
            scores.meta["calibration"] = choice_rows.to(torch.int32).clone()
        scores.meta["fit_rows"] = batches[:FIT_ROWS].to(torch.int32).clone()  # prune refits on them
    scores.meta.setdefault("source", str(path))
    tmp = Path(str(a.save) + ".tmp")
    scores.save(tmp)
    tmp.replace(a.save)
    print(f"wrote {a.importance} scores of {cfg.num_layers} layers to {a.save}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "importance", help="importance scores on calibration data (for prune --scores)",
        description="Compute importance scores of hidden channels, attention heads, KV groups,\n"
                    "FFN neurons and layers. activation: Minitron-style activation norms (forward\n"
                    "only); taylor: |w * dL/dw| per structure; auto (default): both, prune picks\n"
                    "per dimension by the loss on 16 more calibration sequences, held out from\n"
                    "the scores and kept in the scores file; magnitude: weight norms (no data);\n"
                    "random: seeded random scores. Runs on CUDA when available.\n\n"
                    "Backends (--backend): hf runs a transformers model built from any source in\n"
                    "one process; megatron runs a megatron-core GPTModel from a legacy Megatron\n"
                    "checkpoint on the TP x PP (x DP) ranks torchrun launches (the same scores;\n"
                    "TP/PP default to the checkpoint's, one process runs TP=PP=1). auto: megatron\n"
                    "when launched with WORLD_SIZE > 1, else hf. Only rank 0 writes --save.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  megatron-prune importance --hf-dir Llama-3.2-1B --data c4.jsonl "
               "--samples 1024 --seq-length 2048 --save scores.pt\n"
               "  torchrun --nproc_per_node 4 -m megatron_prune importance --load ckpt/tp2pp2 "
               "--data c4.jsonl --samples 1024 --seq-length 2048 --save scores.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron checkpoint (any TP/PP)")
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    p.add_argument("--data", nargs="+", help="calibration text: .txt files or .jsonl (--json-key)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--importance", choices=("auto", "activation", "taylor", "magnitude", "random"),
                   default="auto",
                   help="auto (default): activation and taylor both, and the calibration "
                        "sequences; prune then takes each dimension's criterion (and the layer "
                        "method) that gives the lower calibration loss for its target")
    p.add_argument("--layer-loss", action="store_true",
                   help="also measure the calibration loss with each layer skipped (the "
                        "layers before it are not rerun: about half a forward pass over the "
                        "data per layer), for prune --layer-method perplexity")
    p.add_argument("--iterative-layers", type=int, default=0, metavar="K",
                   help="also remove K layers one at a time, each round the one whose skipping "
                        "(with the earlier rounds' layers gone) raises the calibration loss "
                        "least, for prune --layer-method iterative with up to K layers dropped "
                        "(hf backend; a round over s layers costs about s/2 forward passes)")
    p.add_argument("--samples", type=int, default=1024, help="calibration sequences")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--backend", choices=("auto", "hf", "megatron"), default="auto",
                   help="auto (default): megatron when launched with WORLD_SIZE > 1, else hf")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="megatron backend: TP of the model (default: the checkpoint's; one "
                        "process runs TP=1)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                   help="megatron backend: PP of the model (default: the checkpoint's; one "
                        "process runs PP=1)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", required=True, help="output scores file (.pt)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_run)
