"""Stage 2, teacher: a probe run sets the iteration count, then the teacher trains for a fixed time."""
from __future__ import annotations


import json
import time
from pathlib import Path


from prune_recover_stages.protocol import Protocol
from prune_recover_stages.runner import Runner, TRACKER, TRAIN, _jsonl


# ---------------------------------------------------------------------------- 2. teacher
def _data_flags(data: dict) -> list:
    return ["--train-data-path", data["train"], "--valid-data-path", data.get("valid"),
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", data.get("spm")]


def _teacher_flags(p: Protocol, data: dict, iters: int) -> list:
    t = p.teacher
    return TRAIN + [
        "--init", "random", "--num-layers", t.layers, "--hidden-size", t.hidden,
        "--num-attention-heads", t.heads, "--num-query-groups", t.groups,
        "--ffn-hidden-size", t.ffn, "--untie-embeddings-and-output-weights",
        "--seq-length", p.seq_length, "--max-position-embeddings", p.seq_length,
        "--micro-batch-size", p.teacher_micro_batch,
        "--global-batch-size", p.teacher_global_batch, "--train-iters", iters,
        "--lr", p.teacher_lr, "--min-lr", p.teacher_lr / 10,
        "--lr-warmup-iters", max(1, iters // 20), "--lr-decay-style", "cosine",
        "--weight-decay", 0.1, "--clip-grad", 1.0, "--seed", 1234,
        *_data_flags(data), *(["--bf16"] if p.bf16 else [])]


def probe_teacher(r: Runner, p: Protocol, data: dict) -> None:
    """The teacher's recipe for a few iterations, to time an iteration. It runs alone, after
    tokenization: run beside the tokenizer processes it measured iterations ~20% slower than
    the teacher then ran, and the teacher trained 140-160 s of its 170."""
    r.run(*probe_job(r, p, data))


def probe_job(r: Runner, p: Protocol, data: dict, name: str = "teacher") -> tuple:
    """(job name, argv) of a teacher's probe, logging to WORK/NAME_probe.jsonl (`name`: one of
    several teachers probed side by side, each timing its share of the GPU)."""
    probe = r.work / f"{name}_probe.jsonl"
    return f"{name}_probe", _teacher_flags(p, data, p.teacher_probe_iters) + [
        "--log-interval", max(1, p.teacher_probe_iters // 6), "--log-json", probe]


def _spm(data_dir: Path) -> Path:
    return data_dir / "tokenizers" / "llama2" / "tokenizer.model"


def train_teacher(r: Runner, p: Protocol, data: dict) -> dict:
    saved = r.work / "teacher_summary.json"
    if r.reuse and saved.is_file() and (r.work / "teacher" / TRACKER).is_file():
        summary = json.loads(saved.read_text())
        r.say(f"  reusing the teacher of an earlier call ({summary['iterations']} iterations)")
        return {**summary, "log": r.work / "teacher.jsonl"}
    probe_teacher(r, p, data)
    iters, per_iter = teacher_iterations(r, p)
    t0 = time.time()
    r.run("teacher", teacher_job(r, p, data, iters))
    summary = teacher_summary(r, p, iters, per_iter, t0)
    saved.write_text(json.dumps({k: v for k, v in summary.items() if k != "log"}))
    return summary


def teacher_iterations(r: Runner, p: Protocol, name: str = "teacher") -> tuple:
    """(iterations that fit --teacher-seconds, seconds per iteration), from the probe's log."""
    recs = [x for x in _jsonl(r.work / f"{name}_probe.jsonl") if "eval" not in x]
    steady = recs[len(recs) // 2:]  # after compilation / allocator warm-up
    per_iter = sum(x["seconds"] for x in steady) / len(steady)
    # evaluations take ~eval_iters forward passes of a global batch every eval_interval steps
    eval_share = p.eval_iters / (3 * p.eval_interval)
    iters = max(2, int(p.teacher_seconds / (per_iter * (1 + eval_share))))
    r.say(f"  probe{'' if name == 'teacher' else ' ' + name}: {per_iter * 1000:.0f} "
          f"ms/iteration -> {iters} iterations in {p.teacher_seconds:.0f} s")
    return iters, per_iter


def teacher_job(r: Runner, p: Protocol, data: dict, iters: int, name: str = "teacher") -> list:
    """The teacher's training command: saved to WORK/NAME, logged to WORK/NAME.jsonl."""
    log = r.work / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    return _teacher_flags(p, data, iters) + [
        "--log-interval", 10, "--log-json", log, "--save", r.work / name,
        "--eval-interval", max(1, iters // 8), "--eval-iters", p.eval_iters,
        "--exit-duration-in-mins", 1.05 * p.teacher_seconds / 60]


def teacher_summary(r: Runner, p: Protocol, iters: int, per_iter: float, t0: float,
                    name: str = "teacher") -> dict:
    """What a teacher's run did (iterations, tokens, seconds), from its log."""
    log = r.work / f"{name}.jsonl"
    recs = [x for x in _jsonl(log) if "eval" not in x]
    done = recs[-1]["iteration"]
    train_s = sum(x["seconds"] * n for x, n in zip(recs, _window_sizes(recs)))
    return {"iterations": done, "planned_iterations": iters, "ms_per_iteration": per_iter * 1e3,
            "tokens": done * p.teacher_global_batch * p.seq_length,
            "train_seconds": train_s, "process_seconds": time.time() - t0, "log": log}


def _window_sizes(recs: list) -> list:
    prev, out = 0, []
    for x in recs:
        out.append(x["iteration"] - prev)
        prev = x["iteration"]
    return out
