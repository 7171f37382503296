"""Running the benchmark's commands: a job queue over the GPUs (or the CPU), each run's log."""
from __future__ import annotations


import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


from prune_recover_stages.protocol import ROOT


# ---------------------------------------------------------------------------- processes
class Runner:
    """Runs the project's commands as subprocesses, each logging to its own file."""

    def __init__(self, work: Path, log: Path, gpus: int = 0, reuse: bool = False):
        self.work, self.log, self.gpus = work, log, gpus
        # --reuse: what an earlier call left in WORK (data, teacher, pruned models, finished
        # recoveries) is kept, not made again
        self.reuse = reuse
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + [
                            p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.env.setdefault("OMP_NUM_THREADS", "1" if not _cuda() else "4")
        self.stage_seconds: Dict[str, float] = {}

    def say(self, msg: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {msg}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def output(self, name: str) -> Path:
        """A job's stdout and stderr (a run's name may carry '/', as in RUN@tokens1/2)."""
        return self.work / "logs" / f"{_slug(name)}.log"

    def start(self, name: str, argv: List[str], gpu: Optional[int] = None):
        out = open(self.output(name), "w")
        env = self.env if gpu is None else dict(self.env, CUDA_VISIBLE_DEVICES=str(gpu))
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        return proc, out, name

    def finish(self, job) -> None:
        proc, out, name = job
        rc = proc.wait()
        out.close()
        text = self.output(name).read_text(errors="replace")
        with open(self.log, "a") as f:
            f.write(f"\n===== {name} (exit {rc})\n{text[-20000:]}\n")
        if rc != 0:
            raise SystemExit(f"{name} failed (exit {rc}):\n{text[-4000:]}")

    def run(self, name: str, argv: List[str]) -> None:
        self.finish(self.start(name, argv))

    def run_many(self, jobs: Dict[str, List[str]], parallel: int,
                 optional: tuple = (), deadline: Optional[float] = None) -> list:
        """Run the jobs, at most `parallel` at a time on every GPU (jobs on one GPU share it;
        each job goes to the GPU running the fewest). A job named in `optional` is skipped
        when, judged by the longest finished job, it would end after `deadline` (a
        time.time()). Returns the names of the skipped jobs."""
        pending, running, skipped, took = list(jobs.items()), [], [], {}
        slots = max(1, self.gpus)
        while pending or running:
            while pending and len(running) < parallel * slots:
                name, argv = pending.pop(0)
                longest = max(took.values(), default=0.0)
                if name in optional and deadline and time.time() + longest > deadline:
                    self.say(f"  skip  {name}: it would end after the time budget")
                    skipped.append(name)
                    continue
                gpu = None
                if self.gpus > 1:
                    load = [sum(j[4] == g for j in running) for g in range(self.gpus)]
                    gpu = load.index(min(load))
                self.say(f"  start {name}" + (f" on GPU {gpu}" if gpu is not None else ""))
                running.append((*self.start(name, argv, gpu), time.time(), gpu))
            done = [j for j in running if j[0].poll() is not None]
            for j in done:
                running.remove(j)
                self.finish(j[:3])
                took[j[2]] = time.time() - j[3]
                self.say(f"  done  {j[2]} ({took[j[2]]:.0f} s)")
            if not done:
                time.sleep(0.5)
        return skipped

    def stage(self, name: str):
        runner = self

        class _Stage:
            def __enter__(self):
                runner.say(f"== {name}")
                self.t0 = time.time()

            def __exit__(self, *exc):
                runner.stage_seconds[name] = time.time() - self.t0
                if exc[0] is None:
                    runner.say(f"== {name}: {runner.stage_seconds[name]:.0f} s")
        return _Stage()


def _default_jobs(efficiency: bool, n: int) -> int:
    """Recoveries at a time on one GPU: the goal runs 3; the efficiency sweep all of them (its
    students are small and their steps CPU-bound, so a dozen share an H200 with the longest
    run the only one that sets the stage's time: docs/benchmarks.md)."""
    if not _cuda():
        return 1
    return max(1, n) if efficiency else 3


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


CLI = [sys.executable, "-m", "megatron_prune"]
TRACKER = "latest_checkpointed_iteration.txt"
TRAIN = [sys.executable, "-m", "megatron_prune.train"]



def _slug(name: str) -> str:
    """A run's name as a file name (variants carry '@', maybe ',')."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def _log(r: Runner, name: str) -> Path:
    return r.work / f"{_slug(name)}.jsonl"


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
