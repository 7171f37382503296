"""Proven against the real Megatron-LM (../shared/peers/megatron-lm, core_v0.16.1), on the CPU.

A. Checkpoints that Megatron-LM's own `pretrain_gpt.py` wrote after 3 training iterations on mock
   data, with optimizer state (legacy `torch` and `torch_dist`; TP=1, TP=2, PP=2, DP=2 with the
   distributed optimizer; NullTokenizer and Llama2Tokenizer) are read by the project's tools:
   `megatron-to-hf` gives exactly Megatron-LM's tensors (padded vocab rows dropped, the
   compared tensors read with torch.load / torch.distributed.checkpoint, not the project's
   readers), `reshard` round-trips bit for bit, `prune` equals pruning the export, and the
   trainer starts from them.
B. Megatron-LM's own model builder and `load_checkpoint` (`--use-checkpoint-args`) load what
   `megatron-prune hf-to-megatron` / `prune` / `train` write (TP=1, TP=2, torch_dist resharded on
   load, Llama-3 RoPE, tied), and give the HF model's logits.

Megatron-LM runs through tests/megatron_lm.py (its CPU stand-ins: tests/megatron_lm_harness).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_lm as mlm
import megatron_lm_states as mlm_states
from checks import hf_tensors, write_indexed_dataset
from megatron_prune.cli import main

pytest.importorskip("megatron.core")
if not (mlm.PEER / "pretrain_gpt.py").is_file():
    pytest.skip(f"Megatron-LM is not at {mlm.PEER}", allow_module_level=True)

SHAPE = dict(heads=8, groups=4, head_dim=8)
VOCAB = mlm.NULL_VOCAB + 1  # Megatron-LM's NullTokenizer: --vocab-size ids and the EOD id


def assert_equal_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def export(load: Path, save: Path) -> dict:
    assert main(["megatron-to-hf", "--load", str(load), "--save", str(save)]) == 0
    return hf_tensors(save)


def tensors_of(states: dict) -> dict:
    return {k: v for k, v in states.items() if torch.is_tensor(v)}


# ---------------------------------------------------------------------------- A: fixtures
@pytest.fixture(scope="module")
def mlm_tp1(tmp_path_factory) -> Path:
    """pretrain_gpt.py, 1 process, legacy torch format, with optimizer state."""
    save = tmp_path_factory.mktemp("mlm_tp1") / "ckpt"
    mlm.pretrain(save, 1, "--ckpt-format", "torch")
    return save


@pytest.fixture(scope="module")
def mlm_tp2_dist(tmp_path_factory) -> Path:
    """pretrain_gpt.py, TP=2 over 2 gloo processes, torch_dist, distributed optimizer."""
    save = tmp_path_factory.mktemp("mlm_tp2_dist") / "ckpt"
    mlm.pretrain(save, 2, "--tensor-model-parallel-size", "2", "--ckpt-format", "torch_dist",
                 "--use-distributed-optimizer")
    return save


# ---------------------------------------------------------------------------- A: tests
def test_megatron_lm_checkpoint_to_hf_bit_exact(mlm_tp1, tmp_path):
    states = mlm_states.legacy_model_states(mlm_tp1)
    assert list(states) == [(0, 0)]
    saved = states[(0, 0)]
    assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 3
    assert saved["optimizer"]["state"], "no optimizer state saved"
    model = saved["model"]
    assert model["embedding.word_embeddings.weight"].shape[0] == 384  # 301 padded to 128
    got = export(mlm_tp1, tmp_path / "hf")
    want = mlm_states.hf_reference(tensors_of(model), vocab=VOCAB, **SHAPE)
    assert_equal_tensors(got, want)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    # the EOD token of NullTokenizer (id 300) is a real token; rows 301..383 are padding
    assert cfg["vocab_size"] == VOCAB
    assert cfg["rms_norm_eps"] == 1e-6  # --norm-epsilon (args.layernorm_epsilon)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 8)
    assert cfg["tie_word_embeddings"] is False


def test_megatron_lm_checkpoint_reshard_round_trip(mlm_tp1, tmp_path):
    assert main(["reshard", "--load", str(mlm_tp1), "--save", str(tmp_path / "tp2pp2"),
                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]) == 0
    assert len(mlm_states.legacy_model_states(tmp_path / "tp2pp2")) == 4
    assert main(["reshard", "--load", str(tmp_path / "tp2pp2"), "--save", str(tmp_path / "tp1"),
                 "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"]) == 0
    orig = tensors_of(mlm_states.legacy_model_states(mlm_tp1)[(0, 0)]["model"])
    back = tensors_of(mlm_states.legacy_model_states(tmp_path / "tp1")[(0, 0)]["model"])
    # Every real tensor and row comes back bit for bit. The padding rows (301..383) are not
    # kept: the project writes them as zeros (Megatron-LM's own converter fills them with copies
    # of the last row); they are never tokens.
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert not back[name][VOCAB:].any()
        back[name], orig[name] = back[name][:VOCAB], orig[name][:VOCAB]
    assert_equal_tensors(back, orig)
    # the TP=2 PP=2 copy exports to the same HF model
    assert_equal_tensors(export(tmp_path / "tp2pp2", tmp_path / "hf2"),
                         export(mlm_tp1, tmp_path / "hf1"))


def test_megatron_lm_checkpoint_prunes(mlm_tp1, tmp_path):
    from megatron_prune.prune.apply import PLAN_FILE, prune_hf
    assert main(["prune", "--load", str(mlm_tp1), "--save", str(tmp_path / "pruned"),
                 "--hidden-size-remain", "48", "--num-attention-heads-remain", "4",
                 "--ffn-hidden-size-remain", "64", "--drop-layers", "1",
                 "--importance", "magnitude"]) == 0
    got = export(tmp_path / "pruned", tmp_path / "pruned_hf")
    cfg = json.loads((tmp_path / "pruned_hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["vocab_size"]) == (1, 48, 64, 4, VOCAB)
    # the same plan applied to the HF export of Megatron-LM's checkpoint gives the same model
    export(mlm_tp1, tmp_path / "hf")
    prune_hf(tmp_path / "hf", tmp_path / "direct", plan_file=tmp_path / "pruned" / PLAN_FILE)
    assert_equal_tensors(got, hf_tensors(tmp_path / "direct"))


def train(load: Path, save: Path, tmp_path: Path, *extra) -> subprocess.CompletedProcess:
    """`megatron-prune train` (python -m megatron_prune.train), 1 process, on a small indexed
    dataset of NullTokenizer ids with EOD (300) ending each document."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, VOCAB - 1, (int(n),), generator=g).tolist() + [VOCAB - 1]
            for n in torch.randint(20, 80, (64,), generator=g)]
    data = write_indexed_dataset(tmp_path / "docs", docs)
    flags = ["--load", load, "--save", save, "--data-path", data,
             "--data-cache-path", tmp_path / "cache", "--tokenizer-type", "NullTokenizer",
             "--seq-length", 32, "--micro-batch-size", 2, "--global-batch-size", 4,
             "--log-json", tmp_path / "log.jsonl", *extra]
    return subprocess.run([sys.executable, "-m", "megatron_prune.train"] + [str(f) for f in flags],
                          capture_output=True, text=True, timeout=240, cwd=mlm.ROOT,
                          env=dict(mlm.peer_env("train"), PYTHONPATH=str(mlm.ROOT),
                                   MEGATRON_LM_HARNESS=""))


def test_trainer_starts_from_megatron_lm_checkpoint(mlm_tp1, tmp_path):
    """`megatron-prune train --load` a Megatron-LM checkpoint (it holds no project train state:
    weights only, a new run). With --lr 0 the weights it saves are Megatron-LM's, bit for bit,
    so they were loaded; the run really trained (loss logged each iteration)."""
    save = tmp_path / "run"
    proc = train(mlm_tp1, save, tmp_path, "--train-iters", 2, "--lr", 0.0, "--min-lr", 0.0,
                 "--weight-decay", 0.0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "eval" not in r]
    assert len(losses) == 2 and all(4.0 < x < 8.0 for x in losses), losses
    orig = tensors_of(mlm_states.legacy_model_states(mlm_tp1)[(0, 0)]["model"])
    after = tensors_of(mlm_states.legacy_model_states(save)[(0, 0)]["model"])
    assert_equal_tensors({k: after[k] for k in orig}, orig)


def test_megatron_lm_tp2_torch_dist_to_hf_bit_exact(mlm_tp2_dist, tmp_path):
    meta = json.loads((mlm_tp2_dist / "iter_0000003" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    full = mlm_states.dist_model_state(mlm_tp2_dist)
    assert any(k.startswith("optimizer.") for k in full), "no optimizer state saved"
    model = {k: v for k, v in full.items()
             if torch.is_tensor(v) and k.startswith(("embedding.", "decoder.", "output_layer."))}
    assert model["embedding.word_embeddings.weight"].shape[0] == 512  # 301 padded to 128 x 2
    want = mlm_states.hf_reference(model, vocab=VOCAB, **SHAPE)
    assert_equal_tensors(export(mlm_tp2_dist, tmp_path / "hf"), want)
    # and to the legacy format at TP=1: the same HF model again
    assert main(["reshard", "--load", str(mlm_tp2_dist), "--save", str(tmp_path / "tp1"),
                 "--tensor-model-parallel-size", "1"]) == 0
    assert_equal_tensors(export(tmp_path / "tp1", tmp_path / "hf1"), want)


def test_megatron_lm_args_round_trip_through_project_writer(mlm_tp1):
    """Megatron-LM's args (NullTokenizer --vocab-size 300, --norm-epsilon in layernorm_epsilon)
    read as 301 tokens and eps 1e-6, and stay so when the project rewrites them (reshard,
    prune and the trainer keep the source's args as `base`)."""
    from megatron_prune.checkpoint.config import ModelConfig
    args = mlm_states.legacy_model_states(mlm_tp1)[(0, 0)]["args"]
    assert (args.tokenizer_type, args.vocab_size, args.layernorm_epsilon) == (
        "NullTokenizer", mlm.NULL_VOCAB, 1e-6)
    cfg = ModelConfig.from_megatron_args(args)
    assert (cfg.vocab_size, cfg.norm_epsilon) == (VOCAB, 1e-6)
    again = cfg.to_megatron_args(tp=2, pp=1, dtype=torch.float32, base=args)
    assert again.vocab_size == mlm.NULL_VOCAB and again.padded_vocab_size == 512
    assert again.layernorm_epsilon == 1e-6
    assert ModelConfig.from_megatron_args(again) == cfg


def test_trainer_on_megatron_lm_torch_dist_checkpoint(mlm_tp2_dist, tmp_path):
    """The trainer reads the legacy format only: --load of Megatron-LM's torch_dist checkpoint
    is refused with the way out (reshard to torch), which then trains."""
    proc = train(mlm_tp2_dist, tmp_path / "run", tmp_path, "--train-iters", 1)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "reshard --ckpt-format torch" in proc.stderr, proc.stderr[-3000:]
    assert main(["reshard", "--load", str(mlm_tp2_dist), "--save", str(tmp_path / "legacy"),
                 "--ckpt-format", "torch"]) == 0
    proc = train(tmp_path / "legacy", tmp_path / "run", tmp_path, "--train-iters", 1,
                 "--tensor-model-parallel-size", 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "1"


@pytest.mark.slow
def test_megatron_lm_dp2_distributed_optimizer_to_hf(tmp_path):
    save = tmp_path / "ckpt"
    mlm.pretrain(save, 2, "--ckpt-format", "torch_dist", "--use-distributed-optimizer")
    full = mlm_states.dist_model_state(save)
    model = {k: v for k, v in full.items()
             if torch.is_tensor(v) and k.startswith(("embedding.", "decoder.", "output_layer."))}
    assert_equal_tensors(export(save, tmp_path / "hf"),
                         mlm_states.hf_reference(model, vocab=VOCAB, **SHAPE))


@pytest.mark.slow
@pytest.mark.parametrize("flag,ranks,merge", [
    ("--tensor-model-parallel-size", [(0, 0), (1, 0)], mlm_states.merge_tp),
    ("--pipeline-model-parallel-size", [(0, 0), (0, 1)], mlm_states.merge_pp)], ids=["tp2", "pp2"])
def test_megatron_lm_legacy_tp2_pp2_to_hf_bit_exact(tmp_path, flag, ranks, merge):
    save = tmp_path / "ckpt"
    mlm.pretrain(save, 2, flag, "2", "--ckpt-format", "torch")
    states = mlm_states.legacy_model_states(save)
    assert sorted(states) == ranks
    full = merge([tensors_of(states[r]["model"]) for r in ranks])
    assert_equal_tensors(export(save, tmp_path / "hf"),
                         mlm_states.hf_reference(full, vocab=VOCAB, **SHAPE))


@pytest.mark.slow
def test_megatron_lm_llama2_tokenizer_padding_dropped(tmp_path):
    """Llama2Tokenizer (32000 pieces) padded to 32256: Megatron-LM's args hold no vocab_size,
    only padded_vocab_size; the export drops the 256 padding rows."""
    tok = mlm.ROOT.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
    save = tmp_path / "ckpt"
    mlm.pretrain(save, 1, "--ckpt-format", "torch", "--make-vocab-size-divisible-by", "384",
                 tokenizer=["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tok])
    saved = mlm_states.legacy_model_states(save)[(0, 0)]
    assert saved["args"].vocab_size is None and saved["args"].padded_vocab_size == 32256
    got = export(save, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 32000
    assert_equal_tensors(got, mlm_states.hf_reference(tensors_of(saved["model"]), vocab=32000, **SHAPE))


# ---------------------------------------------------------------------------- B
TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
# All positions up to max_position_embeddings: RoPE scaling only shows at long distances.
LONG_TOKENS = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(2))
# fp32 on both sides: measured differences are ~3e-7 (the brief asks < 1e-4)
ATOL = 1e-5


def hf_logits(hf_dir: Path, tokens=TOKENS) -> torch.Tensor:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    from hf_models import make_hf_llama
    return make_hf_llama(tmp_path_factory.mktemp("hf_llama") / "hf")


def null_tokenizer_for(vocab: int) -> list:
    """A tokenizer Megatron-LM pads to the checkpoint's padded vocab (its NullTokenizer has
    --vocab-size + 1 ids)."""
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", vocab - 1]


def test_megatron_lm_loads_our_checkpoint_same_logits(hf_llama, tmp_path):
    ckpt = tmp_path / "meg"
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt),
                 "--transformer-impl", "local", "--dtype", "fp32"]) == 0
    out = mlm.megatron_lm_logits(ckpt, TOKENS, tmp_path, 1, *null_tokenizer_for(300),
                                 "--norm-epsilon", "1e-5")
    assert out["padded_vocab_size"] == 384 and out["tp"] == 1
    logits = out["logits"]
    assert logits.shape == (2, 16, 384)
    ref = hf_logits(hf_llama)
    assert (logits[..., :300] - ref).abs().max().item() < ATOL


@pytest.mark.slow
def test_megatron_lm_loads_our_tp2_checkpoint_same_logits(hf_llama, tmp_path):
    ckpt = tmp_path / "meg"
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt),
                 "--transformer-impl", "local", "--dtype", "fp32",
                 "--tensor-model-parallel-size", "2"]) == 0
    out = mlm.megatron_lm_logits(ckpt, TOKENS, tmp_path, 2, *null_tokenizer_for(300),
                                 "--norm-epsilon", "1e-5", "--use-mp-args-from-checkpoint-args")
    assert out["tp"] == 2 and out["logits"].shape == (2, 16, 512)
    assert (out["logits"][..., :300] - hf_logits(hf_llama)).abs().max().item() < ATOL


@pytest.mark.slow
def test_megatron_lm_loads_our_torch_dist_checkpoint_at_tp2_same_logits(hf_llama, tmp_path):
    """Our torch_dist checkpoint written at TP=1, loaded by Megatron-LM at TP=2 (its
    dist_checkpointing reshards on load)."""
    ckpt = tmp_path / "meg"
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt),
                 "--transformer-impl", "local", "--dtype", "fp32",
                 "--ckpt-format", "torch_dist"]) == 0
    out = mlm.megatron_lm_logits(ckpt, TOKENS, tmp_path, 2, *null_tokenizer_for(300),
                                 "--norm-epsilon", "1e-5", "--tensor-model-parallel-size", "2")
    assert out["tp"] == 2
    assert (out["logits"][..., :300] - hf_logits(hf_llama)).abs().max().item() < ATOL


@pytest.mark.slow
def test_megatron_lm_loads_what_our_trainer_made_of_its_checkpoint(mlm_tp1, tmp_path):
    """The full loop: Megatron-LM's checkpoint -> `megatron-prune train` (3 iterations) ->
    Megatron-LM's load_checkpoint gives the logits of our HF export of the trained model."""
    proc = train(mlm_tp1, tmp_path / "run", tmp_path, "--train-iters", 3, "--lr", 1e-3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    hf = tmp_path / "hf"
    export(tmp_path / "run", hf)
    out = mlm.megatron_lm_logits(tmp_path / "run", TOKENS, tmp_path, 1,
                                 *null_tokenizer_for(VOCAB), "--norm-epsilon", "1e-6")
    assert out["iteration"] == 3 and out["padded_vocab_size"] == 384
    assert (out["logits"][..., :VOCAB] - hf_logits(hf)).abs().max().item() < ATOL


@pytest.mark.slow
def test_megatron_lm_loads_our_pruned_checkpoint_same_logits(hf_llama, tmp_path):
    ckpt = tmp_path / "meg"
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt),
                 "--transformer-impl", "local", "--dtype", "fp32"]) == 0
    assert main(["prune", "--load", str(ckpt), "--save", str(tmp_path / "pruned"),
                 "--hidden-size-remain", "48", "--num-attention-heads-remain", "4",
                 "--num-query-groups-remain", "2", "--ffn-hidden-size-remain", "64",
                 "--drop-layers", "1", "--importance", "magnitude"]) == 0
    export(tmp_path / "pruned", tmp_path / "pruned_hf")
    out = mlm.megatron_lm_logits(tmp_path / "pruned", TOKENS, tmp_path, 1,
                                 *null_tokenizer_for(300), "--norm-epsilon", "1e-5")
    assert (out["logits"][..., :300] - hf_logits(tmp_path / "pruned_hf")).abs().max() < ATOL


@pytest.mark.slow
def test_megatron_lm_loads_llama3_rope_tied_same_logits(tmp_path):
    """Llama-3 RoPE scaling: Megatron-LM applies it with the factor only
    (rotary_pos_embedding.py:84 passes `factor`; low/high_freq_factor 1/4 and
    original_max_position_embeddings 8192 are fixed defaults of _apply_scaling, :92-98), so the
    HF model uses Llama 3.x's own values; with others Megatron-LM's model differs from HF's."""
    from hf_models import make_hf_llama
    hf = make_hf_llama(tmp_path / "hf", tie_word_embeddings=True, rope_theta=500000.0,
                       rms_norm_eps=1e-6,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    ckpt = tmp_path / "meg"
    assert main(["hf-to-megatron", "--hf-dir", str(hf), "--save", str(ckpt),
                 "--transformer-impl", "local", "--dtype", "fp32"]) == 0
    # Not restored by --use-checkpoint-args: without --norm-epsilon the difference is 8e-3,
    # without --use-rope-scaling 2.6e-4.
    out = mlm.megatron_lm_logits(ckpt, LONG_TOKENS, tmp_path, 1, *null_tokenizer_for(300),
                                 "--norm-epsilon", "1e-6", "--use-rope-scaling",
                                 "--rope-scaling-factor", "8.0")
    assert (out["logits"][..., :300] - hf_logits(hf, LONG_TOKENS)).abs().max().item() < ATOL
