"""The trainer's settings as small dataclasses, one per flag group, gathered in `TrainArgs`.

`TrainArgs.validate()` checks what can be checked before any process group exists and raises
`ConfigError`. The flags that fill them are in `arguments.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_prune.checkpoint.config import ConfigError

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
        from megatron_prune.train.lora import spec_from_args
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
        from megatron_prune.train.lora import TARGETS, check_supported
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
