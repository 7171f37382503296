"""import-llama2c: real llama2.c files (stories260K, Llama-2 tokenizer.bin) in ../shared/data."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.checkpoint import llama2c
from megatron_prune.cli import main
from checks import cli_fails

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K"
LEGACY, V1 = STORIES / "stories260K.bin", STORIES / "stories260K_v1.bin"
TOK = STORIES / "tok512.bin"

# shared/data/MANIFEST.md: the documented greedy sample of stories260K begins with this.
MANIFEST_PREFIX = ("Once upon a time, there was a little girl named Lily. She loved to play "
                   "outside in the park. One day, she saw a big, red ball. She wanted to play "
                   "with it, but it was too high.")
# llama2.c's test_all.py `expected_stdout`: `./run stories260K.bin -z tok512.bin -t 0.0 -n 200`,
# i.e. BOS then 200 greedy tokens (run.c's final aesthetic newline stripped).
RUNC_200 = (MANIFEST_PREFIX + "\nLily's mom said, \"Lily, let's go to the park.\" Lily was sad and "
            "didn't know what to do. She said, \"I want to play with your ball, but I can't find "
            "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't "
            "know what to do.\"\nLily didn't want to help her mom, so she")


def test_manifest_states_the_reference():
    assert MANIFEST_PREFIX in (DATA / "MANIFEST.md").read_text()


# ------------------------------------------------------------------------------- weights
def test_both_formats_import_to_identical_tensors(stories260k_hf):
    a, b = llama2c.Llama2cCheckpoint(LEGACY), llama2c.Llama2cCheckpoint(V1)
    assert (a.header.version, b.header.version) == (0, 1)
    assert a.config == b.config
    assert a.header.shared_classifier and b.header.shared_classifier
    sa, sb = a.hf_state_dict(), b.hf_state_dict()
    assert sorted(sa) == sorted(sb) and "lm_head.weight" not in sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    a.check_rope_table()  # the legacy file's stored freq_cis is theta=10000's

    written = load_file(stories260k_hf / "model.safetensors")
    assert sorted(written) == sorted(sa)
    for k in sa:
        assert written[k].dtype == torch.float32 and torch.equal(written[k], sa[k]), k
    cfg = json.loads((stories260k_hf / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"],
            cfg["max_position_embeddings"]) == (64, 172, 5, 8, 4, 512, 512)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 10000.0
    assert cfg["rms_norm_eps"] == 1e-5 and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_v1_cli_import_matches_legacy(stories260k_hf, tmp_path):
    assert main(["import-llama2c", "--checkpoint", str(V1), "--tokenizer", str(TOK),
                 "--save", str(tmp_path / "v1")]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (tmp_path / "v1" / name).read_bytes() == (stories260k_hf / name).read_bytes(), name


def _reference_logits(ck: llama2c.Llama2cCheckpoint, tokens: list) -> torch.Tensor:
    """llama2.c's model.py forward (interleaved-pair RoPE, repeat_kv), in float64."""
    h = ck.header
    hd, n_rep, eps = h.head_dim, h.n_heads // h.n_kv_heads, 1e-5
    arr = lambda n, i=None: ck.array(n, i).double()  # noqa: E731
    norm = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(len(tokens), dtype=torch.float64), freqs)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):  # x [s, heads, hd]; pairs (2i, 2i+1)
        r, i = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([r * cos - i * sin, r * sin + i * cos], -1).flatten(-2)

    x = arr("tok_emb")[tokens]
    s = len(tokens)
    mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(h.n_layers):
        y = norm(x, arr("rms_att", layer))
        q = rope((y @ arr("wq", layer).T).view(s, h.n_heads, hd))
        k = rope((y @ arr("wk", layer).T).view(s, h.n_kv_heads, hd)).repeat_interleave(n_rep, 1)
        v = (y @ arr("wv", layer).T).view(s, h.n_kv_heads, hd).repeat_interleave(n_rep, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(s, -1)
        x = x + o @ arr("wo", layer).T
        y = norm(x, arr("rms_ffn", layer))
        x = x + (torch.nn.functional.silu(y @ arr("w1", layer).T) * (y @ arr("w3", layer).T)) \
            @ arr("w2", layer).T
    x = norm(x, arr("rms_final"))
    return x @ arr("wcls" if not h.shared_classifier else "tok_emb").T


@pytest.fixture(scope="module")
def hf_model(stories260k_hf):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()


def test_hf_logits_match_llama2c_reference(hf_model):
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 13, 100, 7]
    ref = _reference_logits(llama2c.Llama2cCheckpoint(LEGACY), tokens)
    with torch.no_grad():
        got = hf_model(torch.tensor([tokens])).logits[0].double()
    assert (got - ref).abs().max().item() < 1e-4


def test_greedy_generation_reproduces_llama2c_sample(stories260k_hf, hf_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(stories260k_hf)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([[1]]), attention_mask=torch.ones(1, 1).long(),
                                do_sample=False, max_new_tokens=200, eos_token_id=None,
                                pad_token_id=0)
    ids = out[0].tolist()
    assert ids[0] == 1 and len(ids) == 201
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(text) >= 200
    assert text[:200] == RUNC_200[:200]
    assert text.startswith(MANIFEST_PREFIX)
    assert text == RUNC_200  # run.c's 200 greedy steps, exactly

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(stories260k_hf / "tokenizer.model"))
    assert sp.decode(ids[1:]) == RUNC_200


# ------------------------------------------------------------------------------- tokenizer
def test_tokenizer_encodes_sensibly(stories260k_hf):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(stories260k_hf / "tokenizer.model"))
    assert (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (512, 1, 2, 0)
    assert sp.pad_id() == -1
    ids = sp.encode("Once upon a time")
    assert [sp.id_to_piece(i) for i in ids] == ["▁Once", "▁upon", "▁a", "▁time"]
    assert sp.encode("a\nb", out_type=str) == ["▁a", "<0x0A>", "b"]  # byte fallback
    tok = AutoTokenizer.from_pretrained(stories260k_hf)
    assert tok("Once upon a time")["input_ids"] == [1] + ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in (MANIFEST_PREFIX, 'Lily said: "Hi!" 3.14 — émoji 🤖 中文\n\nx  y', "trail "):
        hf_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert hf_ids == sp.encode(text), text
        assert tok.decode(hf_ids) == sp.decode(hf_ids) == text


def test_llama2_tokenizer_bin_gives_back_llama2_tokenizer_model():
    """llama2.c's tokenizer.bin of the Llama-2 vocab -> the pieces, scores and types of Meta's
    tokenizer.model, hence its encodings (MANIFEST.md's reference ids)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    tok = llama2c.read_tokenizer(DATA / "tokenizers" / "llama2" / "tokenizer.bin", 32000)
    ours = llama2c.sentencepiece_model(tok)
    ref = pb.ModelProto()
    ref.ParseFromString((DATA / "tokenizers" / "llama2" / "tokenizer.model").read_bytes())
    assert len(ours.pieces) == len(ref.pieces) == 32000
    assert [(p.piece, p.score, p.type) for p in ours.pieces] == \
        [(p.piece, p.score, p.type) for p in ref.pieces]
    assert ours.normalizer_spec == ref.normalizer_spec
    sp = spm.SentencePieceProcessor(model_proto=ours.SerializeToString())
    assert sp.encode("Hello world, the quick brown fox.") == \
        [15043, 3186, 29892, 278, 4996, 17354, 1701, 29916, 29889]


# ------------------------------------------------------------------------------- formats
def _untied_copies(tmp_path) -> tuple:
    """stories260K with a separate classifier (0.5 * tok_emb), in both formats."""
    legacy_bytes, v1_bytes = LEGACY.read_bytes(), V1.read_bytes()
    emb = llama2c.Llama2cCheckpoint(LEGACY).array("tok_emb")
    wcls = (emb * 0.5).numpy().astype("<f4").tobytes()
    hdr = list(struct.unpack("<7i", legacy_bytes[:28]))
    hdr[5] = -hdr[5]  # legacy: negative vocab_size = untied classifier
    a = tmp_path / "untied_legacy.bin"
    a.write_bytes(struct.pack("<7i", *hdr) + legacy_bytes[28:] + wcls)
    b = tmp_path / "untied_v1.bin"
    b.write_bytes(v1_bytes[:36] + b"\0" + v1_bytes[37:] + wcls)  # shared_classifier byte = 0
    return a, b, emb


def test_untied_classifier_both_formats(tmp_path):
    a, b, emb = _untied_copies(tmp_path)
    ca, cb = llama2c.Llama2cCheckpoint(a), llama2c.Llama2cCheckpoint(b)
    assert not ca.header.shared_classifier and not cb.header.shared_classifier
    assert ca.config.vocab_size == 512 and not ca.config.tie_embeddings
    sa, sb = ca.hf_state_dict(), cb.hf_state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(sa["lm_head.weight"], emb * 0.5)

    from transformers import AutoModelForCausalLM
    llama2c.import_llama2c(a, None, tmp_path / "hf", dtype="bf16")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, (emb * 0.5).bfloat16().float())
    assert torch.equal(model.model.embed_tokens.weight, emb.bfloat16().float())


def test_permute_rope_matches_transformers_convention():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of dim 8
    p = llama2c.permute_rope(w, 4)
    for head in range(4):
        for i in range(4):  # pair i: rows 2i, 2i+1 -> rows i, i + 4
            assert torch.equal(p[head * 8 + i], w[head * 8 + 2 * i])
            assert torch.equal(p[head * 8 + i + 4], w[head * 8 + 2 * i + 1])


# ------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("src,cut", [(LEGACY, 1), (LEGACY, 4096), (V1, 4), (V1, 1040384 - 100)])
def test_truncated_checkpoint(tmp_path, capsys, src, cut):
    bad = tmp_path / "in" / src.name
    bad.parent.mkdir()
    bad.write_bytes(src.read_bytes()[:-cut])
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    cli_fails(["import-llama2c", "--checkpoint", str(bad), "--tokenizer", str(TOK),
                "--save", str(out)], out, capsys, "truncated")
    assert not out.exists()


def test_trailing_bytes_and_unsupported_version(tmp_path, capsys):
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    extra = tmp_path / "extra.bin"
    extra.write_bytes(LEGACY.read_bytes() + b"\0" * 4)
    cli_fails(["import-llama2c", "--checkpoint", str(extra), "--save", str(out)], out, capsys,
               "trailing bytes")
    v2 = tmp_path / "v2.bin"
    data = bytearray(V1.read_bytes())
    data[4:8] = struct.pack("<i", 2)
    v2.write_bytes(bytes(data))
    cli_fails(["import-llama2c", "--checkpoint", str(v2), "--save", str(out)], out, capsys,
               "unsupported export version 2")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 300)
    cli_fails(["import-llama2c", "--checkpoint", str(junk), "--save", str(out)], out, capsys,
               "not a llama2.c checkpoint")


def test_truncated_or_mismatched_tokenizer(tmp_path, capsys):
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    bad = tmp_path / "tok.bin"
    bad.write_bytes(TOK.read_bytes()[:-3])
    cli_fails(["import-llama2c", "--checkpoint", str(LEGACY), "--tokenizer", str(bad),
                "--save", str(out)], out, capsys, "truncated")
    cli_fails(["import-llama2c", "--checkpoint", str(LEGACY), "--tokenizer",
                str(DATA / "tokenizers" / "llama2" / "tokenizer.bin"), "--save", str(out)],
               out, capsys, "more pieces than the model's vocab_size=512")


def test_missing_files(tmp_path, capsys):
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    cli_fails(["import-llama2c", "--checkpoint", str(tmp_path / "nope.bin"), "--tokenizer",
                str(TOK), "--save", str(out)], out, capsys, "no such file")
    cli_fails(["import-llama2c", "--checkpoint", str(LEGACY), "--tokenizer",
                str(tmp_path / "nope_tok.bin"), "--save", str(out)], out, capsys, "no such file")


def test_non_empty_save_needs_force(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli_fails(["import-llama2c", "--checkpoint", str(LEGACY), "--tokenizer", str(TOK),
                "--save", str(out)], out, capsys, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["import-llama2c", "--checkpoint", str(LEGACY), "--tokenizer", str(TOK),
                 "--save", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["import-llama2c", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "--checkpoint" in out and "--tokenizer" in out
