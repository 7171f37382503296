"""The trainer's flags: Megatron-LM's names, parsed into small dataclasses.

Only what this trainer implements is parsed (no catch-all namespace): an unknown or misspelled
flag is an error. `parse_args(argv)` returns a `TrainArgs`; `TrainArgs.validate()` checks what
can be checked before any process group exists and raises `ConfigError`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import ConfigError

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
OPTIMIZERS = ("adam", "muon")
# torch.set_float32_matmul_precision's levels, which Newton-Schulz runs at (megatron-core's
# Muon takes the same names): fp32; TF32; bf16 inside where the hardware has it (on an H200,
# bench/muon_step.py measured "medium" as fast as TF32 and as close to fp32)
MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class ModelArgs:
    init: str = "checkpoint"                  # "checkpoint" (weights from a checkpoint) | "random"
    pretrained_checkpoint: Optional[str] = None
    # Shape of a `--init random` model (ignored when the shape comes from a checkpoint).
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    transformer_impl: str = "auto"            # auto | transformer_engine | local
    core_attention: str = "auto"              # auto | sdpa | local (local spec only)
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    loss_chunk_tokens: int = 2048             # fused output layer + loss, tokens per chunk
    fused_kernels: bool = True                # fusions.py: on CUDA without TE/Apex only


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: Optional[bool] = None  # default: on with CUDA
    overlap_grad_reduce: bool = False


@dataclass
class DataArgs:
    data_path: List[str] = field(default_factory=list)   # "w1 p1 w2 p2" or "p1 p2"
    # Separate datasets per split (Megatron-LM's --train/valid/test-data-path); no --split then.
    train_data_path: List[str] = field(default_factory=list)
    valid_data_path: List[str] = field(default_factory=list)
    test_data_path: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    mock_data: bool = False
    data_cache_path: Optional[str] = None
    num_workers: int = 0
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    eod_id: Optional[int] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class TrainingArgs:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    seq_length: Optional[int] = None
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None
    train_samples: Optional[int] = None
    exit_interval: Optional[int] = None       # stop (after saving) at this iteration
    exit_duration_in_mins: Optional[float] = None  # stop (after saving) after this wall time
    seed: int = 1234
    bf16: bool = False


@dataclass
class OptimizerArgs:
    optimizer: str = "adam"
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    muon_momentum: float = 0.95
    muon_use_nesterov: bool = False
    muon_num_ns_steps: int = 5
    muon_extra_scale_factor: float = 1.0
    muon_split_qkv: bool = True
    muon_fp32_matmul_prec: str = "medium"  # megatron-core's default


@dataclass
class CheckpointArgs:
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False                    # load weights only from --load
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False


@dataclass
class EvalArgs:
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    early_stop_patience: Optional[int] = None  # evaluations without improvement
    early_stop_min_delta: float = 0.0


@dataclass
class LoggingArgs:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    swanlab_project: Optional[str] = None
    log_json: Optional[str] = None            # one JSON line per logged iteration / evaluation
    profile: bool = False                     # torch profiler over iterations [start, end)
    profile_step_start: int = 10
    profile_step_end: int = 12


@dataclass
class DistillArgs:
    teacher: Optional[str] = None
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0                     # loss = alpha * KD + (1 - alpha) * LM
    kd_hidden_weight: float = 0.0             # + weight * hidden-state cosine distance
    kd_hidden_layers: Optional[str] = None    # student layers compared (default: all)


@dataclass
class LoraArgs:
    rank: Optional[int] = None                # None: train every weight
    alpha: Optional[float] = None             # scale = alpha / rank; default alpha = rank
    target: str = "linear_qkv,linear_proj,linear_fc1,linear_fc2"


@dataclass
class TrainArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optim: OptimizerArgs = field(default_factory=OptimizerArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)

    def lora_spec(self):
        """The LoRA settings (`lora.LoraSpec`), None without --lora-rank."""
        from .lora import spec_from_args
        return spec_from_args(self.lora.rank, self.lora.alpha, self.lora.target)

    def validate(self) -> None:
        m, t, o, d, c = self.model, self.training, self.optim, self.data, self.checkpoint
        if m.init not in ("checkpoint", "random"):
            raise ConfigError(f"--init must be checkpoint or random, got {m.init!r}")
        if m.init == "checkpoint" and not (m.pretrained_checkpoint or c.load):
            raise ConfigError("give --pretrained-checkpoint DIR (or --load DIR) to start from a "
                              "checkpoint, or --init random with the model's shape")
        if sum(x is not None for x in (t.train_iters, t.train_tokens, t.train_samples)) != 1:
            raise ConfigError("give exactly one of --train-iters, --train-tokens, --train-samples")
        if t.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be positive, got {t.micro_batch_size}")
        per_split = d.train_data_path or d.valid_data_path or d.test_data_path
        if not d.data_path and not d.mock_data and not per_split:
            raise ConfigError("give --data-path (an indexed dataset prefix, or a blend "
                              "'w1 prefix1 w2 prefix2'), --train-data-path [--valid-data-path "
                              "...] or --mock-data")
        if per_split and (d.data_path or d.mock_data):
            raise ConfigError("--train/valid/test-data-path replace --data-path and --split: "
                              "give one or the other")
        if per_split and not d.train_data_path:
            raise ConfigError("--valid-data-path / --test-data-path need --train-data-path")
        if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
            raise ConfigError("--exit-duration-in-mins must be positive")
        if o.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}")
        if o.min_lr > o.lr:
            raise ConfigError(f"--min-lr {o.min_lr} exceeds --lr {o.lr}")
        if o.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}, got {o.optimizer!r}")
        if not 0.0 <= o.muon_momentum < 1.0:
            raise ConfigError(f"--muon-momentum must lie in [0, 1), got {o.muon_momentum}")
        if o.muon_num_ns_steps < 1:
            raise ConfigError("--muon-num-ns-steps must be at least 1")
        if o.muon_extra_scale_factor <= 0:
            raise ConfigError("--muon-extra-scale-factor must be positive")
        if c.save_interval is not None and not c.save:
            raise ConfigError("--save-interval needs --save")
        if self.eval.eval_interval is not None and self.eval.eval_interval < 1:
            raise ConfigError("--eval-interval must be positive")
        if self.eval.early_stop_patience is not None and self.eval.eval_interval is None:
            raise ConfigError("--early-stop-patience needs --eval-interval")
        if not 0.0 <= self.distill.kd_alpha <= 1.0:
            raise ConfigError(f"--kd-alpha must lie in [0, 1], got {self.distill.kd_alpha}")
        if self.distill.kd_temperature <= 0:
            raise ConfigError("--kd-temperature must be positive")
        self._validate_hidden_kd()
        if m.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError("--recompute-granularity must be selective or full")
        if m.loss_chunk_tokens < 1:
            raise ConfigError("--loss-chunk-tokens must be positive")
        self._validate_lora()

    def _validate_lora(self) -> None:
        from .lora import TARGETS, check_supported
        default_target = ",".join(TARGETS)
        if self.lora.rank is None and (self.lora.alpha is not None
                                       or self.lora.target != default_target):
            raise ConfigError("--lora-alpha / --lora-target need --lora-rank")
        check_supported(self.lora_spec(), init=self.model.init, optimizer=self.optim.optimizer,
                        sequence_parallel=self.parallel.sequence_parallel,
                        transformer_impl=self.model.transformer_impl)

    def _validate_hidden_kd(self) -> None:
        d, p = self.distill, self.parallel
        if d.kd_hidden_weight < 0:
            raise ConfigError(f"--kd-hidden-weight must be >= 0, got {d.kd_hidden_weight}")
        if d.kd_hidden_weight == 0:
            if d.kd_hidden_layers is not None:
                raise ConfigError("--kd-hidden-layers needs --kd-hidden-weight > 0")
            return
        if not d.teacher:
            raise ConfigError("--kd-hidden-weight needs --teacher")
        # the compared layers' outputs must hold the full sequence and carry gradients (full
        # recompute runs them without)
        if p.sequence_parallel:
            raise ConfigError("--kd-hidden-weight does not work with --sequence-parallel")
        if self.model.recompute_granularity == "full":
            raise ConfigError("--kd-hidden-weight does not work with --recompute-granularity "
                              "full (use selective)")


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
