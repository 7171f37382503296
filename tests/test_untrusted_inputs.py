"""Checkpoints and tokenizers from a stranger: opening one never runs its code, and a truncated,
bit-flipped or hostile file ends in a clear error (exit code 2) with nothing half-written.

Each case runs the real command in-process (`megatron_prune.cli.main`) on a real file the project
wrote (a small Llama in every format) or a real tokenizer of ../shared/data, mutated one way.
"""
from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hf_models import make_hf_llama
from megatron_prune.checkpoint import convert
from megatron_prune.cli import main

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing is the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """One valid input of each kind: HF dir, legacy and torch_dist Megatron checkpoints,
    three tokenizer kinds, a text to count tokens of."""
    root = tmp_path_factory.mktemp("originals")
    make_hf_llama(root / "hf")
    convert.hf_to_megatron(root / "hf", root / "legacy")
    convert.hf_to_megatron(root / "hf", root / "dist", ckpt_format="torch_dist")
    shutil.copy(TOKENIZERS / "llama2" / "tokenizer.model", root / "sp.model")
    shutil.copy(TOKENIZERS / "llama3" / "tokenizer.model", root / "tiktoken.model")
    shutil.copy(TOKENIZERS / "gpt-neox-20b" / "20B_tokenizer.json", root / "tokenizer.json")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    return root


# kind -> (the input directory to copy, the file in it to mutate, the command's argv)
def _convert_back(d, out):
    return ["megatron-to-hf", "--load", str(d), "--save", str(out)]


def _hf_in(d, out):
    return ["hf-to-megatron", "--hf-dir", str(d), "--save", str(out)]


def _vocab_freq(name):
    def argv(d, out):
        return ["vocab-freq", "--tokenizer", str(d / name), "--data", str(d / "text.txt"),
                "--save", str(out), "--workers", "1", "--no-progress"]
    return argv


TARGETS = {
    "legacy .pt": ("legacy", "iter_0000001/mp_rank_00/model_optim_rng.pt", _convert_back),
    "torch_dist .metadata": ("dist", "iter_0000001/.metadata", _convert_back),
    "torch_dist common.pt": ("dist", "iter_0000001/common.pt", _convert_back),
    "torch_dist shard": ("dist", "iter_0000001/__0_0.distcp", _convert_back),
    "safetensors": ("hf", "model.safetensors", _hf_in),
    "config.json": ("hf", "config.json", _hf_in),
    "sentencepiece": (None, "sp.model", _vocab_freq("sp.model")),
    "tiktoken": (None, "tiktoken.model", _vocab_freq("tiktoken.model")),
    "tokenizer.json": (None, "tokenizer.json", _vocab_freq("tokenizer.json")),
}


def _truncate(keep):
    def mutate(data: bytes, marker: Path) -> bytes:
        return data[:keep(len(data))]
    return mutate


def _flip(seed: int):
    """Flip one bit in the first 4 KiB, where a file's structure (headers, pickles) lives."""
    def mutate(data: bytes, marker: Path) -> bytes:
        rng = random.Random(seed)
        b = bytearray(data)
        i = rng.randrange(min(len(b), 4096))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    return mutate


def _hostile(data: bytes, marker: Path, name: str) -> bytes:
    """A file of the same kind that tries to run code (pickles) or to mislead the reader."""
    if name.endswith((".pt", ".distcp")):
        buf = io.BytesIO()
        torch.save({"model": _CreatesFile(marker), "args": _CreatesFile(marker)}, buf)
        return buf.getvalue()
    if name.endswith(".metadata"):
        return pickle.dumps(_CreatesFile(marker))
    if name.endswith(".safetensors"):  # a header length far past the end of the file
        return struct.pack("<Q", 1 << 40) + data[8:]
    if name == "config.json":
        cfg = json.loads(data)
        cfg.update(num_hidden_layers="__import__('os').system('touch x')", hidden_size=-64)
        return json.dumps(cfg).encode()
    if name == "tokenizer.json":
        return json.dumps({"model": {"type": "BPE", "vocab": {"a": "b"}, "merges": [1, 2]}}).encode()
    return b"\x00" * 64 + data[64:]  # sentencepiece / tiktoken: a corrupted head


MUTATIONS = {
    "unchanged": _truncate(lambda n: n),  # the control: every input as written must succeed
    "empty": _truncate(lambda n: 0),
    "half": _truncate(lambda n: n // 2),
    "tail cut": _truncate(lambda n: n - 7),
    "bit flip 1": _flip(1),
    "bit flip 2": _flip(2),
    "hostile": None,
}
FLIPS = {"bit flip 1", "bit flip 2"}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_bad_input_is_refused_cleanly(originals, tmp_path, target, mutation, capsys):
    src, name, argv = TARGETS[target]
    work = tmp_path / "in"
    if src is None:
        work.mkdir()
        for f in ("sp.model", "tiktoken.model", "tokenizer.json", "text.txt"):
            shutil.copy(originals / f, work / f)
    else:
        shutil.copytree(originals / src, work)
    marker = tmp_path / "code_ran"
    data = (work / name).read_bytes()
    mutate = MUTATIONS[mutation]
    bad = _hostile(data, marker, Path(name).name) if mutate is None else mutate(data, marker)
    (work / name).write_bytes(bad)
    out_parent = tmp_path / "out_parent"
    out_parent.mkdir()
    out = out_parent / "out"

    rc = main(argv(work, out))

    err = capsys.readouterr().err
    assert not marker.exists(), "opening the file ran its code"
    if mutation == "unchanged":
        assert rc == 0, err
    if rc == 0:  # a flipped bit in data the format cannot check (a weight, a vocab entry)
        assert mutation in FLIPS | {"unchanged"}, f"{target}/{mutation} was accepted"
        assert out.exists()
        return
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err
    assert list(out_parent.iterdir()) == [], "something was left half-written"


def test_hostile_dcp_metadata_runs_nothing(originals, tmp_path, capsys):
    """A `.metadata` that creates a file when unpickled: torch's own reader (a plain
    pickle.load) would create it; every command that opens the checkpoint refuses it, names the
    class and the file, and creates nothing."""
    ckpt = tmp_path / "dist"
    shutil.copytree(originals / "dist", ckpt)
    metadata = ckpt / "iter_0000001" / ".metadata"
    marker = tmp_path / "code_ran"
    metadata.write_bytes(pickle.dumps(_CreatesFile(marker)))

    with open(metadata, "rb") as f:  # what torch.distributed.checkpoint's reader does
        pickle.load(f).close()
    assert marker.exists()
    marker.unlink()

    for argv in (["megatron-to-hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")],
                 ["reshard", "--load", str(ckpt), "--save", str(tmp_path / "r"), "--tp", "1"],
                 ["prune", "--load", str(ckpt), "--save", str(tmp_path / "p"),
                  "--ffn-hidden-size-remain", "64"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "refused to unpickle builtins.open" in err or "refused to unpickle io.open" in err
        assert str(metadata) in err
        assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]


def test_real_dcp_metadata_reads_through_the_restricted_unpickler(originals):
    """What DCP writes (ours here; megatron-core's and Megatron-LM's in the compat tests) loads
    through the allowlist, equal to a plain pickle.load."""
    from megatron_prune.checkpoint.safe_pickle import load_dcp_metadata
    path = originals / "dist" / "iter_0000001" / ".metadata"
    with open(path, "rb") as f:
        want = pickle.load(f)
    assert load_dcp_metadata(path) == want
