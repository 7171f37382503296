"""LoRA in the trainer (`--lora-rank`), on CPU over gloo with the real megatron-core.

The runs are those of tests/test_train.py (stories260K converted to Megatron, Shakespeare),
with adapters of rank 4 on all four linear layers: TP=2 and DP=2 equal one process (and the
distributed optimizer, megatron-core's CUDA one, is refused on the CPU), only adapters move, the
merged checkpoint exports to a transformers Llama that computes what the trainer's unmerged
model computes, resume reproduces the uninterrupted run, distillation works, and what LoRA
does not combine with is refused.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from test_train import (ENV, ROOT, assert_same_curve, common, ok, records,  # noqa: E402
                        run_train, shakespeare, stories_tp1)

__all__ = ["shakespeare", "stories_tp1"]  # fixtures, imported for pytest to find

LORA = ["--lora-rank", 4, "--lora-alpha", 8]


def lora_flags(ckpt, data, tmp: Path, name: str, iters: int = 6):
    return common(ckpt, data, tmp, name, iters) + LORA


@pytest.fixture(scope="module")
def lora_run(stories_tp1, shakespeare, tmp_path_factory):
    """The 1-process LoRA run the other tests compare with and read."""
    tmp = tmp_path_factory.mktemp("lora")
    proc = ok(run_train(1, *lora_flags(stories_tp1, shakespeare, tmp, "lora"),
                        "--save", tmp / "save"))
    assert "LoRA rank 4, alpha 8 (scale 2) on linear_qkv,linear_proj,linear_fc1,linear_fc2" \
        in proc.stdout
    return tmp


def _rank_file(ckpt: Path, rank: str = "mp_rank_00") -> dict:
    from megatron_prune.checkpoint.megatron_dirs import read_tracker
    from megatron_prune.checkpoint.tensor_io import torch_load
    it = read_tracker(ckpt)
    return torch_load(ckpt / f"iter_{int(it):07d}" / rank / "model_optim_rng.pt", mmap_=False)


def _source_by_local_name(stories_tp1: Path) -> dict:
    """The start checkpoint's tensors (TE names) under the local-spec names LoRA trains with."""
    from megatron_prune.checkpoint import layout
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
    cfg = LegacyCheckpoint(stories_tp1).config
    ranges = [(0, cfg.num_layers)]
    te = layout.stage_entries(cfg, layout.TE, 0, ranges)
    local = layout.stage_entries(cfg, layout.LOCAL, 0, ranges)
    src = _rank_file(stories_tp1)["model"]
    return {lo.name: src[t.name] for lo, t in zip(local, te)}


# ---------------------------------------------------------------------------- tests
def test_only_adapters_train(lora_run, stories_tp1):
    """The base weights come back bit-identical (unmerged, in the `lora` entry; every
    untargeted tensor in `model`), the adapters moved, and `model` holds W + scale * B A."""
    saved = _rank_file(lora_run / "save")
    src = _source_by_local_name(stories_tp1)
    lora = saved["lora"]
    assert (lora["rank"], lora["alpha"]) == (4, 8.0)
    assert len(lora["base"]) == 5 * 4  # 5 layers x 4 targets
    for name, value in saved["model"].items():
        if not torch.is_tensor(value):
            continue  # _extra_state
        path = name.removesuffix(".weight")
        if path in lora["base"]:
            base, ad = lora["base"][path], lora["adapters"][path]
            assert torch.equal(base, src[name]), name
            assert ad["lora_b"].abs().max() > 0, name  # B started at zero and trained
            merged = base + 2.0 * ad["lora_b"] @ ad["lora_a"]
            torch.testing.assert_close(value, merged, rtol=0, atol=1e-6)
            assert not torch.equal(value, base)
        else:
            assert torch.equal(value, src[name]), name
    recs = records(lora_run / "lora.jsonl")
    assert [r["iteration"] for r in recs] == list(range(1, 7))


def test_tp2_equals_tp1(lora_run, stories_tp1, shakespeare, tmp_path):
    """TP=2 over 2 gloo processes: B split with column-parallel bases, A with row-parallel
    ones. The same samples, losses within CURVE_RTOL (1e-5; fp32 sums in another order: the
    measured gap is ~1e-7), and the merged checkpoints export to the same HF weights."""
    ok(run_train(2, *lora_flags(stories_tp1, shakespeare, tmp_path, "tp2"),
                 "--tensor-model-parallel-size", 2, "--save", tmp_path / "save"))
    assert_same_curve(records(lora_run / "lora.jsonl"), records(tmp_path / "tp2.jsonl"))
    one, two = _export(lora_run / "save", tmp_path / "hf1"), _export(tmp_path / "save",
                                                                      tmp_path / "hf2")
    from checks import hf_tensors
    a, b = hf_tensors(one), hf_tensors(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)



def _assert_base_unchanged_and_adapters_close(saved: dict, src: dict, ref: dict,
                                              atol: float = 1e-5) -> None:
    """`saved` (rank file of a parallel run): the base weights bit-identical to the start
    checkpoint's, and the adapters and merged weights within `atol` of `ref`'s (the 1-process
    run's) -- the same update, summed in another order."""
    lora, ref_lora = saved["lora"], ref["lora"]
    assert lora["base"].keys() == ref_lora["base"].keys() and len(lora["base"]) == 5 * 4
    for path, base in lora["base"].items():
        assert torch.equal(base, src[path + ".weight"]), path
        for name in ("lora_a", "lora_b"):
            torch.testing.assert_close(lora["adapters"][path][name],
                                       ref_lora["adapters"][path][name], rtol=0, atol=atol,
                                       msg=f"{path}.{name}")
    for name, value in saved["model"].items():
        if not torch.is_tensor(value):
            continue  # _extra_state
        if name.removesuffix(".weight") in lora["base"]:
            torch.testing.assert_close(value, ref["model"][name], rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(value, src[name]), name  # untargeted: frozen, bit for bit


def test_dp2_equals_dp1(lora_run, stories_tp1, shakespeare, tmp_path):
    """DP=2 over 2 gloo processes at the same global batch (8 = micro 2 x 2 accumulation x
    DP 2, against 2 x 4 in one process): megatron DDP's buffers hold the adapters' gradients
    alone, and their all-reduce (averaged over DP) makes the 1-process update. The same
    samples, losses within CURVE_RTOL (rel. 1e-5, as TP=2; fp32 sums in another order), grad
    norms within rel. 1e-4 and LRs equal (`assert_same_curve`); the base weights come back
    bit-identical and the adapters and merged weights within 1e-5 of the 1-process ones (seen:
    3e-7 and 1e-7; the losses part by ~1e-7, the size of the TP=2 gap). Without the all-reduce
    each rank would step on its own half-batch gradient: from iteration 1 the logged grad norm
    (rank 0's half) is not the full batch's, from iteration 3 (the LR is 0 at iteration 1,
    warmup) the losses part, and the ranks' adapters drift apart."""
    proc = ok(run_train(2, *lora_flags(stories_tp1, shakespeare, tmp_path, "dp2"),
                        "--save", tmp_path / "save"))
    assert "TP=1 PP=1 DP=2" in proc.stdout and "micro 2 x 2 accumulation x DP 2" in proc.stdout
    assert "LoRA rank 4" in proc.stdout
    one, two = records(lora_run / "lora.jsonl"), records(tmp_path / "dp2.jsonl")
    assert_same_curve(one, two)
    assert two[-1]["loss"] < two[0]["loss"]  # it trains
    saved = _rank_file(tmp_path / "save")
    assert len(saved["optimizer"]["optimizer"]["state"]) == 2 * 5 * 4  # adapters only
    _assert_base_unchanged_and_adapters_close(saved, _source_by_local_name(stories_tp1),
                                              _rank_file(lora_run / "save"))


def test_dp2_with_distributed_optimizer_refused_on_cpu(stories_tp1, shakespeare, tmp_path):
    """`--use-distributed-optimizer` is megatron-core's optimizer, which allocates CUDA
    tensors; on the CPU the trainer steps torch's AdamW over megatron DDP's buffers instead
    (train/optim.py), with LoRA or without. So LoRA at DP=2 with it is refused on the CPU with
    the reason, on every rank, before any iteration (exit code 2 from each worker), and the
    run's log stays empty. (With CUDA it is the default optimizer; no CPU test can run it.)"""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the distributed optimizer is megatron-core's and is not refused")
    proc = run_train(2, *lora_flags(stories_tp1, shakespeare, tmp_path, "dopt"),
                     "--use-distributed-optimizer")
    assert proc.returncode != 0
    assert proc.stderr.count("--use-distributed-optimizer needs CUDA") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "dopt.jsonl").exists() or not records(tmp_path / "dopt.jsonl")
    proc = run_train(1, *lora_flags(stories_tp1, shakespeare, tmp_path, "dopt"),
                     "--use-distributed-optimizer")
    assert proc.returncode == 2 and "--use-distributed-optimizer needs CUDA" in proc.stderr


def _export(ckpt: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", "megatron-to-hf", "--load",
                           str(ckpt), "--save", str(out)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


LOGITS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from megatron_prune.mcore.parallel import destroy_distributed, init_distributed
    from megatron_prune.train import arguments, model as model_mod, trainer as T

    if __name__ == "__main__":
        out = sys.argv[1]
        args = arguments.parse_args(sys.argv[2:])
        env = init_distributed(1, 1)
        T.training_cpu_patches()
        tr = T.Trainer(args, env)  # resumes the finished run: base and adapters, unmerged
        assert tr.resume and tr.state.iteration == 6
        batch = tr.train_data.global_batch_at(0)[0]
        tr.ddp.eval()
        with torch.no_grad():
            hidden = tr.module(batch["tokens"], batch["position_ids"],
                               batch.get("attention_mask"))
            logits = hidden @ model_mod.output_weight(tr.module).T
        torch.save({"tokens": batch["tokens"], "logits": logits[..., :tr.cfg.vocab_size]}, out)
        destroy_distributed()
""")


def test_merged_export_loads_in_transformers_with_the_trained_logits(
        lora_run, stories260k_hf, stories_tp1, shakespeare, tmp_path):
    """`megatron-to-hf` of the LoRA checkpoint is a plain Llama: transformers loads it, its
    weights are the start model's plus scale * B A put into HF's q/k/v and gate/up by
    `layout.unfuse` (a merge made here, apart from the trainer's), and its logits are those of
    the trainer's own model running the adapters unmerged."""
    from transformers import LlamaForCausalLM

    from checks import hf_tensors
    from megatron_prune.checkpoint import layout
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
    hf = _export(lora_run / "save", tmp_path / "hf")
    cfg = LegacyCheckpoint(stories_tp1).config
    lora = _rank_file(lora_run / "save")["lora"]
    expect = hf_tensors(stories260k_hf)
    for path, ad in lora["adapters"].items():
        spec = layout.layer_spec_of(path + ".weight")
        layer = int(path.split(".")[2])
        delta = (lora["alpha"] / lora["rank"]) * ad["lora_b"] @ ad["lora_a"]
        for name, part in zip(spec.hf_names(layer), layout.unfuse(spec, delta, cfg)):
            expect[name] = expect[name] + part
    got = hf_tensors(hf)
    assert got.keys() == expect.keys()
    for name in got:
        torch.testing.assert_close(got[name], expect[name], rtol=0, atol=1e-6, msg=name)

    script = tmp_path / "logits.py"
    script.write_text(LOGITS_SCRIPT)
    flags = lora_flags(stories_tp1, shakespeare, tmp_path, "again") + [
        "--load", lora_run / "save"]
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "logits.pt"),
                           *map(str, flags)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ours = torch.load(tmp_path / "logits.pt")
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ours["tokens"]).logits
    torch.testing.assert_close(theirs, ours["logits"], rtol=0, atol=1e-4)
    start = LlamaForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (start(ours["tokens"]).logits - theirs).abs().max() > 1e-2  # it trained


def test_resume_reproduces_uninterrupted_run(lora_run, stories_tp1, shakespeare, tmp_path):
    """Stop after iteration 4 (saved: merged model, base, adapters, optimizer state of the
    adapters only, RNG, data position) and resume: iterations 5 and 6 are bit-identical to the
    uninterrupted run's, and so is the final checkpoint."""
    save = tmp_path / "save"
    flags = lora_flags(stories_tp1, shakespeare, tmp_path, "run") + ["--save", save, "--load",
                                                                      save]
    ok(run_train(1, *flags, "--exit-interval", 4))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    saved = _rank_file(save)
    opt_state = saved["optimizer"]["optimizer"]["state"]
    assert len(opt_state) == 2 * 5 * 4  # A and B of 20 adapted layers: nothing else
    proc = ok(run_train(1, *flags))
    assert "resuming" in proc.stdout and "at iteration 4" in proc.stdout
    full = {r["iteration"]: r for r in records(lora_run / "lora.jsonl")}
    runs = records(tmp_path / "run.jsonl")
    assert [r["iteration"] for r in runs] == [1, 2, 3, 4, 5, 6]
    for r in runs:
        for key in ("loss", "grad_norm", "lr", "batch_checksum", "consumed_samples"):
            assert r[key] == full[r["iteration"]][key], (key, r)
    a, b = _rank_file(save)["model"], _rank_file(lora_run / "save")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_lora_with_logit_and_hidden_state_distillation(stories_tp1, shakespeare, tmp_path):
    """LoRA + KD of logits and hidden states at TP=2, the model distilled from itself: the
    student starts exactly at the teacher (B = 0), so the first KL and cosine distance are 0;
    the LM half of the loss then moves the adapters and the student away from its teacher."""
    proc = ok(run_train(2, *lora_flags(stories_tp1, shakespeare, tmp_path, "kd", iters=4),
                        "--teacher", stories_tp1, "--kd-alpha", 0.5, "--kd-hidden-weight", 1.0,
                        "--tensor-model-parallel-size", 2))
    assert "KD from" in proc.stdout and "LoRA rank 4" in proc.stdout
    recs = records(tmp_path / "kd.jsonl")
    assert recs[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert recs[0]["hidden_loss"] == pytest.approx(0.0, abs=1e-6)
    assert recs[0]["grad_norm"] > 0  # the LM loss's gradient reaches the adapters
    assert recs[-1]["kd_loss"] > 1e-6 and recs[-1]["hidden_loss"] > 1e-8


@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "0"], "--lora-rank must be positive, got 0"),
    (["--lora-rank", "-2"], "--lora-rank must be positive, got -2"),
    (["--lora-rank", "4", "--lora-target", "linear_qkv,linear_q"],
     "unknown layer 'linear_q'; valid: linear_qkv,linear_proj,linear_fc1,linear_fc2"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-alpha", "8"], "--lora-alpha / --lora-target need --lora-rank"),
    (["--lora-rank", "4", "--optimizer", "muon"], "--optimizer muon is not supported"),
    (["--lora-rank", "4", "--init", "random"], "--lora-rank with --init random"),
    (["--lora-rank", "4", "--sequence-parallel"], "does not support --sequence-parallel"),
    (["--lora-rank", "4", "--transformer-impl", "transformer_engine"],
     "needs the local layer spec"),
])
def test_refused_before_any_process_group(flags, message):
    from megatron_prune.checkpoint.config import ConfigError
    from megatron_prune.train.arguments import parse_args
    args = parse_args(["--pretrained-checkpoint", "ckpt", "--mock-data", "--train-iters", "1",
                       "--seq-length", "8", *flags])
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        args.validate()


def test_refusals_exit_2(lora_run, stories_tp1, shakespeare, tmp_path):
    """From the command line: exit code 2 and the reason; and a LoRA checkpoint is resumed
    only as LoRA with the same settings (or taken as weights with --finetune)."""
    proc = run_train(1, *common(stories_tp1, shakespeare, tmp_path, "x"), "--lora-rank", 0)
    assert proc.returncode == 2 and "--lora-rank must be positive" in proc.stderr
    proc = run_train(1, *common(stories_tp1, shakespeare, tmp_path, "x"), "--lora-rank", 4,
                     "--lora-target", "q_proj")
    assert proc.returncode == 2 and "unknown layer 'q_proj'" in proc.stderr
    resume = common(stories_tp1, shakespeare, tmp_path, "x") + ["--load", lora_run / "save"]
    proc = run_train(1, *resume)
    assert proc.returncode == 2 and "a LoRA run's checkpoint" in proc.stderr, proc.stderr[-2000:]
    proc = run_train(1, *resume, "--lora-rank", 8)
    assert proc.returncode == 2 and "saved with LoRA rank 4" in proc.stderr, proc.stderr[-2000:]
