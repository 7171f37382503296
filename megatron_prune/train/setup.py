"""Setting up a training run: the model, optimizer, teacher and loss, data, in the order that
matters (weights before the optimizer copies them; optimizer before its state is loaded).

`TrainerSetup` builds; `trainer.Trainer` adds the loop that runs what it built.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.tensor_io import torch_load
from megatron_prune.mcore.load import load_legacy_into_model
from megatron_prune.mcore.model import stage_split
from megatron_prune.train import checkpointing as ckpt_mod
from megatron_prune.train import data as data_mod
from megatron_prune.train import fusions, hidden_distill
from megatron_prune.train import lora as lora_mod
from megatron_prune.train import model as model_mod
from megatron_prune.train.config import TrainArgs
from megatron_prune.train.distill import Teacher
from megatron_prune.train.loss import LossSpec
from megatron_prune.train.metrics import MetricsLogger, flops_per_token
from megatron_prune.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunPlan:
    """Sizes derived from the flags and the world."""
    seq_length: int
    micro_batch: int
    global_batch: int
    dp: int
    num_microbatches: int
    train_iters: int
    train_samples: int


def plan_run(args: TrainArgs, world: int, default_seq: Optional[int]) -> RunPlan:
    t, p = args.training, args.parallel
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    dp = world // mp
    seq = t.seq_length or default_seq
    if not seq:
        raise ConfigError("give --seq-length")
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp}")
    if t.train_iters is not None:
        iters = t.train_iters
    elif t.train_tokens is not None:
        iters = math.ceil(t.train_tokens / (seq * gbs))
    else:
        iters = math.ceil(t.train_samples / gbs)
    if iters < 1:
        raise ConfigError("the run has no iterations: raise --train-iters / --train-tokens")
    return RunPlan(seq_length=seq, micro_batch=t.micro_batch_size, global_batch=gbs, dp=dp,
                   num_microbatches=gbs // (t.micro_batch_size * dp), train_iters=iters,
                   train_samples=iters * gbs)


@dataclasses.dataclass
class HiddenKD:
    """Hidden-state distillation's pieces: which layers, its weight, and the hooks keeping
    both models' states of the current micro-batch."""
    pairs: hidden_distill.LayerPairs
    weight: float
    plan: Optional[Path]
    student: hidden_distill.Capture
    teacher: hidden_distill.Capture
    teacher_stages: Optional[list] = None  # layers per teacher pipeline stage (PP > 1)

    def check_aligned(self) -> None:
        """Every stage holds the teacher layers of its student layers (the split's promise)."""
        mapped = dict(zip(self.pairs.student, self.pairs.teacher))
        if [mapped[i] for i in self.student.layers] != self.teacher.layers:
            raise RuntimeError(f"hidden-state distillation: student layers "
                               f"{self.student.layers} here, teacher layers "
                               f"{self.teacher.layers}")


class TrainerSetup:
    """One rank's share of a training job, built: `__init__` sets everything up in the order that
    matters (weights before the optimizer copies them; optimizer before its state is loaded)."""

    def __init__(self, args: TrainArgs, env: dict):
        self.args, self.env = args, env
        self.device = env["device"]
        if args.training.bf16 and not torch.cuda.is_available():
            raise ConfigError("--bf16 needs CUDA (fp32 main weights live in megatron-core's "
                              "GPU optimizer); train in fp32 on the CPU")
        self.dtype = torch.bfloat16 if args.training.bf16 else torch.float32
        # the compiled loss passes and torch's fused AdamW, with the other fused kernels
        self.fused = args.model.fused_kernels and fusions.wanted()
        self._resolve_source()
        self._build_model()
        self._build_optimizer()
        self._build_teacher_and_loss()
        self._build_data()
        self.flops_per_token = flops_per_token(self.cfg, self.plan.seq_length)
        lg = args.logging
        self.metrics = MetricsLogger(
            enabled=env["rank"] == 0, tensorboard_dir=lg.tensorboard_dir,
            wandb_project=lg.wandb_project, wandb_name=lg.wandb_exp_name,
            swanlab_project=lg.swanlab_project, json_path=lg.log_json,
            config=dataclasses.asdict(args))
        self._describe()

    # ------------------------------------------------------------------ setup
    def _resolve_source(self) -> None:
        """What to build and where its weights come from; the run's sizes; the tokenizer."""
        a = self.args
        m, c = a.model, a.checkpoint
        self.resume = (ckpt_mod.has_checkpoint(c.load) and not c.finetune
                       and ckpt_mod.is_training_checkpoint(c.load))
        if ckpt_mod.has_checkpoint(c.load):
            src = model_mod.source_from_checkpoint(
                c.load, weights=self.resume or m.init != "random")
            if not self.resume:
                log.info("--load %s holds weights only (or --finetune): starting a new run "
                         "from them", c.load)
        elif m.pretrained_checkpoint:
            src = model_mod.source_from_checkpoint(m.pretrained_checkpoint,
                                                   weights=m.init != "random")
        else:
            if m.init != "random":
                raise ConfigError(f"--load {c.load}: no checkpoint there, and no "
                                  "--pretrained-checkpoint; pass --init random for a new model")
            tok = data_mod.tokenizer_info(a.data.tokenizer_type, a.data.tokenizer_model,
                                          m.vocab_size, None, a.data.eod_id)
            cfg = model_mod.random_init_config(m, tok.vocab_size, a.training.seq_length or 0)
            src = model_mod.ModelSource(config=cfg, weights=None,
                                        divisible_by=m.make_vocab_size_divisible_by)
        self.source, self.cfg = src, src.config
        default_seq = getattr(src.args, "seq_length", None) if src.args is not None else None
        self.plan = plan_run(a, self.env["world_size"], default_seq)
        if self.plan.seq_length > self.cfg.max_position_embeddings:
            log.warning("--seq-length %d exceeds the model's max_position_embeddings %d",
                        self.plan.seq_length, self.cfg.max_position_embeddings)
        self.tokenizer = data_mod.tokenizer_info(
            a.data.tokenizer_type, a.data.tokenizer_model, self.cfg.vocab_size,
            self.cfg.hf_extra.get("eos_token_id"), a.data.eod_id)
        if self.tokenizer.vocab_size > self.cfg.padded_vocab_size(
                a.parallel.tensor_model_parallel_size, src.divisible_by):
            raise ConfigError(f"the tokenizer's vocab ({self.tokenizer.vocab_size}) is larger "
                              f"than the model's ({self.cfg.vocab_size})")

    def _build_model(self) -> None:
        """This rank's GPTModel piece with its weights, wrapped in megatron DDP."""
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig, finalize_model_grads)
        from megatron.core.pipeline_parallel import get_forward_backward_func
        m, p = self.args.model, self.args.parallel
        self.lora = self.args.lora_spec()
        self.impl = model_mod.pick_impl(lora_mod.impl_for(m.transformer_impl, self.lora))
        torch.manual_seed(self.args.training.seed)  # the same random init on every rank
        module = model_mod.build_piece(self.cfg, m=m, p=p, dtype=self.dtype, impl=self.impl,
                                       divisible_by=self.source.divisible_by)
        if self.source.weights is not None:
            load_legacy_into_model(module, self.source.weights)
        if self.lora is not None:
            self._apply_lora(module)
        elif self.resume:
            self._refuse_lora_checkpoint()
        muon = self.args.optim.optimizer == "muon"
        self.distributed_optimizer = (torch.cuda.is_available() and not muon
                                      if p.use_distributed_optimizer is None
                                      else p.use_distributed_optimizer)
        if self.distributed_optimizer and not torch.cuda.is_available():
            raise ConfigError("--use-distributed-optimizer needs CUDA (megatron-core's optimizer)")
        if self.distributed_optimizer and muon:
            raise ConfigError("--optimizer muon needs whole weight matrices; megatron-core's "
                              "distributed optimizer shards them over data-parallel ranks "
                              "(drop --use-distributed-optimizer)")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
            use_distributed_optimizer=self.distributed_optimizer)
        self.ddp = DistributedDataParallel(config=module.config, ddp_config=ddp_config,
                                           module=module)
        if self.source.weights is None:
            self.ddp.broadcast_params()
        self.module = module
        module.config.no_sync_func = self.ddp.no_sync
        module.config.finalize_model_grads_func = finalize_model_grads
        if p.overlap_grad_reduce:
            module.config.grad_sync_func = self.ddp.start_grad_sync
        self.forward_backward = get_forward_backward_func()

    def _apply_lora(self, module) -> None:
        """Freeze the loaded weights and add adapters, before DDP (which then makes gradient
        buffers for the adapters only). A resumed LoRA run's `model` holds merged weights: the
        unmerged base and the adapters come from its `lora` entry."""
        lora_mod.apply(module, self.lora, self.args.training.seed)
        f = ckpt_mod.this_rank_file(self.args.checkpoint.load) if self.resume else None
        if f is not None and f.is_file():  # else load_training_state names the TP/PP mismatch
            lora_mod.restore(module, self.lora, torch_load(f).get("lora"), str(f))

    def _refuse_lora_checkpoint(self) -> None:
        f = ckpt_mod.this_rank_file(self.args.checkpoint.load)
        if f.is_file() and torch_load(f).get("lora") is not None:
            raise ConfigError(f"{f}: a LoRA run's checkpoint; resume it with the same "
                              "--lora-rank/--lora-alpha/--lora-target, or pass --finetune to "
                              "train all of its (merged) weights")

    def _build_optimizer(self) -> None:
        """AdamW or Muon + LR schedule, and on resume their state, the RNG and the data position."""
        a, c = self.args, self.args.checkpoint
        self.optimizer = build_optimizer(self.ddp, a.optim, self.cfg, bf16=a.training.bf16,
                                         dtype=self.dtype, distributed=self.distributed_optimizer,
                                         fused=self.fused)
        self.scheduler = build_scheduler(self.optimizer, a.optim,
                                         train_samples=self.plan.train_samples,
                                         global_batch=self.plan.global_batch)
        self.state = ckpt_mod.TrainState()
        if self.resume:
            self.state = ckpt_mod.load_training_state(
                c.load, model=self.ddp, optimizer=self.optimizer, scheduler=self.scheduler,
                load_optim=not c.no_load_optim, load_rng=not c.no_load_rng)

    def _build_teacher_and_loss(self) -> None:
        from megatron.core import parallel_state as ps
        a, p = self.args, self.args.parallel
        self.teacher = self.hidden_kd = None
        if a.distill.teacher:
            ckpt = model_mod.open_checkpoint(a.distill.teacher)
            pairs, plan, counts = None, None, None
            if a.distill.kd_hidden_weight > 0:
                pairs, plan, counts = self._hidden_pairs(ckpt.config)
            self.teacher = Teacher(ckpt, student_cfg=self.cfg, m=a.model, p=p,
                                   dtype=self.dtype, impl=self.impl,
                                   pp=p.pipeline_model_parallel_size,
                                   stages=stage_split(counts) if counts else None)
            if pairs is not None:
                self.hidden_kd = HiddenKD(
                    pairs=pairs, weight=a.distill.kd_hidden_weight, plan=plan,
                    teacher_stages=counts,
                    student=hidden_distill.Capture(self.module, pairs.student),
                    teacher=hidden_distill.Capture(self.teacher.module, pairs.teacher,
                                                   pairs.channels, detach=True))
                self.hidden_kd.check_aligned()
        self.loss_spec = None
        if self.module.post_process:
            start, rows = model_mod.vocab_shard(self.cfg, model_mod.output_weight(self.module))
            tp_group = (ps.get_tensor_model_parallel_group()
                        if ps.get_tensor_model_parallel_world_size() > 1 else None)
            self.loss_spec = LossSpec(vocab_start=start, real_rows=rows,
                                      chunk_tokens=a.model.loss_chunk_tokens,
                                      kd_alpha=a.distill.kd_alpha if self.teacher else 0.0,
                                      temperature=a.distill.kd_temperature, group=tp_group,
                                      compiled=self.fused)

    def _hidden_pairs(self, teacher_cfg) -> tuple:
        """The compared layer pairs, the prune plan that maps them, and the teacher's layers
        per pipeline stage that put each pair on one stage (None at PP = 1)."""
        d, p = self.args.distill, self.args.parallel
        layers = hidden_distill.parse_layers(d.kd_hidden_layers, self.cfg.num_layers)
        # the weights' checkpoint (saved ones keep their source's plan, so a resumed or
        # continued run finds it), else the one a random-init student copies its shape from
        plan = hidden_distill.find_plan([self.source.weights,
                                         self.args.model.pretrained_checkpoint])
        pairs = hidden_distill.layer_pairs(self.cfg, teacher_cfg, plan, layers)
        if p.pipeline_model_parallel_size == 1:
            return pairs, plan, None
        student = layout.stage_layer_counts(
            self.cfg.num_layers, p.pipeline_model_parallel_size,
            p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
        counts = hidden_distill.teacher_stage_counts(pairs, student, teacher_cfg.num_layers)
        return pairs, plan, counts

    def _build_data(self) -> None:
        """train / valid / test GPTDatasets and this rank's view of them."""
        from megatron.core import parallel_state as ps
        a, d, pl = self.args, self.args.data, self.plan
        eval_on = a.eval.eval_interval is not None
        eval_samples = a.eval.eval_iters * pl.global_batch if eval_on else None
        save = a.checkpoint.save
        cache = d.data_cache_path or (str(Path(save) / "data_cache") if save else None)
        train_ds, valid_ds, test_ds = data_mod.build_datasets(
            data_path=d.data_path, split=d.split, mock=d.mock_data, seq_length=pl.seq_length,
            seed=a.training.seed, tokenizer=self.tokenizer,
            sizes=[pl.train_samples, eval_samples, eval_samples], cache_path=cache,
            reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss,
            split_paths=(d.train_data_path, d.valid_data_path, d.test_data_path))
        if train_ds is None:
            raise ConfigError(f"--split {d.split} leaves no training data")
        mk = partial(data_mod.BatchSource, global_batch=pl.global_batch,
                     micro_batch=pl.micro_batch, dp_size=ps.get_data_parallel_world_size(),
                     dp_rank=ps.get_data_parallel_rank(), device=self.device,
                     num_workers=d.num_workers)
        self.train_data = mk(train_ds)
        self.valid_data = mk(valid_ds) if valid_ds is not None else None
        self.test_data = mk(test_ds) if test_ds is not None else None
        if eval_on and self.valid_data is None:
            log.warning("no validation data (--split %s, no --valid-data-path): no evaluation",
                        d.split)

    # ------------------------------------------------------------------ pieces of a step
    def _describe(self) -> None:
        from megatron.core import parallel_state as ps
        pl, cfg = self.plan, self.cfg
        where = ("resuming " + str(self.args.checkpoint.load) + f" at iteration "
                 f"{self.state.iteration}" if self.resume else
                 f"weights from {self.source.weights}" if self.source.weights else "random init")
        attn = type(self.module.decoder.layers[0].self_attention.core_attention).__name__ \
            if len(self.module.decoder.layers) else "-"
        self.metrics.line(
            f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN "
            f"{cfg.ffn_hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_query_groups}, "
            f"vocab {cfg.vocab_size} ({self.impl} spec, {attn}); {where}\n"
            f"parallel: TP={ps.get_tensor_model_parallel_world_size()} "
            f"PP={ps.get_pipeline_model_parallel_world_size()} DP={pl.dp}; batch: micro "
            f"{pl.micro_batch} x {pl.num_microbatches} accumulation x DP {pl.dp} = global "
            f"{pl.global_batch} x seq {pl.seq_length}; {pl.train_iters} iterations "
            f"({pl.train_samples * pl.seq_length:,} tokens); {self.dtype}"
            + self._describe_kd()
            + (lora_mod.describe(self.lora, self.module) if self.lora else ""))

    def _describe_kd(self) -> str:
        if not self.teacher:
            return ""
        d, hk = self.args.distill, self.hidden_kd
        out = f"; KD from {self.teacher.path} (T={d.kd_temperature}, alpha={d.kd_alpha})"
        if hk is not None:
            out += (f"; hidden states of student layers {list(hk.pairs.student)} vs teacher "
                    f"layers {list(hk.pairs.teacher)} (weight {hk.weight:g}"
                    + (f", mapped by {hk.plan}" if hk.plan else "")
                    + (f"; teacher stages of {hk.teacher_stages} layers"
                       if hk.teacher_stages else "") + ")")
        return out
