"""The prune plan that rebuilds a peer's pruned model from the teacher, found by matching weights.

Minitron and torch-pruning both prune by selection: every tensor of their output is a (possibly
reordered) subset of the teacher's rows and columns. So the output is one of our PrunePlans
(keep lists in any order), and `megatron-prune prune-hf --plan` rebuilds it bit for bit. The
benchmark uses this to take every system's student to a GPU as a few kilobytes of JSON instead
of its weights (a device call carries at most 64 MiB). `derive` fails loudly when a tensor is not
a selection, and `main` checks that the plan reproduces every tensor exactly.

    python bench/peers/as_plan.py --teacher teacher_hf --student minitron_W --save plan.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402
from megatron_prune.checkpoint.convert import HFSource  # noqa: E402
from megatron_prune.checkpoint.hf import HFCheckpoint  # noqa: E402
from megatron_prune.prune.apply import PrunedSource  # noqa: E402
from megatron_prune.prune.plan import PrunePlan  # noqa: E402


def match_rows(sub: torch.Tensor, full: torch.Tensor, what: str) -> list:
    """Index into `full`'s rows of each row of `sub` (exact equality, by bytes)."""
    where = {}
    for i, row in enumerate(full):
        where.setdefault(row.numpy().tobytes(), i)
    out = []
    for j, row in enumerate(sub):
        i = where.get(row.numpy().tobytes())
        if i is None:
            raise SystemExit(f"{what}: row {j} of the student is no row of the teacher")
        out.append(i)
    return out


def match_blocks(sub: torch.Tensor, full: torch.Tensor, d: int, what: str) -> list:
    """Index of each d-row block of `sub` among the d-row blocks of `full`."""
    flat = lambda t: t.reshape(t.shape[0] // d, -1)  # noqa: E731
    return match_rows(flat(sub), flat(full), what)


def derive(teacher: HFSource, student: HFSource) -> PrunePlan:
    t, s = teacher.config, student.config
    d, hpg = t.head_dim, t.heads_per_group
    g = lambda src, name: src.get(name).float()  # noqa: E731
    hidden = match_rows(g(student, "model.embed_tokens.weight").T,
                        g(teacher, "model.embed_tokens.weight").T, "embedding columns")
    cols = torch.tensor(hidden)
    layers, groups, heads, ffn = [], [], [], []
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        q_s = g(student, p + "self_attn.q_proj.weight")
        # the teacher layer whose query rows (at the kept columns) hold the student's first head
        cand = [j for j in range(t.num_layers) if _has_rows(
            q_s[:d], g(teacher, f"model.layers.{j}.self_attn.q_proj.weight")[:, cols])]
        if len(cand) != 1:
            raise SystemExit(f"student layer {i}: matches teacher layers {cand}")
        j = cand[0]
        tp = f"model.layers.{j}."
        tw = lambda n: g(teacher, tp + n)[:, cols]  # noqa: E731
        kv = match_blocks(g(student, p + "self_attn.k_proj.weight"), tw("self_attn.k_proj.weight"),
                          d, f"layer {i} k_proj")
        qh = match_blocks(q_s, tw("self_attn.q_proj.weight"), d, f"layer {i} q_proj")
        per = s.num_attention_heads // s.num_query_groups
        kept_heads = []
        for gi, grp in enumerate(kv):
            mine = qh[gi * per:(gi + 1) * per]
            if any(h // hpg != grp for h in mine):
                raise SystemExit(f"layer {i}: a query head left its KV group")
            kept_heads.append([h % hpg for h in mine])
        layers.append(j)
        groups.append(kv)
        heads.append(kept_heads)
        ffn.append(match_rows(g(student, p + "mlp.gate_proj.weight"), tw("mlp.gate_proj.weight"),
                              f"layer {i} gate_proj"))
    return PrunePlan(source=_cfg(t), target=_cfg(s), keep_layers=layers, keep_hidden=hidden,
                     keep_groups=groups, keep_heads=heads, keep_ffn=ffn, method="derived",
                     prune_type="global", layer_method="derived")


def _has_rows(block: torch.Tensor, full: torch.Tensor) -> bool:
    return block.shape[1] == full.shape[1] and \
        any(torch.equal(block, full[k:k + len(block)]) for k in range(0, len(full), len(block)))


def _cfg(c: ModelConfig) -> dict:
    from dataclasses import asdict
    return asdict(c)


def check(plan: PrunePlan, teacher: HFSource, student: HFSource) -> int:
    """Every student tensor equals the plan applied to the teacher; the number checked."""
    rebuilt = PrunedSource(teacher, plan)
    names = rebuilt.keys()
    for name in names:
        a, b = rebuilt.get(name).float(), student.get(name).float()
        if a.shape != b.shape or not torch.equal(a, b):
            raise SystemExit(f"{name}: the plan does not reproduce the student")
    return len(names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--save", type=Path, required=True)
    a = p.parse_args(argv)
    teacher, student = HFSource(HFCheckpoint(a.teacher)), HFSource(HFCheckpoint(a.student))
    plan = derive(teacher, student)
    n = check(plan, teacher, student)
    plan.save(a.save)
    print(f"{a.save}: {n} tensors of {a.student} reproduced exactly from {a.teacher}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
