"""The recovery trainer (`python -m megatron_prune.train`) on CPU over gloo, for real.

Every run is a real launch (one plain process, or torchrun with 2 gloo processes) of the real
stories260K model converted to Megatron, trained on an indexed dataset of Shakespeare tokenised
with its own tokenizer. Runs log one JSON line per iteration (`--log-json`), which the tests read.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megatron_prune.checkpoint import convert
from checks import write_indexed_dataset

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"
# the working tree's package, whatever an editable install elsewhere points at
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                     if p]))
# TP / DP / PP change only the order of floating-point sums (fp32): the curves agree to ~1e-6.
CURVE_RTOL = 1e-5


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shakespeare(stories260k_hf, tmp_path_factory) -> Path:
    """~60k tokens of Shakespeare, one document per speech, stories260K's tokenizer, EOS-ended."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_hf / "tokenizer.model"))
    text = SHAKESPEARE.read_text()[:200_000]
    docs = [sp.encode(d.strip()) + [sp.eos_id()] for d in text.split("\n\n") if d.strip()]
    return write_indexed_dataset(tmp_path_factory.mktemp("data") / "shakespeare", docs)


@pytest.fixture(scope="module")
def stories_tp1(stories260k_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories") / "tp1"
    convert.hf_to_megatron(stories260k_hf, out, tp=1)  # Transformer Engine names
    return out


def run_train(nproc: int, *flags, timeout: int = 240, log=None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "megatron_prune.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "megatron_prune.train"]
    return subprocess.run(launcher + [str(f) for f in flags], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def records(path: Path, key: str = "iteration") -> list:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "eval" not in r]


def common(ckpt, data, tmp: Path, name: str, iters: int = 6):
    return ["--pretrained-checkpoint", ckpt, "--data-path", data, "--seq-length", 64,
            "--micro-batch-size", 2, "--global-batch-size", 8, "--train-iters", iters,
            "--lr", 2e-3, "--min-lr", 1e-4, "--lr-warmup-iters", 2, "--clip-grad", 1.0,
            "--weight-decay", 0.1, "--log-json", tmp / f"{name}.jsonl",
            "--data-cache-path", tmp / "cache"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def baseline(stories_tp1, shakespeare, tmp_path_factory):
    """The 1-process run every parallel run is compared with (and exported in one test)."""
    tmp = tmp_path_factory.mktemp("baseline")
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp, "base"), "--save", tmp / "save",
                 "--eval-interval", 3, "--eval-iters", 1))
    return tmp


def assert_same_curve(a, b, rtol=CURVE_RTOL):
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["batch_checksum"] == rb["batch_checksum"], (ra, rb)  # the same samples
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=rtol), (ra, rb)
        assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=1e-4), (ra, rb)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)


# ---------------------------------------------------------------------------- tests
def test_baseline_learns_and_logs(baseline):
    recs = records(baseline / "base.jsonl")
    assert [r["iteration"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3  # it trains
    assert recs[0]["lr"] == 0.0 and recs[2]["lr"] == pytest.approx(2e-3)  # warmup, Megatron's
    assert recs[-1]["lr"] > 1e-4  # cosine towards --min-lr
    evals = [r for r in map(json.loads, (baseline / "base.jsonl").read_text().splitlines())
             if "eval" in r]
    assert [(e["eval"], e["iteration"]) for e in evals] == [
        ("validation", 3), ("validation", 6), ("test", 6)]
    assert evals[1]["ppl"] == pytest.approx(math.exp(evals[1]["lm_loss"]))
    assert evals[1]["lm_loss"] < evals[0]["lm_loss"]


def test_tp2_matches_single_process(baseline, stories_tp1, shakespeare, tmp_path):
    """TP=2 over 2 gloo processes (the TP=1 checkpoint resharded on load, TE names into the
    local spec) gives the 1-process loss curve, grad norms and LRs."""
    proc = ok(run_train(2, *common(stories_tp1, shakespeare, tmp_path, "tp2"),
                        "--tensor-model-parallel-size", 2))
    assert "TP=2 PP=1 DP=1" in proc.stdout
    assert_same_curve(records(baseline / "base.jsonl"), records(tmp_path / "tp2.jsonl"))


def test_dp2_matches_single_process(baseline, stories_tp1, shakespeare, tmp_path):
    """DP=2: each rank takes half of every global batch (2 micro-batches instead of 4), DDP
    all-reduces, and the curve is the 1-process one."""
    proc = ok(run_train(2, *common(stories_tp1, shakespeare, tmp_path, "dp2")))
    assert "TP=1 PP=1 DP=2" in proc.stdout and "micro 2 x 2 accumulation x DP 2" in proc.stdout
    assert_same_curve(records(baseline / "base.jsonl"), records(tmp_path / "dp2.jsonl"))


@pytest.mark.slow
def test_pp2_uneven_matches_single_process(baseline, stories_tp1, shakespeare, tmp_path):
    """PP=2 with a 3+2 layer split and the tied embedding shared across the stages."""
    ok(run_train(2, *common(stories_tp1, shakespeare, tmp_path, "pp2"),
                 "--pipeline-model-parallel-size", 2, "--decoder-first-pipeline-num-layers", 3))
    assert_same_curve(records(baseline / "base.jsonl"), records(tmp_path / "pp2.jsonl"))


def _kill9_after(cmd_flags, jsonl: Path, iteration: int, nproc: int = 1, timeout: int = 180):
    """Start a run, and kill -9 its whole process group once `iteration` has been logged."""
    launcher = [sys.executable, "-m", "megatron_prune.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "megatron_prune.train"]
    proc = subprocess.Popen(launcher + [str(f) for f in cmd_flags], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if jsonl.is_file() and any(r["iteration"] >= iteration for r in records(jsonl)):
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before iteration "
                                     f"{iteration}")
            time.sleep(0.05)
        else:
            raise AssertionError("timed out waiting for the run")
    finally:
        # torchrun starts its workers in sessions of their own: kill every descendant by pid
        import psutil
        victims = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for child in victims:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        psutil.wait_procs(victims, timeout=30)
    return proc


def test_kill9_then_resume_reproduces_uninterrupted_run(baseline, stories_tp1, shakespeare,
                                                        tmp_path):
    """kill -9 after iteration 5 (checkpoint at 4), resume with --load: iterations 5 and 6 come
    out bit-identical to the uninterrupted run (same samples, losses, grad norms, LRs), so
    optimizer state, LR schedule, RNG and data position were all restored."""
    save = tmp_path / "save"
    flags = common(stories_tp1, shakespeare, tmp_path, "run") + [
        "--save", save, "--save-interval", 4, "--load", save, "--eval-interval", 3,
        "--eval-iters", 1]
    _kill9_after(flags, tmp_path / "run.jsonl", 5)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    killed = records(tmp_path / "run.jsonl")
    proc = ok(run_train(1, *flags))
    assert "resuming" in proc.stdout and "at iteration 4" in proc.stdout
    resumed = records(tmp_path / "run.jsonl")[len(killed):]
    assert [r["iteration"] for r in resumed] == [5, 6]
    base = {r["iteration"]: r for r in records(baseline / "base.jsonl")}
    for r in killed + resumed:
        b = base[r["iteration"]]
        for key in ("loss", "grad_norm", "lr", "batch_checksum", "consumed_samples"):
            assert r[key] == b[key], (key, r, b)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"


@pytest.mark.slow
def test_kill9_then_resume_dp2_tp2(stories_tp1, shakespeare, tmp_path):
    """The same over 4 gloo processes (TP=2 x DP=2): torchrun and all its workers killed -9."""
    save = tmp_path / "save"
    flags = common(stories_tp1, shakespeare, tmp_path, "run") + [
        "--save", save, "--save-interval", 3, "--load", save, "--tensor-model-parallel-size", 2]
    ok(run_train(4, *common(stories_tp1, shakespeare, tmp_path, "full"),
                 "--tensor-model-parallel-size", 2))
    _kill9_after(flags, tmp_path / "run.jsonl", 4, nproc=4, timeout=300)
    killed = records(tmp_path / "run.jsonl")
    ok(run_train(4, *flags, timeout=300))
    resumed = records(tmp_path / "run.jsonl")[len(killed):]
    assert [r["iteration"] for r in resumed] == [4, 5, 6], ([r["iteration"] for r in killed], [r["iteration"] for r in resumed])
    full = {r["iteration"]: r for r in records(tmp_path / "full.jsonl")}
    for r in killed + resumed:
        for key in ("loss", "grad_norm", "lr", "batch_checksum"):
            assert r[key] == full[r["iteration"]][key], (key, r)


def test_export_to_hf_and_load(baseline, stories260k_hf, tmp_path):
    """The trained checkpoint exports with `megatron-prune megatron-to-hf` (tokenizer kept),
    loads in transformers, and computes what the trained megatron-core model computes."""
    save = baseline / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"
    hf = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", "megatron-to-hf", "--load",
                           str(save), "--save", str(hf)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (hf / "tokenizer.model").is_file()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    orig = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32)
    changed = max((a - b).abs().max().item() for a, b in
                  zip(model.state_dict().values(), orig.state_dict().values()))
    assert changed > 1e-4  # training moved the weights
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", "verify", "--hf-dir", str(hf),
                           "--load", str(save), "--tokens", "32", "--tolerance", "1e-4"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_kd_student_equal_teacher_gives_zero_loss(stories_tp1, shakespeare, tmp_path):
    """Distilling the model into itself, logits and hidden states: KL and the cosine distance
    are exactly 0 and, with --kd-alpha 1, so is every gradient (grad norm 0) at the first
    iteration; TP=2 over 2 processes."""
    proc = ok(run_train(2, *common(stories_tp1, shakespeare, tmp_path, "kd", iters=3),
                        "--teacher", stories_tp1, "--kd-temperature", 2.0,
                        "--kd-hidden-weight", 1.0, "--tensor-model-parallel-size", 2))
    assert "KD from" in proc.stdout and "vs teacher layers [0, 1, 2, 3, 4]" in proc.stdout
    first = records(tmp_path / "kd.jsonl")[0]
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["hidden_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["grad_norm"] < 1e-5
    assert first["lm_loss"] > 1.0  # the LM loss is still measured


GRADS_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from megatron_prune.checkpoint import layout
    from megatron_prune.train import arguments, trainer as T
    from megatron_prune.mcore.parallel import destroy_distributed, init_distributed
    from megatron.core import parallel_state as ps

    if __name__ == "__main__":
        student, teacher, data, out, tp = sys.argv[1:6]
        args = arguments.parse_args(sys.argv[6:] + [
            "--pretrained-checkpoint", student, "--teacher", teacher, "--data-path", data,
            "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "1", "--kd-temperature", "1.5", "--kd-alpha", "0.7",
            "--tensor-model-parallel-size", tp, "--loss-chunk-tokens", "40",
            "--data-cache-path", out + ".cache"])
        env = init_distributed(int(tp), 1)
        T.training_cpu_patches()
        tr = T.Trainer(args, env)
        micro = tr.train_data.global_batch_at(0)
        tr.ddp.zero_grad_buffer()
        r = tr._reduce(tr._run_schedule(micro, forward_only=False), micro)
        # gradients of every parameter, merged over TP into HF names through the layout table
        ranges = [(0, tr.cfg.num_layers)]
        entries = {e.name: e for e in layout.stage_entries(tr.cfg, tr.impl, 0, ranges)}
        grads = {}
        for name, p in tr.module.named_parameters():
            g = p.main_grad.clone()
            shards = [torch.empty_like(g) for _ in range(int(tp))]
            dist.all_gather(shards, g, group=ps.get_tensor_model_parallel_group())
            e = entries[name]
            grads.update(layout.merge_to_hf(e.spec, shards, tr.cfg, e.layer))
        if dist.get_rank() == 0:
            torch.save({"grads": grads, "loss": r, "tokens": [b["tokens"] for b in micro],
                        "loss_mask": [b["loss_mask"] for b in micro]}, out)
        destroy_distributed()
""")


def test_kd_gradients_tp2_equal_tp1(stories_tp1, shakespeare, tmp_path):
    """KD (T=1.5, mixed with the LM loss, alpha 0.7) from a different teacher (random, other
    shape, same vocab): the student's gradients at TP=2 — vocab-parallel softmax and KL with
    all-reduced max and sums, chunked — equal those at TP=1, parameter by parameter."""
    from hf_models import make_hf_llama
    teacher_hf = make_hf_llama(tmp_path / "teacher_hf", vocab_size=512, hidden_size=96,
                               intermediate_size=128, num_hidden_layers=2,
                               tie_word_embeddings=True)
    teacher = tmp_path / "teacher"
    convert.hf_to_megatron(teacher_hf, teacher, tp=1, impl="local")
    results = {tp: _run_grads_script(tmp_path, stories_tp1, teacher, shakespeare, tp)
               for tp in (1, 2)}
    g1, g2 = results[1]["grads"], results[2]["grads"]
    assert set(g1) == set(g2) and len(g1) == 2 + 5 * 9  # tied: no lm_head
    assert results[1]["loss"]["kd_loss"] > 0.1
    assert results[2]["loss"]["loss"] == pytest.approx(results[1]["loss"]["loss"], rel=1e-6)
    for name in g1:
        scale = g1[name].abs().max().item()
        assert scale > 0, name
        assert (g1[name] - g2[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name


def _run_grads_script(tmp_path, student, teacher, data, tp: int, *flags) -> dict:
    script = tmp_path / "grads.py"
    script.write_text(GRADS_SCRIPT)
    out = tmp_path / f"grads_tp{tp}.pt"
    launcher = [sys.executable] if tp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(launcher + [str(script), str(student), str(teacher), str(data),
                                      str(out), str(tp)] + [str(f) for f in flags],
                          capture_output=True, text=True, env=ENV, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


def _hf_layer_outputs(hf_dir, tokens, layers):
    """Outputs of some decoder layers of the Hugging Face model, [b, s, h] each."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    got = []
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o)) for i in layers]
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hooks:
        h.remove()
    return got


def test_hidden_state_kd_matches_hf_and_tp2_equals_tp1(stories260k_hf, stories_tp1,
                                                        shakespeare, tmp_path):
    """A pruned student (a layer dropped, hidden 64 -> 48) distilled from its own teacher with
    the hidden-state loss on three layers: the loss the trainer reports equals the cosine
    distance computed independently from the two exported Hugging Face models through the
    prune plan's layer and channel maps, and the gradients at TP=2 equal those at TP=1."""
    import torch.nn.functional as F

    from megatron_prune.prune.plan import PruneTarget
    from megatron_prune.prune.apply import prune_hf, prune_megatron
    target = PruneTarget(hidden_size=48, drop_layers=[2], num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=96)
    plan = prune_megatron(stories_tp1, tmp_path / "student", target, seed=0)
    prune_hf(stories260k_hf, tmp_path / "student_hf", plan_file=tmp_path / "student" /
             "prune_plan.json")
    flags = ["--kd-hidden-weight", "0.5", "--kd-hidden-layers", "0,1,-1"]
    res = {tp: _run_grads_script(tmp_path, tmp_path / "student", stories_tp1, shakespeare, tp,
                                 *flags) for tp in (1, 2)}
    r1 = res[1]["loss"]
    assert r1["hidden_loss"] > 1e-3
    assert r1["loss"] == pytest.approx(0.7 * r1["kd_loss"] + 0.3 * r1["lm_loss"]
                                       + 0.5 * r1["hidden_loss"], rel=1e-6)
    # the reference: student layers 0, 1, 3 are teacher layers 0, 1, 4 (layer 2 dropped)
    tokens = torch.cat(res[1]["tokens"])
    mask = torch.cat(res[1]["loss_mask"]).float()
    s = _hf_layer_outputs(tmp_path / "student_hf", tokens, [0, 1, 3])
    t = _hf_layer_outputs(stories260k_hf, tokens, [0, 1, 4])
    keep = torch.tensor(plan.keep_hidden)
    dist = sum(1 - F.cosine_similarity(a, b[..., keep], dim=-1) for a, b in zip(s, t)) / 3
    assert r1["hidden_loss"] == pytest.approx(((dist * mask).sum() / mask.sum()).item(),
                                              rel=1e-4)
    g1, g2 = res[1]["grads"], res[2]["grads"]
    assert res[2]["loss"]["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    for name in g1:
        scale = g1[name].abs().max().item()
        assert scale > 0, name
        assert (g1[name] - g2[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name


def test_recovered_checkpoint_keeps_the_prune_plan(stories_tp1, shakespeare, tmp_path):
    """A run from a pruned checkpoint saves its prune_plan.json beside the weights, so hidden-
    state distillation can go on from the recovered checkpoint (and a resume finds it)."""
    from megatron_prune.prune.plan import PruneTarget
    from megatron_prune.prune.apply import prune_megatron
    prune_megatron(stories_tp1, tmp_path / "pruned", PruneTarget(hidden_size=48,
                                                                 drop_layers=[1]), seed=0)
    hidden = ["--teacher", stories_tp1, "--kd-hidden-weight", 1]
    ok(run_train(1, *common(tmp_path / "pruned", shakespeare, tmp_path, "a", iters=3), *hidden,
                 "--save", tmp_path / "recovered"))
    plan = (tmp_path / "pruned" / "prune_plan.json").read_text()
    assert (tmp_path / "recovered" / "prune_plan.json").read_text() == plan
    proc = ok(run_train(1, *common(tmp_path / "recovered", shakespeare, tmp_path, "b", iters=3),
                        *hidden))
    assert f"mapped by {tmp_path / 'recovered' / 'prune_plan.json'}" in proc.stdout
    assert records(tmp_path / "b.jsonl")[-1]["hidden_loss"] > 0


def test_hidden_state_kd_refuses_what_it_cannot_do(stories_tp1, shakespeare, tmp_path):
    base = [*common(stories_tp1, shakespeare, tmp_path, "x"), "--teacher", stories_tp1]
    for flags, msg in ((["--kd-hidden-weight", 1, "--recompute-granularity", "full"],
                        "selective"),
                       (["--kd-hidden-layers", "1"], "needs --kd-hidden-weight"),
                       (["--kd-hidden-weight", 1, "--kd-hidden-layers", "7"], "outside")):
        proc = run_train(1, *base, *flags)
        assert proc.returncode == 2 and msg in proc.stderr, (flags, proc.stderr[-2000:])


@pytest.mark.parametrize("run, nproc, flags", [
    ("pp2", 2, ["--pipeline-model-parallel-size", 2]),
    pytest.param("tp2pp2", 4, ["--pipeline-model-parallel-size", 2,
                               "--tensor-model-parallel-size", 2],
                 marks=pytest.mark.slow)])  # (suite time: TP=2 alone is its own test)
def test_hidden_state_kd_pp2_matches_pp1(stories_tp1, shakespeare, tmp_path, run, nproc, flags):
    """Hidden-state distillation at PP=2, and at TP=2 x PP=2 (the teacher's stages cut to
    match the student's, the first stage's part of the loss backpropagated through the
    activation it sends on), trains as at PP=1: the same losses, hidden loss and grad norms,
    iteration by iteration."""
    from megatron_prune.prune.plan import PruneTarget
    from megatron_prune.prune.apply import prune_megatron
    prune_megatron(stories_tp1, tmp_path / "student", PruneTarget(hidden_size=48,
                                                                  drop_layers=[2]), seed=0)
    kd = ["--teacher", stories_tp1, "--kd-hidden-weight", 0.5, "--kd-alpha", 0.8]
    ok(run_train(1, *common(tmp_path / "student", shakespeare, tmp_path, "pp1"), *kd))
    proc = ok(run_train(nproc, *common(tmp_path / "student", shakespeare, tmp_path, run), *kd,
                        *flags, timeout=300))
    # student layers 0, 1 | 2, 3 are teacher layers 0, 1 | 3, 4: its stages hold 2 | 3
    assert "teacher stages of [2, 3] layers" in proc.stdout, proc.stdout[-2000:]
    a, b = records(tmp_path / "pp1.jsonl"), records(tmp_path / f"{run}.jsonl")
    assert a[0]["hidden_loss"] > 1e-3
    assert_same_curve(a, b)
    for ra, rb in zip(a, b):
        assert rb["hidden_loss"] == pytest.approx(ra["hidden_loss"], rel=1e-5), run


def test_teacher_stages_for_hidden_state_kd():
    from megatron_prune.checkpoint.config import ConfigError
    from megatron_prune.train.hidden_distill import LayerPairs, teacher_stage_counts
    dropped = LayerPairs((0, 1, 2, 3), (0, 1, 3, 4), None)  # teacher layer 2 pruned
    assert teacher_stage_counts(dropped, [4], 5) == [5]
    assert teacher_stage_counts(dropped, [2, 2], 5) == [2, 3]
    assert teacher_stage_counts(dropped, [1, 3], 5) == [1, 4]
    assert teacher_stage_counts(dropped, [2, 1, 1], 5) == [2, 2, 1]
    # only the compared layers bind: the last one alone leaves the split free
    assert teacher_stage_counts(LayerPairs((3,), (4,), None), [2, 2], 5) == [2, 3]
    assert teacher_stage_counts(LayerPairs((3,), (4,), None), [2, 2], 6) == [3, 3]
    # middle stages of 2 and 6 teacher layers: no Megatron split (its middle stages are even)
    tight = LayerPairs(tuple(range(6)), (0, 1, 2, 3, 8, 9), None)
    with pytest.raises(ConfigError, match="no Megatron pipeline split"):
        teacher_stage_counts(tight, [1, 2, 2, 1], 10)


def test_hidden_state_layer_map(stories260k_hf, tmp_path):
    """Which teacher layer and channels each student layer meets: from the plan, one to one for
    an unpruned student, and a clear error when neither applies."""
    from megatron_prune.checkpoint.config import ConfigError, ModelConfig
    from megatron_prune.prune.plan import PruneTarget
    from megatron_prune.prune.apply import prune_hf
    from megatron_prune.train import hidden_distill as hd
    teacher = ModelConfig.from_hf(json.loads((stories260k_hf / "config.json").read_text()))
    plan = prune_hf(stories260k_hf, tmp_path / "s", PruneTarget(hidden_size=48,
                                                                drop_layers=[0, 3]), seed=0)
    student = plan.target_config
    found = hd.find_plan([None, str(tmp_path / "nowhere"), str(tmp_path / "s")])
    pairs = hd.layer_pairs(student, teacher, found, hd.parse_layers("0,-1", 3))
    assert pairs.student == (0, 2) and pairs.teacher == (1, 4)
    assert pairs.channels.tolist() == plan.keep_hidden and len(plan.keep_hidden) == 48
    same = hd.layer_pairs(teacher, teacher, None, hd.parse_layers(None, 5))
    assert same.teacher == (0, 1, 2, 3, 4) and same.channels is None
    with pytest.raises(ConfigError, match="no prune_plan.json"):
        hd.layer_pairs(student, teacher, None, [0])
    with pytest.raises(ConfigError, match="prunes to 3 layers"):
        hd.layer_pairs(teacher, teacher, found, [0])
    with pytest.raises(ConfigError, match="layer numbers"):
        hd.parse_layers("1;2", 3)


def test_sdpa_attention_matches_megatron_local_attention(stories_tp1, shakespeare, tmp_path):
    """The SDPA core attention (default without Transformer Engine) trains exactly like
    megatron-core's own local DotProductAttention (GQA 8 heads / 4 groups)."""
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp_path, "local", iters=3),
                 "--core-attention", "local"))
    proc = ok(run_train(1, *common(stories_tp1, shakespeare, tmp_path, "sdpa", iters=3)))
    assert "SDPACoreAttention" in proc.stdout
    a, b = records(tmp_path / "local.jsonl"), records(tmp_path / "sdpa.jsonl")
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_random_init_from_scratch_exports(stories260k_hf, shakespeare, tmp_path):
    """--init random with shape flags (the baseline pruned models must beat): trains, loss
    falls from ~ln(vocab), and the checkpoint exports to HF with the SentencePiece tokenizer
    of the flags made into a transformers tokenizer."""
    save = tmp_path / "save"
    spm = stories260k_hf / "tokenizer.model"
    proc = ok(run_train(1, "--init", "random", "--num-layers", 2, "--hidden-size", 64,
                        "--ffn-hidden-size", 128, "--num-attention-heads", 4,
                        "--num-query-groups", 2, "--tokenizer-type", "Llama2Tokenizer",
                        "--tokenizer-model", spm, "--data-path", shakespeare, "--seq-length", 64, "--micro-batch-size", 4,
                        "--train-iters", 8, "--lr", 3e-3, "--save", save,
                        "--log-json", tmp_path / "r.jsonl", "--data-cache-path", tmp_path / "c"))
    assert "random init" in proc.stdout
    recs = records(tmp_path / "r.jsonl")
    assert abs(recs[0]["loss"] - math.log(512)) < 0.5
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    from megatron_prune.checkpoint.convert import megatron_to_hf
    cfg = megatron_to_hf(save, tmp_path / "hf")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups) == (2, 64, 2)
    import sentencepiece
    from transformers import AutoTokenizer
    text = "Once upon a time, there was a little girl."
    ids = sentencepiece.SentencePieceProcessor(model_file=str(spm)).encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == [1] + ids


def test_blend_and_early_stop(stories_tp1, shakespeare, tmp_path):
    """A weighted blend of two indexed datasets ('w1 p1 w2 p2'), and early stopping: with
    --lr 0 the validation loss cannot improve, so patience 2 stops the run at the third
    evaluation (and saves there)."""
    g = torch.Generator().manual_seed(0)
    other = write_indexed_dataset(tmp_path / "random", [
        torch.randint(3, 512, (int(n),), generator=g).tolist()
        for n in torch.randint(30, 200, (300,), generator=g)])
    save = tmp_path / "save"
    flags = common(stories_tp1, shakespeare, tmp_path, "es", iters=10)
    flags[flags.index("--data-path") + 1: flags.index("--data-path") + 2] = [
        "0.3", shakespeare, "0.7", other]
    flags[flags.index("--lr") + 1] = 0.0
    flags[flags.index("--min-lr") + 1] = 0.0
    proc = ok(run_train(1, *flags, "--eval-interval", 1, "--eval-iters", 1,
                        "--early-stop-patience", 2, "--save", save))
    assert "stopping at iteration 3: validation loss has not improved for 2" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert len(records(tmp_path / "es.jsonl")) == 3


def test_separate_validation_data_and_wall_time_exit(stories_tp1, shakespeare, tmp_path):
    """--train-data-path / --valid-data-path (Megatron-LM's): training samples are those of
    --data-path with all of it in the training split, and validation reads its own dataset
    (random tokens here: a far higher loss than Shakespeare). --exit-duration-in-mins stops
    the run after the first iteration that ends past the limit, and saves there."""
    g = torch.Generator().manual_seed(0)
    noise = write_indexed_dataset(tmp_path / "noise", [
        torch.randint(3, 512, (200,), generator=g).tolist() for _ in range(40)])
    ref = common(stories_tp1, shakespeare, tmp_path, "ref", iters=3)
    ok(run_train(1, *ref, "--split", "100,0,0"))
    flags = common(stories_tp1, shakespeare, tmp_path, "sep", iters=3)
    i = flags.index("--data-path")
    flags[i:i + 2] = ["--train-data-path", shakespeare, "--valid-data-path", noise]
    save = tmp_path / "save"
    proc = ok(run_train(1, *flags, "--eval-interval", 1, "--eval-iters", 1,
                        "--exit-duration-in-mins", 1e-6, "--save", save))
    assert "stopping at iteration 1: --exit-duration-in-mins" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    sep, base = records(tmp_path / "sep.jsonl"), records(tmp_path / "ref.jsonl")
    assert len(sep) == 1 and sep[0]["batch_checksum"] == base[0]["batch_checksum"]
    assert sep[0]["loss"] == pytest.approx(base[0]["loss"], rel=1e-6)
    val = [r for r in map(json.loads, (tmp_path / "sep.jsonl").read_text().splitlines())
           if r.get("eval") == "validation"]
    assert len(val) == 1 and val[0]["lm_loss"] > base[0]["loss"] + 1.0  # noise, not stories
    proc = run_train(1, *flags, "--data-path", shakespeare)
    assert proc.returncode == 2 and "replace --data-path" in proc.stderr


@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorboard"),
                    reason="tensorboard is not installed")
def test_tensorboard_logs(stories_tp1, shakespeare, tmp_path):
    ok(run_train(1, *common(stories_tp1, shakespeare, tmp_path, "tb", iters=3),
                 "--tensorboard-dir", tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_run_plan_from_tokens():
    from megatron_prune.train.arguments import parse_args
    from megatron_prune.train.setup import plan_run
    a = parse_args(["--data-path", "x", "--train-tokens", "1e6", "--seq-length", "1000",
                    "--micro-batch-size", "2", "--global-batch-size", "16",
                    "--tensor-model-parallel-size", "2"])
    plan = plan_run(a, world=8, default_seq=None)  # TP 2 -> DP 4
    assert (plan.dp, plan.num_microbatches, plan.train_iters) == (4, 2, 63)  # ceil(1e6 / 16000)
    assert plan.train_samples == 63 * 16


def test_fused_loss_matches_full_logits():
    """The chunked output-layer loss (CE, KD with temperature, their mix, padded vocab rows,
    masked tokens) equals the loss from full logits, and so do its gradients."""
    from megatron_prune.train.loss import LossSpec, fused_output_loss, reference_loss
    torch.manual_seed(0)
    n, h, vocab, padded = 37, 16, 50, 64
    for kd, alpha, temp in [(False, 0.0, 1.0), (True, 1.0, 1.0), (True, 0.5, 2.0),
                            (True, 0.3, 1.0)]:
        hid = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
        w = torch.randn(padded, h, dtype=torch.float64)
        w[vocab:] = 0
        w.requires_grad_()
        th = torch.randn(n, h, dtype=torch.float64) if kd else None
        tw = torch.randn(padded, h, dtype=torch.float64) if kd else None
        labels = torch.randint(0, vocab, (n,))
        mask = (torch.rand(n) > 0.2).float()
        spec = LossSpec(vocab_start=0, real_rows=vocab, chunk_tokens=8, kd_alpha=alpha,
                        temperature=temp)
        loss, ce, kdl = fused_output_loss(hid, w, labels, mask, spec, th, tw)
        (1.7 * loss).backward()
        gh, gw = hid.grad.clone(), w.grad.clone()
        hid.grad = w.grad = None
        ref, rce, rkd = reference_loss(hid @ w[:vocab].t(), labels, mask,
                                       th @ tw[:vocab].t() if kd else None, alpha, temp)
        (1.7 * ref).backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert ce.item() == pytest.approx(rce.item(), rel=1e-5)
        assert kdl.item() == pytest.approx(float(rkd), rel=1e-5, abs=1e-6)
        assert torch.allclose(gh, hid.grad, rtol=1e-5, atol=1e-5)
        assert torch.allclose(gw, w.grad, rtol=1e-5, atol=1e-5)
        assert gw[vocab:].abs().max() == 0  # padding rows are no tokens


def test_fused_loss_adds_weight_grad_into_main_grad():
    """Under megatron DDP (the weight has an fp32 `main_grad` and `grad_added_to_main_grad`),
    the output weight's gradient goes straight into main_grad, accumulating over micro-batches
    in fp32, and the weight is flagged so DDP's hook does not add it again; a weight shared
    with the embedding at PP = 1 (`zero_out_wgrad`) gets zeros back, so the embedding's own
    gradient stays exact."""
    from megatron_prune.train.loss import LossSpec, fused_output_loss
    torch.manual_seed(0)
    n, h, vocab, padded = 24, 16, 40, 48
    spec = LossSpec(vocab_start=0, real_rows=vocab, chunk_tokens=8)
    batches = [(torch.randn(n, h), torch.randint(0, vocab, (n,))) for _ in range(2)]
    w0 = torch.randn(padded, h)

    def run(weight, scale=1.0):
        for hid, labels in batches:
            loss, _, _ = fused_output_loss(hid, weight, labels, torch.ones(n), spec)
            (scale * loss).backward()

    plain = w0.clone().requires_grad_()
    run(plain, 0.5)  # autograd's own accumulation of the returned gradients
    ddp = w0.clone().requires_grad_()
    ddp.main_grad, ddp.grad_added_to_main_grad = torch.zeros(padded, h), False
    run(ddp, 0.5)
    assert ddp.grad_added_to_main_grad
    assert torch.allclose(ddp.main_grad, plain.grad, rtol=1e-6, atol=1e-7)
    assert ddp.main_grad[vocab:].abs().max() == 0 and ddp.main_grad.abs().max() > 0

    tied = w0.clone().requires_grad_()
    tied.main_grad, tied.grad_added_to_main_grad, tied.zero_out_wgrad = \
        torch.zeros(padded, h), False, True
    ids = torch.randint(0, vocab, (5,))
    loss, _, _ = fused_output_loss(torch.randn(n, h), tied, batches[0][1], torch.ones(n), spec)
    (loss + torch.nn.functional.embedding(ids, tied).sum()).backward()
    emb_grad = torch.zeros(padded, h).index_add_(0, ids, torch.ones(5, h))
    assert torch.equal(tied.grad, emb_grad)  # what DDP's hook then adds to main_grad


def test_user_errors_exit_2(stories_tp1, shakespeare, tmp_path):
    proc = run_train(1, "--pretrained-checkpoint", stories_tp1, "--train-iters", 1,
                     "--seq-length", 32)
    assert proc.returncode == 2 and "--data-path" in proc.stderr
    proc = run_train(1, *common(stories_tp1, tmp_path / "nothing", tmp_path, "x"))
    assert proc.returncode == 2 and "nothing.bin" in proc.stderr
    proc = run_train(1, *common(stories_tp1, shakespeare, tmp_path, "x"), "--bf16")
    if not torch.cuda.is_available():
        assert proc.returncode == 2 and "--bf16 needs CUDA" in proc.stderr
    proc = run_train(1, *common(stories_tp1, shakespeare, tmp_path, "x"),
                     "--global-batch-size", 7)
    assert proc.returncode == 2 and "not a multiple" in proc.stderr


def test_flag_names_are_megatrons():
    """The flags users know from Megatron-LM's pretrain_gpt.py keep their names."""
    from megatron_prune.train.arguments import flag_names, parse_args
    names = set(flag_names())
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--micro-batch-size", "--global-batch-size", "--seq-length", "--train-iters",
                 "--lr", "--min-lr", "--lr-warmup-iters", "--lr-decay-style", "--weight-decay",
                 "--clip-grad", "--bf16", "--load", "--save", "--save-interval",
                 "--eval-interval", "--eval-iters", "--data-path", "--split", "--tokenizer-type",
                 "--tokenizer-model", "--tensorboard-dir", "--seed", "--recompute-activations",
                 "--sequence-parallel", "--use-distributed-optimizer", "--train-tokens",
                 "--train-data-path", "--valid-data-path", "--test-data-path",
                 "--exit-duration-in-mins"):
        assert flag in names, flag
    a = parse_args(["--data-path", "0.3", "a", "0.7", "b", "--train-tokens", "12e9",
                    "--recompute-activations", "--tensor-model-parallel-size", "2"])
    assert a.data.data_path == ["0.3", "a", "0.7", "b"] and a.training.train_tokens == 12 * 10**9
    assert a.model.recompute_granularity == "selective"
    assert a.parallel.tensor_model_parallel_size == 2
    with pytest.raises(SystemExit):
        parse_args(["--tensor-model-paralel-size", "2"])
