"""Proof against the real Megatron-LM (../shared/peers/megatron-lm, core_v0.16.1).

Megatron-LM's own checkpoint converter, argument loader and model read what this project
writes, and this project reads what Megatron-LM writes, compared exactly. Megatron-LM runs in
subprocesses (tests/megatron_lm.py); docs/compat.md tabulates what holds and what differs.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import make_hf_llama
from megatron_lm import (PEER, SCRIPTS, assert_same_weights, convert, rank_files, requires_peer,
                         run_peer)

pytestmark = requires_peer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Small random Llamas: GQA untied, tied embeddings, and Llama-3 RoPE (theta 500000, scaling)
# with an epsilon other than Megatron-LM's default, so a dropped field shows.
MODELS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True, "num_key_value_heads": 8},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "rms_norm_eps": 1e-6,
               "max_position_embeddings": 16384},
}


def cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_llama(root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(MODELS.items())}


def to_megatron(hf, out, tp, pp, impl="local", *extra):
    cli("hf-to-megatron", "--hf-dir", hf, "--save", out, "--tensor-model-parallel-size", tp,
        "--pipeline-model-parallel-size", pp, "--transformer-impl", impl, "--dtype", "fp32", *extra)
    return out


def their_reshard(load, save, tp, pp, vocab):
    return convert(load, save, loader="core", saver="core", tp=tp, pp=pp,
                   extra=["--loader-transformer-impl", "local", "--saver-transformer-impl", "local",
                          "--position-embedding-type", "rope", "--true-vocab-size", vocab])


def our_reshard(load, save, tp, pp):
    cli("reshard", "--load", load, "--save", save, "--tensor-model-parallel-size", tp,
        "--pipeline-model-parallel-size", pp, "--transformer-impl", "local")
    return save


# ---------------------------------------------------------------- their converter reads ours
# Tied embeddings are read from PP=1 only: Megatron-LM's converter builds every pipeline stage
# in one process, and GPTModel asserts that a last stage sharing the embedding is not also a
# first stage (language_module.py:216), which in one process it always is. (An upstream limit.)
@pytest.mark.parametrize("name,source,target", [("gqa", (2, 2), (1, 1)), ("tied", (2, 1), (1, 1)),
                                                ("llama3", (2, 2), (2, 1))])
def test_their_converter_reads_our_checkpoint(hf_models, tmp_path, name, source, target):
    """Megatron-LM's convert.py (--loader core --saver core) reads our output and writes, at
    another TP/PP, exactly what our reshard writes."""
    ours = to_megatron(hf_models[name], tmp_path / "ours", *source)
    theirs = their_reshard(ours, tmp_path / "theirs", *target, vocab=300)
    assert_same_weights(our_reshard(ours, tmp_path / "ours_re", *target), theirs, vocab_size=300)


def test_their_converter_reads_our_pruned_checkpoint(hf_models, tmp_path):
    ours = to_megatron(hf_models["gqa"], tmp_path / "ours", 2, 2)
    cli("prune", "--load", ours, "--save", tmp_path / "pruned", "--hidden-size-remain", 48,
        "--num-attention-heads-remain", 4, "--num-query-groups-remain", 2,
        "--ffn-hidden-size-remain", 64, "--drop-layers", "1,2", "--importance", "magnitude")
    theirs = their_reshard(tmp_path / "pruned", tmp_path / "theirs", 1, 1, vocab=300)
    assert_same_weights(our_reshard(tmp_path / "pruned", tmp_path / "ours_re", 1, 1), theirs,
                        vocab_size=300)


def test_our_te_names_are_megatron_lm_te_schema(hf_models, tmp_path):
    """Megatron-LM cannot build a Transformer Engine model here (no TE on these machines), so
    the TE-named output is checked against the names its converter uses for TE models
    (tools/checkpoint/schema_core.py, CoreTESchema)."""
    ours = to_megatron(hf_models["gqa"], tmp_path / "ours", 1, 1, "transformer_engine")
    names = json.loads(run_peer([SCRIPTS / "te_schema_names.py", 4, 1]).strip().splitlines()[-1])
    model = rank_files(ours)[(0, 0)]["model"]
    weights = {k for k, v in model.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    assert weights == set(names)
