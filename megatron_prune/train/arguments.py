"""The trainer's flags: Megatron-LM's names, parsed into the dataclasses of `config.py`.

Only what this trainer implements is parsed (no catch-all namespace): an unknown or misspelled
flag is an error. `parse_args(argv)` returns a `TrainArgs`.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import List

from megatron_prune.train.config import LR_DECAY_STYLES, MATMUL_PRECISIONS, OPTIMIZERS, TrainArgs


# (flag, group, field, argparse kwargs). The flag names are Megatron-LM's where it has one.
def _count(text: str) -> int:
    """An integer that may be written 12e9 or 12_000_000_000."""
    value = float(text.replace("_", ""))
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a whole non-negative number: {text}")
    return int(value)


def _flags():
    S, I, F = str, int, float
    return [
        # model / initialisation
        ("--init", "model", "init", dict(choices=("checkpoint", "random"),
            help="start from a checkpoint's weights (default) or a random init of the given "
                 "shape (the from-scratch baseline)")),
        ("--pretrained-checkpoint", "model", "pretrained_checkpoint", dict(type=S,
            help="Megatron checkpoint (any TP/PP, either parameter naming) to take the shape "
                 "and, unless --init random, the weights from; used when --load holds no "
                 "checkpoint yet")),
        ("--num-layers", "model", "num_layers", dict(type=I)),
        ("--hidden-size", "model", "hidden_size", dict(type=I)),
        ("--ffn-hidden-size", "model", "ffn_hidden_size", dict(type=I)),
        ("--num-attention-heads", "model", "num_attention_heads", dict(type=I)),
        ("--num-query-groups", "model", "num_query_groups", dict(type=I,
            help="KV heads (grouped-query attention); default: = heads")),
        ("--kv-channels", "model", "kv_channels", dict(type=I, help="head dim")),
        ("--vocab-size", "model", "vocab_size", dict(type=I,
            help="vocab of a random-init model (default: the tokenizer's)")),
        ("--max-position-embeddings", "model", "max_position_embeddings", dict(type=I)),
        ("--rotary-base", "model", "rotary_base", dict(type=F)),
        ("--norm-epsilon", "model", "norm_epsilon", dict(type=F)),
        ("--untie-embeddings-and-output-weights", "model",
         "untie_embeddings_and_output_weights", dict(action="store_true")),
        ("--init-method-std", "model", "init_method_std", dict(type=F)),
        ("--make-vocab-size-divisible-by", "model", "make_vocab_size_divisible_by", dict(type=I)),
        ("--transformer-impl", "model", "transformer_impl",
         dict(choices=("auto", "transformer_engine", "local"),
              help="layer spec: Transformer Engine's when installed (auto), else local")),
        ("--core-attention", "model", "core_attention", dict(choices=("auto", "sdpa", "local"),
            help="local spec's core attention: torch scaled_dot_product_attention (auto, sdpa) "
                 "or megatron-core's unfused one (local)")),
        ("--recompute-activations", "model", "recompute_granularity",
         dict(action="store_const", const="selective",
              help="selective recompute (core attention), as Megatron-LM")),
        ("--recompute-granularity", "model", "recompute_granularity",
         dict(choices=("selective", "full"))),
        ("--recompute-method", "model", "recompute_method", dict(choices=("uniform", "block"))),
        ("--recompute-num-layers", "model", "recompute_num_layers", dict(type=I)),
        ("--loss-chunk-tokens", "model", "loss_chunk_tokens", dict(type=I,
            help="tokens per chunk of the fused output layer + cross-entropy (default 2048): "
                 "the [tokens x vocab] logits never exist at once")),
        ("--no-fused-kernels", "model", "fused_kernels", dict(action="store_false",
            help="local spec on CUDA without Transformer Engine/Apex: keep megatron-core's "
                 "unfused weight-gradient accumulation, RoPE and RMSNorm (by default fused: "
                 "one addmm into main_grad, compiled RoPE and RMSNorm)")),
        # parallelism
        ("--tensor-model-parallel-size", "parallel", "tensor_model_parallel_size", dict(type=I)),
        ("--pipeline-model-parallel-size", "parallel", "pipeline_model_parallel_size",
         dict(type=I)),
        ("--decoder-first-pipeline-num-layers", "parallel", "decoder_first_pipeline_num_layers",
         dict(type=I)),
        ("--decoder-last-pipeline-num-layers", "parallel", "decoder_last_pipeline_num_layers",
         dict(type=I)),
        ("--sequence-parallel", "parallel", "sequence_parallel", dict(action="store_true",
            help="with TP > 1; needs the Transformer Engine spec")),
        ("--use-distributed-optimizer", "parallel", "use_distributed_optimizer",
         dict(action="store_const", const=True,
              help="megatron-core's distributed optimizer (default with CUDA)")),
        ("--no-use-distributed-optimizer", "parallel", "use_distributed_optimizer",
         dict(action="store_const", const=False)),
        ("--overlap-grad-reduce", "parallel", "overlap_grad_reduce", dict(action="store_true")),
        # data
        ("--data-path", "data", "data_path", dict(nargs="+",
            help="indexed dataset prefix(es), optionally weighted: 'w1 p1 w2 p2'")),
        ("--split", "data", "split", dict(type=S, help="train,valid,test weights (969,30,1)")),
        ("--train-data-path", "data", "train_data_path", dict(nargs="+",
            help="training data of its own (prefix or weighted blend), instead of --data-path "
                 "with --split")),
        ("--valid-data-path", "data", "valid_data_path", dict(nargs="+",
            help="validation data of its own, e.g. held-out documents")),
        ("--test-data-path", "data", "test_data_path", dict(nargs="+")),
        ("--mock-data", "data", "mock_data", dict(action="store_true",
            help="megatron-core's mock GPT dataset (random tokens; benchmarks)")),
        ("--data-cache-path", "data", "data_cache_path", dict(type=S)),
        ("--num-workers", "data", "num_workers", dict(type=I)),
        ("--tokenizer-type", "data", "tokenizer_type",
         dict(choices=("HuggingFaceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                       "TikTokenizer", "NullTokenizer"))),
        ("--tokenizer-model", "data", "tokenizer_model", dict(type=S)),
        ("--eod-id", "data", "eod_id", dict(type=I,
            help="end-of-document token id (default: the tokenizer's / checkpoint's eos)")),
        ("--reset-position-ids", "data", "reset_position_ids", dict(action="store_true")),
        ("--reset-attention-mask", "data", "reset_attention_mask", dict(action="store_true")),
        ("--eod-mask-loss", "data", "eod_mask_loss", dict(action="store_true")),
        # training
        ("--micro-batch-size", "training", "micro_batch_size", dict(type=I)),
        ("--global-batch-size", "training", "global_batch_size", dict(type=I,
            help="default: micro-batch x data-parallel size (no accumulation)")),
        ("--seq-length", "training", "seq_length", dict(type=I)),
        ("--train-iters", "training", "train_iters", dict(type=I)),
        ("--train-tokens", "training", "train_tokens", dict(type=_count,
            help="train until this many tokens (rounded up to whole global batches)")),
        ("--train-samples", "training", "train_samples", dict(type=_count)),
        ("--exit-interval", "training", "exit_interval", dict(type=I,
            help="stop after this iteration (saving first when --save is given)")),
        ("--exit-duration-in-mins", "training", "exit_duration_in_mins", dict(type=F,
            help="stop (saving first when --save is given) once training has run this long")),
        ("--seed", "training", "seed", dict(type=I)),
        ("--bf16", "training", "bf16", dict(action="store_true",
            help="bf16 weights and activations, fp32 main weights in the optimizer (CUDA)")),
        # optimizer and schedule
        ("--optimizer", "optim", "optimizer", dict(choices=OPTIMIZERS,
            help="adam: AdamW (default). muon: Muon for the transformer layers' weight "
                 "matrices, AdamW for embeddings, output layer and norms, at one LR: Muon's "
                 "update is scaled to AdamW's usual RMS of 0.2")),
        ("--lr", "optim", "lr", dict(type=F)),
        ("--min-lr", "optim", "min_lr", dict(type=F)),
        ("--lr-warmup-iters", "optim", "lr_warmup_iters", dict(type=I)),
        ("--lr-warmup-fraction", "optim", "lr_warmup_fraction", dict(type=F)),
        ("--lr-decay-iters", "optim", "lr_decay_iters", dict(type=I,
            help="default: the training length")),
        ("--lr-decay-style", "optim", "lr_decay_style", dict(choices=LR_DECAY_STYLES)),
        ("--weight-decay", "optim", "weight_decay", dict(type=F)),
        ("--adam-beta1", "optim", "adam_beta1", dict(type=F)),
        ("--adam-beta2", "optim", "adam_beta2", dict(type=F)),
        ("--adam-eps", "optim", "adam_eps", dict(type=F)),
        ("--clip-grad", "optim", "clip_grad", dict(type=F, help="0 turns clipping off")),
        ("--muon-momentum", "optim", "muon_momentum", dict(type=F, help="default 0.95")),
        ("--muon-use-nesterov", "optim", "muon_use_nesterov", dict(action="store_true")),
        ("--muon-num-ns-steps", "optim", "muon_num_ns_steps", dict(type=I,
            help="Newton-Schulz iterations per orthogonalization (default 5)")),
        ("--muon-extra-scale-factor", "optim", "muon_extra_scale_factor", dict(type=F,
            help="multiplies Muon's update (RMS 0.2 x this)")),
        ("--muon-split-qkv", "optim", "muon_split_qkv", dict(action="store_const", const=True,
            help="orthogonalize q, k and v of the fused QKV weight apart (default)")),
        ("--no-muon-split-qkv", "optim", "muon_split_qkv",
         dict(action="store_const", const=False)),
        ("--muon-fp32-matmul-prec", "optim", "muon_fp32_matmul_prec", dict(
            choices=MATMUL_PRECISIONS, help="torch's fp32 matmul precision in Newton-Schulz "
            "only: highest = fp32, high = TF32, medium (default, as megatron-core's) = bf16 "
            "inside where the hardware has it (measured as TF32 on an H200)")),
        # checkpoints
        ("--load", "checkpoint", "load", dict(type=S,
            help="resume from the latest checkpoint here when there is one (model, optimizer, "
                 "LR schedule, RNG, data position); a weights-only checkpoint starts a new run")),
        ("--save", "checkpoint", "save", dict(type=S)),
        ("--save-interval", "checkpoint", "save_interval", dict(type=I)),
        ("--finetune", "checkpoint", "finetune", dict(action="store_true",
            help="take only the weights from --load; iteration and data restart at 0")),
        ("--no-load-optim", "checkpoint", "no_load_optim", dict(action="store_true")),
        ("--no-load-rng", "checkpoint", "no_load_rng", dict(action="store_true")),
        ("--no-save-optim", "checkpoint", "no_save_optim", dict(action="store_true")),
        # evaluation
        ("--eval-interval", "eval", "eval_interval", dict(type=I)),
        ("--eval-iters", "eval", "eval_iters", dict(type=I)),
        ("--early-stop-patience", "eval", "early_stop_patience", dict(type=I,
            help="stop when the validation loss has not improved for this many evaluations")),
        ("--early-stop-min-delta", "eval", "early_stop_min_delta", dict(type=F)),
        # logging
        ("--log-interval", "logging", "log_interval", dict(type=I)),
        ("--tensorboard-dir", "logging", "tensorboard_dir", dict(type=S)),
        ("--wandb-project", "logging", "wandb_project", dict(type=S)),
        ("--wandb-exp-name", "logging", "wandb_exp_name", dict(type=S)),
        ("--swanlab-project", "logging", "swanlab_project", dict(type=S)),
        ("--log-json", "logging", "log_json", dict(type=S,
            help="append one JSON line per logged iteration and evaluation to this file")),
        ("--profile", "logging", "profile", dict(action="store_true",
            help="torch profiler over iterations [--profile-step-start, --profile-step-end): "
                 "rank 0 prints its top kernels")),
        ("--profile-step-start", "logging", "profile_step_start", dict(type=I)),
        ("--profile-step-end", "logging", "profile_step_end", dict(type=I)),
        # distillation
        ("--teacher", "distill", "teacher", dict(type=S,
            help="Megatron checkpoint of the teacher (loaded at the same TP/PP)")),
        ("--kd-temperature", "distill", "kd_temperature", dict(type=F)),
        ("--kd-alpha", "distill", "kd_alpha", dict(type=F,
            help="loss = alpha * T^2 * KL(teacher||student) + (1 - alpha) * LM loss (default 1)")),
        ("--kd-hidden-weight", "distill", "kd_hidden_weight", dict(type=F,
            help="also pull the student's hidden states after each layer toward the teacher's "
                 "after the layer it was pruned from (prune_plan.json of "
                 "--pretrained-checkpoint; channel for channel, cosine distance): loss += "
                 "weight * that distance (default 0: off; with PP > 1 the teacher's stages "
                 "are cut to match)")),
        ("--kd-hidden-layers", "distill", "kd_hidden_layers", dict(type=S,
            help="student layers compared with --kd-hidden-weight, e.g. 2,5,8 (0-based; "
                 "default all)")),
        # LoRA
        ("--lora-rank", "lora", "rank", dict(type=I,
            help="train low-rank adapters of this rank on frozen base weights (default: off, "
                 "every weight trains); saved checkpoints hold the merged plain model")),
        ("--lora-alpha", "lora", "alpha", dict(type=F,
            help="adapter scale = alpha / rank (default alpha = rank: scale 1)")),
        ("--lora-target", "lora", "target", dict(type=S,
            help="comma list of the linear layers to adapt, Megatron names (default all): "
                 "linear_qkv,linear_proj,linear_fc1,linear_fc2")),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    groups = {}
    for flag, group, name, kwargs in _flags():
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs = {**kwargs, "metavar": name.upper()}
        g.add_argument(flag, dest=f"{group}.{name}", default=argparse.SUPPRESS, **kwargs)


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    args = TrainArgs()
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        group, name = key.split(".", 1)
        setattr(getattr(args, group), name, value)
    return args


def build_parser(prog: str = "python -m megatron_prune.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Recovery training (and distillation) of a Llama-family model on "
                    "megatron-core. Launch with torchrun: one process per GPU (or per CPU "
                    "worker over gloo); TP x PP x DP = world size.",
        epilog="example:\n  torchrun --nproc_per_node 8 -m megatron_prune.train "
               "--pretrained-checkpoint pruned/ --load run/ --save run/ \\\n"
               "    --tensor-model-parallel-size 2 --data-path 0.7 web 0.3 code "
               "--seq-length 4096 \\\n    --micro-batch-size 2 --global-batch-size 256 "
               "--train-tokens 12e9 --lr 3e-4 --min-lr 3e-5 --bf16")
    add_arguments(p)
    return p


def parse_args(argv=None) -> TrainArgs:
    ns = build_parser().parse_args(argv)
    return from_namespace(ns)


def flag_names() -> List[str]:
    return [flag for flag, *_ in _flags()]


def as_dict(args: TrainArgs) -> dict:
    return dataclasses.asdict(args)
