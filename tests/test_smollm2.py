"""A real pretrained Llama through the whole pipeline: SmolLM2-135M-Instruct (../shared/data, a GGUF
of Q4_1 weights) imported through transformers' GGUF loader, converted at TP=3 (odd TP, tied
embeddings, GQA 9 heads / 3 groups) and TP=3·PP=2, checked against transformers, exported back
exactly; its BPE tokenizer through `preprocess` and vocabulary pruning. Facts from MANIFEST.md.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checks import hf_tensors
from megatron_prune.cli import main

pytest.importorskip("gguf")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = DATA / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCE = "Hello world, the quick brown fox."
SENTENCE_IDS = [19556, 905, 28, 260, 2365, 6354, 16438, 30]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def tp3(smollm2_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "tp3"
    assert main(["hf-to-megatron", "--hf-dir", str(smollm2_hf), "--save", str(out),
                 "--tensor-model-parallel-size", "3"]) == 0
    return out


def test_import_gives_the_manifest_model(smollm2_hf):
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"],
            cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == \
        (30, 576, 9, 3, 64, 1536, 49152, 100000.0, True)
    assert "quantization_config" not in cfg
    assert sum(t.numel() for t in hf_tensors(smollm2_hf).values()) == 134_515_008

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    assert tok(SENTENCE)["input_ids"] == SENTENCE_IDS
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    prompt = torch.tensor([[6403, 1980, 253, 655]])  # "Once upon a time"
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, 4:]) == ", the city of Nova Haven was a thriving metropolis, with"


def test_tp3_round_trip_is_exact(smollm2_hf, tp3, tmp_path):
    """Odd TP with tied embeddings and GQA: three ranks of whole KV groups, the 49152-row
    embedding padded to a multiple of 128 x 3; back to HF bit for bit."""
    shards = sorted(p.parent.name for p in tp3.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    assert shards == ["mp_rank_00", "mp_rank_01", "mp_rank_02"]
    assert main(["megatron-to-hf", "--load", str(tp3), "--save", str(tmp_path / "back")]) == 0
    a, b = hf_tensors(smollm2_hf), hf_tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tp3_pp2_reshard_round_trip_is_exact(tp3, tmp_path):
    assert main(["reshard", "--load", str(tp3), "--save", str(tmp_path / "pp2"),
                 "--tensor-model-parallel-size", "3", "--pipeline-model-parallel-size", "2"]) == 0
    assert main(["reshard", "--load", str(tmp_path / "pp2"), "--save", str(tmp_path / "back"),
                 "--tensor-model-parallel-size", "3", "--pipeline-model-parallel-size", "1"]) == 0
    for f in sorted(tp3.glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        g = tmp_path / "back" / f.relative_to(tp3)
        x = torch.load(f, weights_only=False)["model"]
        y = torch.load(g, weights_only=False)["model"]
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x if torch.is_tensor(x[k]))


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 2])
def test_verify_logits_against_transformers(smollm2_hf, tp3, tmp_path, pp):
    """megatron-core at TP=3 (and TP=3·PP=2, six gloo processes) against transformers."""
    load = tp3
    if pp == 2:
        load = tmp_path / "pp2"
        assert main(["reshard", "--load", str(tp3), "--save", str(load),
                     "--pipeline-model-parallel-size", "2"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={3 * pp}", "-m", "megatron_prune", "verify", "--hf-dir",
           str(smollm2_hf), "--load", str(load), "--tokens", "32", "--batch", "1",
           "--tolerance", "1e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"TP=3 PP={pp}" in proc.stdout and "PASS" in proc.stdout, proc.stdout
    assert "top-1 agreement 1.0000" in proc.stdout
    assert float(re.findall(r"max abs error (\S+)", proc.stdout)[0]) < 1e-3  # measured 5.5e-5


def test_bpe_tokenizer_through_preprocess_and_vocab_pruning(smollm2_hf, tmp_path):
    """Its tokenizer as a user passes it: `preprocess --tokenizer-type HuggingFaceTokenizer`
    gives transformers' ids; `vocab-freq` + `prune-vocab` + `prune-embeddings` keep the tokens of
    a text, and the pruned model gives the original's logits on it at the mapped ids."""
    text = (DATA / "wikitext-2" / "valid.txt").read_text()[:20000]
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": SENTENCE}) + "\n")
    assert main(["preprocess", "--input", str(tmp_path / "doc.jsonl"), "--output-prefix",
                 str(tmp_path / "ds"), "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", str(smollm2_hf), "--workers", "1"]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert list(np.asarray(ds[0])) == SENTENCE_IDS  # no EOD without --append-eod

    (tmp_path / "text.txt").write_text(text)
    assert main(["vocab-freq", "--tokenizer", str(smollm2_hf), "--data", str(tmp_path / "text.txt"),
                 "--save", str(tmp_path / "freq.json"), "--workers", "1", "--no-progress"]) == 0
    assert main(["prune-vocab", "--tokenizer", str(smollm2_hf), "--freq", str(tmp_path / "freq.json"),
                 "--coverage", "1.0", "--save", str(tmp_path / "vocab")]) == 0
    assert main(["prune-embeddings", "--map", str(tmp_path / "vocab"), "--hf-dir", str(smollm2_hf),
                 "--save", str(tmp_path / "small")]) == 0
    old_to_new = json.loads((tmp_path / "vocab" / "vocab_map.json").read_text())["old_to_new"]
    kept = [old for old, new in enumerate(old_to_new) if new >= 0]
    assert len(kept) < 49152 // 4

    from transformers import AutoModelForCausalLM, AutoTokenizer
    old_tok = AutoTokenizer.from_pretrained(smollm2_hf)
    new_tok = AutoTokenizer.from_pretrained(tmp_path / "small")
    sample = text[:400]
    old_ids, new_ids = old_tok(sample)["input_ids"], new_tok(sample)["input_ids"]
    assert [kept[i] for i in new_ids] == old_ids
    with torch.no_grad():
        old = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)(
            torch.tensor([old_ids])).logits[0][:, kept]
        new = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)(
            torch.tensor([new_ids])).logits[0]
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_bad_gguf_is_refused_with_nothing_written(tmp_path, capsys):
    """A truncated GGUF, and a GGUF of another architecture (the same file with its
    general.architecture rewritten), each end in a clear error and no output directory."""
    truncated = tmp_path / "truncated.gguf"
    with open(GGUF, "rb") as f:
        truncated.write_bytes(f.read(GGUF.stat().st_size // 3))
    other = tmp_path / "qwen.gguf"
    data = bytearray(GGUF.read_bytes())
    i = data.index(b"general.architecture")
    j = data.index(b"llama", i)
    data[j:j + 5] = b"qwen2"
    other.write_bytes(bytes(data))
    for path, message in ((truncated, "truncated"), (other, "architecture 'qwen2' is not supported")):
        assert main(["import-gguf", "--gguf", str(path), "--save", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.tmp-*"))
