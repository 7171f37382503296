"""The training loop: megatron-core model, schedule, DDP and optimizer, wired together.

`train(args)` runs on every rank of a torchrun launch (or one plain process). One iteration:
the global batch's micro-batches for this data-parallel rank (`data.BatchSource`), the teacher's
forward over them when distilling, megatron-core's forward-backward schedule (pipelined when
PP > 1; gradient accumulation over micro-batches inside DDP's `no_sync`; `finalize_model_grads`
all-reduces over DP and divides by the global number of loss tokens), one optimizer step with
global-norm clipping, one LR-schedule step. Evaluation, checkpoints and logging around it.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.checkpoint.hf_tokenizer import write_hf_sentencepiece_dir
from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
from megatron_prune.data.tokenizers import SENTENCEPIECE_TYPES
from megatron_prune.mcore.parallel import destroy_distributed, init_distributed
from megatron_prune.train import checkpointing as ckpt_mod
from megatron_prune.train import hidden_distill
from megatron_prune.train import lora as lora_mod
from megatron_prune.train import model as model_mod
from megatron_prune.train.config import TrainArgs
from megatron_prune.train.cpu import training_cpu_patches
from megatron_prune.train.loss import fused_output_loss
from megatron_prune.train.metrics import ppl
from megatron_prune.train.optim import current_lr
from megatron_prune.train.setup import TrainerSetup

log = logging.getLogger(__name__)


class Trainer(TrainerSetup):
    """One rank's share of a training job: the steps, evaluation, checkpoints and logging of the
    run `TrainerSetup` built."""

    def _forward_step(self, data_iterator, model):
        batch, teacher_hidden, teacher_states = next(data_iterator)
        hk = self.hidden_kd
        if hk is not None and teacher_states is None:
            # PP = 1: the teacher runs here, one micro-batch at a time
            teacher_hidden = self.teacher.forward(batch)
            teacher_states = hk.teacher.take()
        out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        states = (hk.student.take(), teacher_states) if hk is not None else None
        if states is not None and not self.module.post_process:
            out = self._hidden_loss_before_last_stage(out, states, batch["loss_mask"])
        return out, partial(self._loss, batch, teacher_hidden, states)

    def _hidden_loss_before_last_stage(self, out, states, loss_mask):
        """A stage before the last: its layers' part of the hidden-state loss rides on the
        backward of the activation it sends on; its sum is kept for the report."""
        hk = self.hidden_kd
        if not states[0]:
            return out
        hid = hidden_distill.loss_sum(*states, loss_mask, len(hk.pairs.student))
        self._hidden_sum_here += hid.detach().double()
        scale = self.module.config.grad_scale_func  # as the schedule scales the last stage's
        scale = float(scale(torch.ones(1, device=out.device))) if scale else 1.0
        return hidden_distill.attach_loss(out, hk.weight * hid, scale)

    def _loss(self, batch, teacher_hidden, states, hidden):
        h = model_mod.output_hidden(self.module, hidden)
        w = model_mod.output_weight(self.module)
        tw = self.teacher.output_weight() if self.teacher else None
        loss, ce, kd = fused_output_loss(h, w, batch["labels"], batch["loss_mask"],
                                         self.loss_spec, teacher_hidden, tw)
        hid = torch.zeros_like(ce)
        if states is not None:
            hid = hidden_distill.loss_sum(*states, batch["loss_mask"],
                                          len(self.hidden_kd.pairs.student))
            loss = loss + self.hidden_kd.weight * hid
        n = batch["loss_mask"].sum().to(torch.int)
        return loss, n, {"sums": torch.stack([ce.detach(), kd.detach(), hid.detach(),
                                              n.float()])}

    def _teacher(self, micro) -> list:
        """(final hidden states, hidden states of the compared layers) per micro-batch, from
        the teacher's pipelined forward; (None, None) where `_forward_step` runs it (no
        teacher, or hidden-state distillation at PP = 1)."""
        hk = self.hidden_kd
        pp = self.args.parallel.pipeline_model_parallel_size
        if self.teacher is None or (hk is not None and pp == 1):
            return [(None, None)] * len(micro)
        final = self.teacher.hidden_states(self.forward_backward, micro, self.plan.seq_length,
                                           self.plan.micro_batch)
        if hk is None:
            return [(h, None) for h in final]
        # its forward runs the micro-batches in order on every stage; k states each
        states, k = hk.teacher.take(), len(hk.teacher.layers)
        if len(states) != k * len(micro):
            raise RuntimeError(f"teacher hidden states: {len(states)} for {len(micro)} "
                               f"micro-batches of {k} layers")
        return [(h, states[i * k:(i + 1) * k]) for i, h in enumerate(final)]

    def _run_schedule(self, micro, forward_only: bool):
        self._hidden_sum_here = torch.zeros((), dtype=torch.float64, device=self.device)
        data = iter([(b, *t) for b, t in zip(micro, self._teacher(micro))])
        return self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=data, model=[self.ddp],
            num_microbatches=len(micro), seq_length=self.plan.seq_length,
            micro_batch_size=self.plan.micro_batch, forward_only=forward_only)

    def _reduce(self, reports, micro) -> dict:
        """Sums over the micro-batches of all DP ranks, on every rank."""
        from megatron.core import parallel_state as ps
        local = torch.zeros(5, dtype=torch.float64, device=self.device)
        for r in reports:
            local[:4] += r["sums"].double()
        local[2] += self._hidden_sum_here  # stages before the last: their layers' part
        tp = ps.get_tensor_model_parallel_world_size()
        local[:4] /= tp  # every TP rank of the last stage holds the same sums
        if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
            for b in micro:  # a fingerprint of the tokens this rank trained on
                tok = b["tokens"].double()
                local[4] += (tok * torch.arange(1, tok.shape[1] + 1, device=tok.device,
                                                dtype=torch.float64)).sum()
        dist.all_reduce(local)
        ce, kd, hid, n, checksum = local.tolist()
        alpha = self.loss_spec.kd_alpha if self.loss_spec else (
            self.args.distill.kd_alpha if self.teacher else 0.0)
        lm = ce / max(n, 1)
        kd_loss = kd / max(n, 1) if self.teacher else None
        loss = alpha * kd_loss + (1 - alpha) * lm if self.teacher else lm
        hidden_loss = None
        if self.hidden_kd is not None:
            hidden_loss = hid / max(n, 1)
            loss += self.hidden_kd.weight * hidden_loss
        return {"loss": loss, "lm_loss": lm, "kd_loss": kd_loss, "hidden_loss": hidden_loss,
                "tokens": n, "batch_checksum": checksum}

    # ------------------------------------------------------------------ step, eval, save
    def train_step(self, micro) -> dict:
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(micro, forward_only=False)
        lr = current_lr(self.optimizer)  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.plan.global_batch)
        out = self._reduce(reports, micro)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["skipped"] = not ok
        out["lr"] = lr
        return out

    @torch.no_grad()
    def evaluate(self, source, name: str) -> Optional[dict]:
        if source is None or self.args.eval.eval_iters < 1:
            return None
        self.ddp.eval()
        ce = kd = hid = n = 0.0
        for i in range(self.args.eval.eval_iters):
            micro = source.global_batch_at(i * self.plan.global_batch)
            r = self._reduce(self._run_schedule(micro, forward_only=True), micro)
            ce += r["lm_loss"] * r["tokens"]
            kd += (r["kd_loss"] or 0.0) * r["tokens"]
            hid += (r["hidden_loss"] or 0.0) * r["tokens"]
            n += r["tokens"]
        self.ddp.train()
        out = {"lm_loss": ce / max(n, 1), "ppl": ppl(ce / max(n, 1))}
        if self.teacher:
            out["kd_loss"] = kd / max(n, 1)
        if self.hidden_kd is not None:
            out["hidden_loss"] = hid / max(n, 1)
        it = self.state.iteration
        self.metrics.line(f" {name} at iteration {it}: lm loss {out['lm_loss']:.6f} | "
                          f"ppl {out['ppl']:.4f}"
                          + (f" | kd loss {out['kd_loss']:.6f}" if self.teacher else "")
                          + (f" | hidden loss {out['hidden_loss']:.6f}"
                             if "hidden_loss" in out else ""))
        self.metrics.scalars(it, out, prefix=f"{name}/")
        self.metrics.record({"eval": name, "iteration": it, **out})
        return out

    def save(self) -> None:
        c = self.args.checkpoint
        if not c.save:
            return
        t0 = time.time()
        p = self.args.parallel
        args = ckpt_mod.megatron_args(
            self.cfg, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
            dtype=self.dtype, divisible_by=self.source.divisible_by, impl=self.impl,
            first=p.decoder_first_pipeline_num_layers, last=p.decoder_last_pipeline_num_layers,
            base=self.source.args, state=self.state,
            training={"micro_batch_size": self.plan.micro_batch,
                      "global_batch_size": self.plan.global_batch,
                      "seq_length": self.plan.seq_length, "train_iters": self.plan.train_iters,
                      "lr": self.args.optim.lr, "min_lr": self.args.optim.min_lr,
                      "optimizer": self.args.optim.optimizer,
                      "seed": self.args.training.seed,
                      "data_path": list(self.args.data.data_path or []),
                      "split": self.args.data.split,
                      **{k: list(getattr(self.args.data, k)) for k in
                         ("train_data_path", "valid_data_path", "test_data_path")
                         if getattr(self.args.data, k)}})
        # LoRA: `model` is the merged plain Llama every tool reads; `lora` what resume needs
        merged = lora_mod.merged_state_dict(self.module) if self.lora else None
        extra = {"lora": lora_mod.resume_state(self.module, self.lora)} if self.lora else None
        ckpt_mod.save_checkpoint(c.save, model=self.ddp, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state=self.state, args=args,
                                 save_optim=not c.no_save_optim,
                                 tokenizer_dir=self._tokenizer_dir(),
                                 plan_file=hidden_distill.find_plan([self.source.weights]),
                                 model_state=merged, extra=extra)
        self.last_saved = self.state.iteration
        self.metrics.line(f" saved checkpoint at iteration {self.state.iteration} to {c.save} "
                          f"({time.time() - t0:.1f} s)")

    def _tokenizer_dir(self) -> Optional[Path]:
        """The tokenizer a checkpoint keeps: the source checkpoint's, else the one the flags
        name (a transformers directory, or a SentencePiece model made into one), so that a
        model trained from random init exports and evaluates without --tokenizer."""
        d = self.args.data
        if self.source.tokenizer_dir is not None or not d.tokenizer_model:
            return self.source.tokenizer_dir
        model = Path(d.tokenizer_model)
        if d.tokenizer_type == "HuggingFaceTokenizer" and model.is_dir():
            return model
        if d.tokenizer_type in SENTENCEPIECE_TYPES and model.is_file():
            if getattr(self, "_sp_tokenizer_dir", None) is None:
                self._sp_tokenizer_dir = Path(tempfile.mkdtemp(prefix="mp-tokenizer-"))
                atexit.register(shutil.rmtree, self._sp_tokenizer_dir, True)
                write_hf_sentencepiece_dir(model, self._sp_tokenizer_dir,
                                           self.cfg.max_position_embeddings)
            return self._sp_tokenizer_dir
        return None

    def _early_stop(self, val: Optional[dict]) -> bool:
        e = self.args.eval
        if val is None or e.early_stop_patience is None:
            return False
        s = self.state
        if s.best_val_loss is None or val["lm_loss"] < s.best_val_loss - e.early_stop_min_delta:
            s.best_val_loss, s.evals_without_improvement = val["lm_loss"], 0
            return False
        s.evals_without_improvement += 1
        return s.evals_without_improvement >= e.early_stop_patience

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        a, pl, s = self.args, self.plan, self.state
        self.last_saved = s.iteration if self.resume else None
        log_every = max(1, a.logging.log_interval)
        window_t, window_tokens, window_iters = 0.0, 0, 0
        history = []
        stop = None
        prof = None
        started = time.time()
        while s.iteration < pl.train_iters:
            prof = self._profile(prof, s.iteration + 1)
            t0 = time.perf_counter()
            micro = self.train_data.global_batch_at(s.consumed_train_samples)
            out = self.train_step(micro)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            s.iteration += 1
            s.consumed_train_samples += pl.global_batch
            s.consumed_tokens += pl.global_batch * pl.seq_length
            window_t += dt
            window_tokens += pl.global_batch * pl.seq_length
            window_iters += 1
            history.append(out["loss"])
            if s.iteration % log_every == 0 or s.iteration == pl.train_iters:
                self._log(out, window_t, window_tokens, window_iters)
                window_t, window_tokens, window_iters = 0.0, 0, 0
            val = None
            if a.eval.eval_interval and s.iteration % a.eval.eval_interval == 0:
                val = self.evaluate(self.valid_data, "validation")
            if self._early_stop(val):
                stop = (f"validation loss has not improved for {s.evals_without_improvement} "
                        "evaluations")
            if a.checkpoint.save_interval and s.iteration % a.checkpoint.save_interval == 0:
                self.save()
            if a.training.exit_interval and s.iteration % a.training.exit_interval == 0:
                stop = stop or f"--exit-interval {a.training.exit_interval}"
            if self._out_of_time(started):
                stop = stop or f"--exit-duration-in-mins {a.training.exit_duration_in_mins:g}"
            if stop:
                break
        self._profile(prof, None)
        if stop:
            self.metrics.line(f" stopping at iteration {s.iteration}: {stop}")
        test = None
        if not stop and self.test_data is not None and a.eval.eval_interval:
            test = self.evaluate(self.test_data, "test")
        if self.last_saved != s.iteration:
            self.save()
        self.metrics.close()
        return {"iteration": s.iteration, "losses": history, "test": test, "stopped": stop}

    def _out_of_time(self, started: float) -> bool:
        """--exit-duration-in-mins has passed on some rank (all ranks stop together)."""
        limit = self.args.training.exit_duration_in_mins
        if limit is None:
            return False
        late = torch.tensor([float(time.time() - started > 60 * limit)], device=self.device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def _profile(self, prof, iteration: Optional[int]):
        """--profile: start the torch profiler before iteration `profile_step_start`, stop it
        before `profile_step_end` (or at the end) and print the top kernels on rank 0."""
        lg = self.args.logging
        if not lg.profile:
            return None
        if prof is None and iteration == lg.profile_step_start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
            return prof
        if prof is not None and (iteration is None or iteration == lg.profile_step_end):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.metrics.line(prof.key_averages().table(sort_by=key, row_limit=30,
                                                        max_name_column_width=70))
            return None
        return prof

    def _log(self, out, seconds, tokens, iters) -> None:
        s = self.state
        tps = tokens / max(seconds, 1e-9)
        tflops = tps * self.flops_per_token / 1e12
        lr = out["lr"]
        mem = (f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
               if torch.cuda.is_available() else "")
        kd = f" | kd loss {out['kd_loss']:.6E}" if out["kd_loss"] is not None else ""
        if out["hidden_loss"] is not None:
            kd += f" | hidden loss {out['hidden_loss']:.6E}"
        self.metrics.line(
            f" iteration {s.iteration:8d}/{self.plan.train_iters:8d} | consumed samples "
            f"{s.consumed_train_samples:10d} | loss {out['loss']:.6E} | lm loss "
            f"{out['lm_loss']:.6E}{kd} | lr {lr:.4E} | grad norm {out['grad_norm']:.4f} | "
            f"{tps:,.0f} tokens/s | {tflops:.3g} TFLOP/s | "
            f"{1000 * seconds / max(iters, 1):.0f} ms/iter{mem}"
            + (" | skipped (non-finite grads)" if out["skipped"] else ""))
        record = {"iteration": s.iteration, "loss": out["loss"], "lm_loss": out["lm_loss"],
                  "kd_loss": out["kd_loss"], "hidden_loss": out["hidden_loss"], "lr": lr,
                  "grad_norm": out["grad_norm"],
                  "tokens_per_s": tps, "tflops": tflops,
                  "consumed_samples": s.consumed_train_samples,
                  "batch_checksum": out["batch_checksum"], "seconds": seconds / max(iters, 1),
                  "max_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                                  if torch.cuda.is_available() else None)}
        self.metrics.scalars(s.iteration, {k: v for k, v in record.items()
                                           if k not in ("iteration", "batch_checksum", "seconds")},
                             prefix="train/")
        self.metrics.record(record)


def train(args: TrainArgs) -> dict:
    """Run a whole training job on this rank (every rank of the launch calls it)."""
    args.validate()
    p = args.parallel
    env = init_distributed(p.tensor_model_parallel_size,
                                       p.pipeline_model_parallel_size, seed=args.training.seed)
    try:
        training_cpu_patches()
        with quiet_megatron_import():
            trainer = Trainer(args, env)
        return trainer.train()
    finally:
        destroy_distributed()
