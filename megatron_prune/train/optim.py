"""AdamW or Muon, and the warmup + decay learning-rate schedule.

With CUDA, megatron-core's optimizer (`get_megatron_optimizer`): fp32 main weights beside bf16
model weights, gradient clipping by the global norm, and, by default, the distributed optimizer
(optimizer state sharded over data-parallel ranks). `--optimizer muon` puts our `MuonAdamW`
(muon.py) inside megatron-core's mixed-precision wrapper instead, without the distributed
optimizer, whose flat shards split the matrices Muon must see whole. On the CPU — where
megatron's optimizer allocates CUDA tensors — `TorchOptimizer`: torch's AdamW (or `MuonAdamW`)
over the (fp32) model weights, fed from megatron DDP's `main_grad` buffers, with the same
global-norm clipping and the same weight-decay rule (none for 1-D parameters: norms). All are
stepped by megatron-core's `OptimizerParamScheduler`, counted in samples as Megatron-LM counts
them.
"""
from __future__ import annotations

import logging
from typing import List

import torch
import torch.distributed as dist

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.train.config import OptimizerArgs
from megatron_prune.train.muon import MuonAdamW, matrix_role

log = logging.getLogger(__name__)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith(".bias") or param.dim() == 1


def global_grad_norm(params: List[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the model's gradients (`main_grad`) over all TP/PP ranks, each parameter
    counted once (TP-replicated ones on TP rank 0 only, the tied output copy not at all)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None or not param_is_not_shared(p) or \
                not param_is_not_tensor_parallel_duplicate(p):
            continue
        total += g.float().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total.sqrt()


def cpu_state_kind(algorithm: str) -> str:
    return "torch_adamw" if algorithm == "adam" else f"torch_{algorithm}"


def is_cpu_state(state) -> bool:
    return isinstance(state, dict) and str(state.get("kind", "")).startswith("torch_")


def param_groups(model, o: OptimizerArgs):
    """The two groups, with and without weight decay (megatron-core's keys, so that its
    checkpoint loading matches them), and for Muon each parameter's role (`matrix_role`)."""
    groups, roles = [], []
    for wd_mult in (1.0, 0.0):
        named = [(n, p) for n, p in model.module.named_parameters()
                 if p.requires_grad and _no_decay(n, p) == (wd_mult == 0.0)]
        if not named:
            continue
        groups.append({"params": [p for _, p in named], "wd_mult": wd_mult, "lr_mult": 1.0,
                       "is_expert_parallel": False, "is_decoupled_lr": False})
        roles.append([matrix_role(n) if o.optimizer == "muon" else None for n, _ in named])
    return groups, roles


def torch_optimizer(groups, roles, o: OptimizerArgs, cfg: ModelConfig):
    if o.optimizer == "muon":
        from megatron.core import parallel_state as ps
        return MuonAdamW(groups, roles, cfg=cfg, lr=o.lr, weight_decay=o.weight_decay,
                         betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                         momentum=o.muon_momentum, nesterov=o.muon_use_nesterov,
                         ns_steps=o.muon_num_ns_steps, extra_scale=o.muon_extra_scale_factor,
                         split_qkv=o.muon_split_qkv, fp32_matmul_prec=o.muon_fp32_matmul_prec,
                         tp_group=ps.get_tensor_model_parallel_group(),
                         dp_group=ps.get_data_parallel_group())
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=o.weight_decay, foreach=False)


class TorchOptimizer:
    """torch's AdamW, or MuonAdamW, over a megatron-DDP-wrapped model, with the megatron
    optimizer's `step() -> (ok, grad_norm, zeros)` interface."""

    def __init__(self, model, o: OptimizerArgs, cfg: ModelConfig):
        groups, roles = param_groups(model, o)
        self.params = [p for g in groups for p in g["params"]]
        self.clip_grad = o.clip_grad
        self.algorithm = o.optimizer
        self.optimizer = torch_optimizer(groups, roles, o, cfg)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype) if hasattr(p, "main_grad") else p.grad
        norm = global_grad_norm(self.params)
        if not torch.isfinite(norm):
            self.zero_grad()
            return False, norm.item(), None
        if self.clip_grad > 0:
            coeff = self.clip_grad / (norm + 1e-6)
            if coeff < 1.0:
                for p in self.params:
                    p.grad.mul_(coeff)
        self.optimizer.step()
        self.zero_grad()
        return True, norm.item(), None

    def state_dict(self):
        return {"kind": cpu_state_kind(self.algorithm), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        if not is_cpu_state(state):
            raise ConfigError("the checkpoint's optimizer state is megatron-core's (saved on "
                              "GPUs); resume it on GPUs, or pass --no-load-optim")
        self.optimizer.load_state_dict(state["optimizer"])

    distributed = False


def megatron_optimizer(model, o: OptimizerArgs, cfg: ModelConfig, *, bf16: bool,
                       dtype: torch.dtype, distributed: bool, fused: bool = False):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=bf16, params_dtype=dtype,
        use_distributed_optimizer=distributed)
    if o.optimizer == "muon":
        opt = _megatron_wrapped(model, o, cfg, config, bf16=bf16)
    else:
        opt = get_megatron_optimizer(config, [model])
        if fused and use_fused_adamw(opt):
            log.info("optimizer: torch's fused AdamW kernel (no Apex / Transformer Engine)")
    opt.distributed = distributed
    opt.algorithm = o.optimizer
    return opt


def use_fused_adamw(optimizer) -> int:
    """Switch the torch AdamW inside megatron-core's optimizer (its fallback without Apex or
    Transformer Engine, which builds it with torch's default: foreach) to torch's fused CUDA
    kernel, the stand-in for the FusedAdam megatron would take from Apex/TE. The foreach step
    runs several kernels per tensor list and op; the fused one a single pass over p, grad, m, v
    (bench/train_throughput.py measures the difference). Returns how many optimizers switched:
    those whose parameters are all floating-point CUDA tensors (what `fused` supports)."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not all(p.is_cuda and p.is_floating_point() for p in params):
            continue
        for group in [inner.defaults, *inner.param_groups]:
            group.update(fused=True, foreach=False)
        switched += 1
    return switched


def _megatron_wrapped(model, o: OptimizerArgs, cfg: ModelConfig, config, *, bf16: bool):
    """MuonAdamW inside megatron-core's wrapper, as `get_megatron_optimizer` wraps AdamW: fp32
    main weights (bf16) or the model's own (fp32), clipping, and the grad-norm groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
    inner = torch_optimizer(*param_groups(model, o), o, cfg)
    no_state = lambda opt, config=None: None  # noqa: E731 (state is made on the first step)
    opt = (Float16OptimizerWithFloat16Params(inner, config, None, no_state) if bf16
           else FP32Optimizer(inner, config, no_state))
    opt.grad_stats_parallel_group = ps.get_model_parallel_group()
    opt.tp_group = ps.get_tensor_model_parallel_group()
    return opt


def build_optimizer(model, o: OptimizerArgs, cfg: ModelConfig, *, bf16: bool,
                    dtype: torch.dtype, distributed: bool, fused: bool = False):
    """`fused`: torch's fused AdamW kernel where megatron-core falls back to torch's AdamW
    (set with the other fused kernels: CUDA without TE/Apex, see fusions.wanted)."""
    if torch.cuda.is_available():
        return megatron_optimizer(model, o, cfg, bf16=bf16, dtype=dtype,
                                  distributed=distributed, fused=fused)
    if bf16:
        raise ConfigError("--bf16 needs CUDA (fp32 main weights live in megatron-core's GPU "
                          "optimizer); train in fp32 on the CPU")
    return TorchOptimizer(model, o, cfg)


def build_scheduler(optimizer, o: OptimizerArgs, *, train_samples: int, global_batch: int):
    """Warmup + decay, counted in samples (`step(global_batch)` once per iteration)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    decay_samples = (o.lr_decay_iters * global_batch if o.lr_decay_iters else train_samples)
    if o.lr_warmup_fraction is not None:
        warmup = int(o.lr_warmup_fraction * decay_samples)
    else:
        warmup = o.lr_warmup_iters * global_batch
    if warmup >= decay_samples:
        raise ConfigError(f"LR warmup ({warmup} samples) must be shorter than the decay "
                          f"({decay_samples} samples)")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay_samples, lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(1, train_samples),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False)


def current_lr(optimizer) -> float:
    for g in optimizer.param_groups:
        if g.get("wd_mult", 1.0) != 0.0 or len(optimizer.param_groups) == 1:
            return float(g["lr"])
    return float(optimizer.param_groups[0]["lr"])

