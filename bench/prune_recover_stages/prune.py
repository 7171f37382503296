"""Stage 3, prune: importance by every method, then `megatron-prune prune` of the teacher."""
from __future__ import annotations


from pathlib import Path
from typing import Dict, List, Optional


from prune_recover_stages.protocol import Protocol, _flag
from prune_recover_stages.runner import CLI, Runner, TRACKER, _slug


# ---------------------------------------------------------------------------- 3. prune
def _method(key: str) -> str:
    """The importance method of a pruned model's key ("activation", or "activation:TAG" for
    a --prune-variant)."""
    return key.split(":", 1)[0]


def prune_flags(p: Protocol, method: str, scores: Optional[Path], extra: tuple = ()) -> list:
    """`megatron-prune prune` flags that choose what a method keeps, then a --prune-variant's
    `extra` flags (its --drop-layers replaces the method's choice of layers)."""
    s, t = p.student, p.teacher
    flags = ["--importance", method, "--seed", 0] + (["--scores", scores] if scores else [])
    if method == "magnitude":
        # weight norms say nothing about a whole layer; drop, without data, the layers
        # just before the last (the deep layers are the most redundant: Gromov et al. 2024)
        layers = ["--drop-layers", ",".join(str(i) for i in range(s.layers - 1, t.layers - 1))]
    else:
        layers = ["--num-layers-remain", s.layers]
    # the prune command takes one of the two: a variant's own list of layers wins
    own = {"--drop-layers", "--drop_layers"} & {str(x) for x in extra}
    return flags + ([] if own else layers) + list(extra)


def prune_all(r: Runner, p: Protocol, data: dict, methods: List[str],
              prune_variants: Optional[Dict[str, List[str]]] = None) -> dict:
    """Importance of the teacher, then one pruned model per method and per --prune-variant
    (METHOD:TAG, pruned from METHOD's scores with extra prune flags): {key: checkpoint}."""
    teacher = r.work / "teacher"
    scores = {}
    jobs = {}
    for m in methods:
        if m in ("activation", "taylor"):
            scores[m] = r.work / f"scores_{m}.pt"
            if r.reuse and scores[m].is_file():
                continue
            jobs[f"importance_{m}"] = CLI + [
                "importance", "--load", teacher, "--data", data["calibration"],
                "--importance", m, "--samples", p.calib_samples, "--seq-length", p.seq_length,
                "--micro-batch-size", 4, "--layer-loss", "--save", scores[m], "--force"]
    r.run_many(jobs, parallel=2)
    s = p.student
    todo = {m: () for m in methods}
    todo.update({k: tuple(v) for k, v in (prune_variants or {}).items()})
    out = {k: r.work / f"pruned_{_slug(k)}" for k in todo}
    jobs = {f"prune_{k}": CLI + [
        "prune", "--load", teacher, "--save", out[k], "--hidden-size-remain", s.hidden,
        "--num-attention-heads-remain", s.heads, "--num-query-groups-remain", s.groups,
        "--ffn-hidden-size-remain", s.ffn, "--force",
        *prune_flags(p, _method(k), scores.get(_method(k)), extra)]
        for k, extra in todo.items() if not (r.reuse and (out[k] / TRACKER).is_file())}
    r.run_many(jobs, parallel=4)
    return out


def finished_runs(r: Runner, jobs: Dict[str, list]) -> List[str]:
    """--reuse: the recoveries an earlier call finished (their checkpoint saved at their last
    iteration), which are not run again."""
    out = []
    for name, argv in jobs.items():
        tracker = r.work / "recovered" / _slug(name) / TRACKER
        if r.reuse and tracker.is_file() and \
                tracker.read_text().strip() == str(_flag(argv, "--train-iters", -1)):
            out.append(name)
    return out
