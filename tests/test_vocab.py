"""Vocabulary pruning (megatron_prune/vocab): real tokenizers pruned on real books, checkpoints after them.

Tokenizers and text come from ../shared/data: Llama-2's SentencePiece model, Llama-3's tiktoken
ranks, GPT-NeoX's tokenizer.json, stories260K's 512-piece model, and the first seven Gutenberg
books of the archive (five to count on, two held out), streamed out of the .tar.xz.
"""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_models import make_hf_llama
from megatron_prune.vocab import hf_vocab
from megatron_prune.vocab.corpus import iter_gutenberg
from megatron_prune.vocab.freq import FreqCounts, count_frequencies
from megatron_prune.vocab.prune import prune_vocab
from megatron_prune.vocab.select import select_tokens
from megatron_prune.vocab.load import load_vocabulary
from megatron_prune.vocab.vocab_map import VocabMap
from megatron_prune.checkpoint import convert
from megatron_prune.cli import main
from megatron_prune.checkpoint.legacy import LegacyCheckpoint
from megatron_prune.checkpoint.megatron_dirs import checkpoint_format

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GUTENBERG = DATA / "corpus" / "gutenberg_en.tar.xz"
TOKENIZERS = {
    "llama2": DATA / "tokenizers" / "llama2" / "tokenizer.model",
    "llama3": DATA / "tokenizers" / "llama3" / "tokenizer.model",
    "neox": DATA / "tokenizers" / "gpt-neox-20b" / "20B_tokenizer.json",
}
KINDS = {"llama2": "sentencepiece", "llama3": "tiktoken", "neox": "hf-bpe"}
OUT_OF_DOMAIN = [
    "日本語のテキストと中文混合，还有한국어도 있습니다。",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — Γειά σου Κόσμε",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇩🇪🇯🇵 and skin tones 👍🏽",
    "def f(x: int) -> dict:\n\treturn {'k': [x ** 2, 0x1F, 1e-9]}  # λ → ∞\r\n",
    "fn main() { println!(\"{:?}\", vec![1u8; 3]); } // ~`^|\\ <>",
    "  leading spaces, \u00a0nbsp, zero\u200bwidth, tabs\t\tand\x07bell\x00nul  ",
    "Ünïcödé ñ ß ﬁ Å ǅ ₂ ½ ① ｆｕｌｌ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    books = list(iter_gutenberg(GUTENBERG, limit=7))
    d = tmp_path_factory.mktemp("gutenberg")
    train = []
    for name, text in books[:5]:
        (d / name).write_text(text, encoding="utf-8", newline="")
        train.append(d / name)
    return SimpleNamespace(train=train, held_out=[t for _, t in books[5:]])


def read(path) -> str:
    return Path(path).read_bytes().decode("utf-8")  # keeps CRLF line ends


def paragraphs(text: str) -> list:
    return [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def mapped_id_check(old, new, vmap: VocabMap, texts) -> tuple:
    """(texts whose original tokens are all kept and encode to exactly the mapped ids,
    such texts that do not)."""
    good = bad = 0
    for t in texts:
        ids = old.encode(t)
        if all(vmap.old_to_new[i] >= 0 for i in ids):
            if new.encode(t) == [vmap.old_to_new[i] for i in ids]:
                good += 1
            else:
                bad += 1
    return good, bad


@pytest.fixture(scope="module")
def pruned_by(corpus, tmp_path_factory):
    """pruned_by(name): vocab-freq (2 workers) + prune-vocab --coverage 0.999 via the CLI, once."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = _prune_cli(name, corpus, tmp_path_factory.mktemp(name))
        return done[name]
    return get


@pytest.fixture(params=sorted(TOKENIZERS))
def pruned(request, pruned_by):
    return pruned_by(request.param)


def _prune_cli(name, corpus, out):
    tok = TOKENIZERS[name]
    freq = out / "freq.json"
    assert main(["vocab-freq", "--tokenizer", str(tok), "--data", *map(str, corpus.train),
                 "--save", str(freq), "--workers", "2", "--no-progress"]) == 0
    assert main(["prune-vocab", "--tokenizer", str(tok), "--freq", str(freq),
                 "--coverage", "0.999", "--save", str(out / "tok")]) == 0
    return SimpleNamespace(name=name, tok=tok, freq=FreqCounts.load(freq),
                           old=load_vocabulary(tok), new=load_vocabulary(out / "tok"),
                           vmap=VocabMap.load(out / "tok" / "vocab_map.json"), dir=out)


# ------------------------------------------------------------------------------ tokenizers
def test_held_out_books_round_trip_and_keep_mapped_ids(pruned, corpus):
    old, new, vmap = pruned.old, pruned.new, pruned.vmap
    assert new.kind == old.kind == KINDS[pruned.name]
    assert new.size == vmap.new_vocab_size < old.size // 2
    assert vmap.selection["coverage"] >= 0.999
    for text in corpus.held_out:
        ids = new.encode(text)
        assert max(ids) < new.size
        assert new.decode(ids) == text
        assert old.decode(old.encode(text)) == text
        good, bad = mapped_id_check(old, new, vmap, paragraphs(text))
        assert bad == 0 and good >= 40, (good, bad)
    # the counted books were encoded by the workers exactly as the tokenizer does it
    counts = np.zeros(old.size, dtype=np.int64)
    for p in corpus.train:
        np.add.at(counts, old.encode(read(p)), 1)
    assert np.array_equal(counts, pruned.freq.counts)


def test_out_of_domain_text_still_encodes_and_round_trips(pruned):
    old, new = pruned.old, pruned.new
    for text in OUT_OF_DOMAIN:
        if new.kind == "hf-bpe":  # GPT-NeoX normalizes to NFC first
            text = unicodedata.normalize("NFC", text)
        ids = new.encode(text)
        assert 0 <= min(ids) and max(ids) < new.size
        assert new.decode(ids) == text, text
        assert old.decode(old.encode(text)) == text


def test_required_tokens_and_merge_trees_are_kept(pruned):
    old, vmap = pruned.old, pruned.vmap
    kept = set(vmap.kept_old_ids)
    assert old.required_ids() <= kept
    assert old.special_ids <= kept
    for i in kept:
        assert old.needs(i) is not None and old.needs(i) <= kept, old.token_repr(i)
    for n, o in enumerate(vmap.kept_old_ids):
        assert (o in old.special_ids) == (n in pruned.new.special_ids)
        if o not in old.special_ids:
            assert old.token_bytes(o) == pruned.new.token_bytes(n)


def test_without_merge_closure_ids_would_differ(pruned, corpus, tmp_path, monkeypatch):
    """The closure is what makes kept-token texts keep their ids: take it away and they don't."""
    cls = type(pruned.old)
    monkeypatch.setattr(cls, "needs", lambda self, i: frozenset())
    sel = select_tokens(pruned.old, pruned.freq.counts, coverage=0.999)
    pruned.old.write_pruned(tmp_path, sel.kept)
    new = load_vocabulary(tmp_path)
    vmap = VocabMap.build(sel.kept, pruned.old.size, {}, {}, {})
    good, bad = mapped_id_check(pruned.old, new, vmap,
                                [p for t in corpus.held_out for p in paragraphs(t)])
    assert bad > 0


def test_sentencepiece_model_proto_edit(pruned_by):
    pruned = pruned_by("llama2")
    sp = pruned.new.processor
    m = pruned.new.proto
    T = type(m.pieces[0])
    types = [p.type for p in m.pieces]
    assert types.count(T.BYTE) == 256 and types.count(T.CONTROL) == 2
    assert m.trainer_spec.vocab_size == len(m.pieces) == sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    text = "Hello world, the quick brown fox."
    assert pruned.old.encode(text) == [15043, 3186, 29892, 278, 4996, 17354, 1701, 29916, 29889]
    assert sp.decode(sp.encode(text)) == text
    assert pruned.vmap.old_to_new[15043] == -1  # "▁Hello": not in these books' 99.9%


def test_tiktoken_specials_renumbered_and_bytes_kept(pruned_by):
    pruned = pruned_by("llama3")
    new, vmap = pruned.new, pruned.vmap
    cfg = json.loads((pruned.dir / "tok" / "tiktoken_config.json").read_text())
    n_regular = len(new.tokens)
    assert len(cfg["special_tokens"]) == 256
    assert sorted(cfg["special_tokens"].values()) == list(range(n_regular, n_regular + 256))
    assert cfg["special_tokens"]["<|begin_of_text|>"] == vmap.old_to_new[128000] == n_regular
    assert cfg["special_tokens"]["<|eot_id|>"] == vmap.old_to_new[128009]
    assert all(bytes([b]) in new.ranks for b in range(256))
    assert new.decode([n_regular]) == "<|begin_of_text|>"
    lines = (pruned.dir / "tok" / "tokenizer.model").read_text().splitlines()
    assert len(lines) == n_regular and lines[-1].endswith(f" {n_regular - 1}")


def test_hf_tokenizer_json_stays_consistent(pruned_by):
    pruned = pruned_by("neox")
    obj = json.loads((pruned.dir / "tok" / "tokenizer.json").read_text())
    vocab, merges = obj["model"]["vocab"], obj["model"]["merges"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for m in merges:
        a, b = m.split(" ", 1)
        assert a in vocab and b in vocab and a + b in vocab
    added = {t["content"]: t["id"] for t in obj["added_tokens"]}
    assert added["<|endoftext|>"] == pruned.vmap.old_to_new[0]
    assert len(added) == 25 and all(pruned.vmap.old_to_new[i] >= 0 for i in range(50254, 50277))
    base = hf_vocab.bytes_to_unicode()
    assert sum(c in vocab for c in base.values()) == 243  # NeoX lacks the 13 non-UTF-8 bytes


def test_llama2_as_tokenizer_json_has_the_same_fingerprint(pruned_by, corpus, tmp_path):
    """transformers' tokenizer.json of Llama-2 (Metaspace, byte fallback) is the same vocabulary:
    the frequencies counted with the SentencePiece model prune it, and ids still map exactly."""
    from transformers import AutoTokenizer
    pruned = pruned_by("llama2")
    src = tmp_path / "llama2-hf"
    src.mkdir()
    shutil.copy(pruned.tok, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}))
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "json")
    hf = load_vocabulary(tmp_path / "json" / "tokenizer.json")
    assert hf.kind == "hf-bpe" and hf.byte_fallback
    assert hf.fingerprint == pruned.old.fingerprint
    vmap, _ = prune_vocab(tmp_path / "json", pruned.dir / "freq.json", tmp_path / "out",
                          coverage=0.999)
    new = load_vocabulary(tmp_path / "out")
    assert new.kind == "hf-bpe" and new.size == vmap.new_vocab_size
    texts = [p for t in corpus.held_out for p in paragraphs(t)]
    good, bad = mapped_id_check(hf, new, vmap, texts)
    assert bad == 0 and good > 100
    for text in corpus.held_out + OUT_OF_DOMAIN[:4]:
        assert new.decode(new.encode(text)) == hf.decode(hf.encode(text))


def test_sentencepiece_unigram_without_byte_fallback(corpus, tmp_path):
    """A Unigram model (trained here on one book, no byte fallback): every character piece stays,
    so whatever encoded without <unk> still does, and decodes as before."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(input=str(corpus.train[1]), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=1000, model_type="unigram", minloglevel=2,
                                   num_threads=1)
    old = load_vocabulary(tmp_path / "uni.model")
    assert not old.is_bpe and not old.byte_fallback
    freq = count_frequencies(old, corpus.train, progress=False)
    freq.save(tmp_path / "freq.json")
    vmap, sel = prune_vocab(tmp_path / "uni.model", tmp_path / "freq.json", tmp_path / "out",
                            keep=600)
    new = load_vocabulary(tmp_path / "out")
    assert new.size == len(sel.kept) <= 600
    singles = {i for i, p in enumerate(old.pieces) if len(p) == 1}
    assert singles <= set(sel.kept)
    texts = [p for t in corpus.held_out for p in paragraphs(t)]
    good, bad = mapped_id_check(old, new, vmap, texts)
    assert bad == 0 and good > 20
    for text in texts[:200]:
        assert new.decode(new.encode(text)) == old.decode(old.encode(text))


def test_keep_and_min_count_criteria(pruned):
    old, counts = pruned.old, pruned.freq.counts
    sel = select_tokens(old, counts, keep=3000)
    assert 2900 < len(sel.kept) <= 3000
    assert old.required_ids() <= set(sel.kept)
    for i in sel.kept:
        assert old.needs(i) <= set(sel.kept)
    sel = select_tokens(old, counts, min_count=5)
    frequent = set(np.flatnonzero(counts >= 5).tolist())
    trees = set().union(*(old.needs(i) for i in frequent))
    assert set(sel.kept) == frequent | old.required_ids() | trees


def test_keep_tokens_file(tmp_path, corpus):
    tok = TOKENIZERS["llama3"]
    old = load_vocabulary(tok)
    freq = count_frequencies(old, corpus.train[:1], progress=False)
    freq.save(tmp_path / "freq.json")
    (tmp_path / "keep.json").write_text(json.dumps(["Pneumonoultramicroscopic", 127999]))
    vmap, sel = prune_vocab(tok, tmp_path / "freq.json", tmp_path / "out", keep=2000,
                            keep_tokens=tmp_path / "keep.json")
    new = load_vocabulary(tmp_path / "out")
    word = "Pneumonoultramicroscopic"
    assert new.encode(word) == [vmap.old_to_new[i] for i in old.encode(word)]
    assert vmap.old_to_new[127999] >= 0 and new.size <= 2000


def test_megatron_indexed_dataset_counts(pruned_by, corpus, tmp_path):
    pruned = pruned_by("llama2")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = tmp_path / "books_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for p in corpus.train:
        ids = pruned.old.encode(read(p))
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(prefix) + ".idx")
    out = tmp_path / "freq.json"
    assert main(["vocab-freq", "--tokenizer", str(pruned.tok), "--data", str(prefix) + ".bin",
                 "--save", str(out), "--workers", "2", "--no-progress"]) == 0
    freq = FreqCounts.load(out)
    assert np.array_equal(freq.counts, pruned.freq.counts)
    assert freq.documents == len(corpus.train)


def test_jsonl_input_and_workers_agree(corpus, tmp_path):
    tok = load_vocabulary(TOKENIZERS["llama3"])
    jsonl = tmp_path / "docs.jsonl"
    docs = [para for p in corpus.train for para in paragraphs(read(p))[:200]]
    jsonl.write_text("".join(json.dumps({"text": d, "id": 0}) + "\n" for d in docs))
    one = count_frequencies(tok, [jsonl], workers=1, progress=False)
    two = count_frequencies(tok, [jsonl], workers=2, progress=False, block_bytes=64 << 10)
    assert one.documents == two.documents == len(docs)
    assert np.array_equal(one.counts, two.counts)
    assert one.tokens == sum(len(tok.encode(d)) for d in docs)
    # text blocks end on line ends: smaller blocks only change the tokens at block edges
    book = corpus.train[0]
    whole = count_frequencies(tok, [book], workers=1, progress=False)
    small = count_frequencies(tok, [book], workers=2, progress=False, block_bytes=32 << 10)
    assert np.abs(whole.counts - small.counts).sum() < 0.001 * whole.tokens


# ------------------------------------------------------------------------------ checkpoints
def hf_forward(path, ids: torch.Tensor) -> tuple:
    """(logits, last hidden state) of an HF model in fp32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def assert_kept_logits_equal(orig, pruned_dir, vmap: VocabMap, new_ids: list):
    """The pruned model on new ids = the original on the mapped old ids, logits over kept tokens
    in new order. Hidden states are bitwise equal; the output matmul has another width, so BLAS
    may sum in another order: logits agree to float rounding."""
    kept = vmap.kept_old_ids
    old_ids = torch.tensor([[kept[i] for i in new_ids]])
    a, ha = hf_forward(orig, old_ids)
    b, hb = hf_forward(pruned_dir, torch.tensor([new_ids]))
    assert torch.equal(ha, hb)
    a = a[..., kept]
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    """A random untied Llama with Llama-3's vocabulary and tokenizer, sharded safetensors."""
    d = make_hf_llama(tmp_path_factory.mktemp("l3") / "hf", vocab_size=128256, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=128000, eos_token_id=[128001, 128009],
                      pad_token_id=128004, max_shard_size="10MB")
    shutil.copy(TOKENIZERS["llama3"], d / "tokenizer.model")
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.9, do_sample=True)
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def llama3_pruned(tmp_path_factory, corpus):
    out = tmp_path_factory.getbasetemp() / "l3map"
    if not (out / "vocab_map.json").is_file():
        freq = count_frequencies(TOKENIZERS["llama3"], corpus.train, progress=False)
        freq.save(out.parent / "l3freq.json")
        prune_vocab(TOKENIZERS["llama3"], out.parent / "l3freq.json", out, coverage=0.999)
    return out, VocabMap.load(out)


def test_hf_untied_sharded_logits_and_config(llama3_model, corpus, tmp_path_factory, tmp_path):
    mapdir, vmap = llama3_pruned(tmp_path_factory, corpus)
    assert len(list(llama3_model.glob("*.safetensors"))) > 1
    out = tmp_path / "pruned"
    assert main(["prune-embeddings", "--map", str(mapdir / "vocab_map.json"),
                 "--hf-dir", str(llama3_model), "--save", str(out),
                 "--max-shard-size-gb", str(2e6 / 2**30)]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1
    cfg = json.loads((out / "config.json").read_text())
    n = vmap.new_vocab_size
    assert cfg["vocab_size"] == n and not cfg["tie_word_embeddings"]
    assert cfg["bos_token_id"] == vmap.old_to_new[128000] == n - 256
    assert cfg["eos_token_id"] == [vmap.old_to_new[128001], vmap.old_to_new[128009]]
    assert cfg["pad_token_id"] == vmap.old_to_new[128004]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"] and gen["eos_token_id"] == cfg["eos_token_id"]
    assert gen["temperature"] == 0.6 and gen["do_sample"] is True
    new_tok = load_vocabulary(out)  # the pruned tokenizer travels with the model
    assert new_tok.fingerprint == vmap.pruned["fingerprint"]
    ids = [vmap.old_to_new[128000]] + new_tok.encode(corpus.held_out[0][:2000])
    assert_kept_logits_equal(llama3_model, out, vmap, ids)


def test_hf_tied_stories260k_logits(stories260k_hf, corpus, tmp_path):
    """The real stories260K model and its own 512-piece SentencePiece tokenizer (tied)."""
    freq = tmp_path / "freq.json"
    assert main(["vocab-freq", "--tokenizer", str(stories260k_hf), "--data", str(corpus.train[0]),
                 "--save", str(freq), "--workers", "1", "--no-progress"]) == 0
    assert main(["prune-vocab", "--tokenizer", str(stories260k_hf), "--freq", str(freq),
                 "--keep", "400", "--save", str(tmp_path / "tok")]) == 0
    vmap = VocabMap.load(tmp_path / "tok")
    out = tmp_path / "pruned"
    assert main(["prune-embeddings", "--map", str(tmp_path / "tok"), "--hf-dir",
                 str(stories260k_hf), "--save", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == vmap.new_vocab_size <= 400 and cfg["tie_word_embeddings"]
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert sorted(added) == ["0", "1", "2"]
    new_tok = load_vocabulary(out)
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    ids = [1] + new_tok.encode(text)
    assert_kept_logits_equal(stories260k_hf, out, vmap, ids)
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(text)["input_ids"] == ids
    # the pruned SentencePiece model's own tokenizer.json (sp_tokenizer_json), not a stale copy
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == len(hf_tok)


def test_megatron_tp2_logits_through_export(llama3_model, corpus, tmp_path_factory, tmp_path):
    mapdir, vmap = llama3_pruned(tmp_path_factory, corpus)
    meg = tmp_path / "meg"
    convert.hf_to_megatron(llama3_model, meg, tp=2, pp=2, impl="local")
    out = tmp_path / "meg_pruned"
    assert main(["prune-embeddings", "--map", str(mapdir), "--load", str(meg),
                 "--save", str(out)]) == 0
    ckpt = LegacyCheckpoint(out)
    n = vmap.new_vocab_size
    padded = -(-n // 256) * 256
    assert (ckpt.tp, ckpt.pp, ckpt.impl) == (2, 2, "local")
    assert ckpt.args.vocab_size == n and ckpt.args.padded_vocab_size == padded
    emb = ckpt.open(1, 0).get("embedding.word_embeddings.weight")
    assert emb.shape[0] == padded // 2 and not emb[n - padded // 2:].any()
    assert load_vocabulary(out / "tokenizer").fingerprint == vmap.pruned["fingerprint"]
    convert.megatron_to_hf(out, tmp_path / "hf")
    ids = [vmap.old_to_new[128000]] + load_vocabulary(mapdir).encode(corpus.held_out[1][:1500])
    assert_kept_logits_equal(llama3_model, tmp_path / "hf", vmap, ids)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_tied_stories260k(stories260k_hf, tmp_path, fmt):
    """Tied embeddings: with PP > 1 mcore keeps a copy on the last stage, pruned alike; the
    distributed format is written back as such."""
    tok = load_vocabulary(stories260k_hf)
    counts = np.ones(tok.size, dtype=np.int64)
    counts[300:] = 0
    FreqCounts(counts, tok.describe()).save(tmp_path / "freq.json")
    assert main(["prune-vocab", "--tokenizer", str(stories260k_hf), "--freq",
                 str(tmp_path / "freq.json"), "--min-count", "1", "--save", str(tmp_path / "tok")]) == 0
    vmap = VocabMap.load(tmp_path / "tok")
    convert.hf_to_megatron(stories260k_hf, tmp_path / "meg", tp=2, pp=5 if fmt == "torch" else 1,
                           ckpt_format=fmt)
    assert main(["prune-embeddings", "--map", str(tmp_path / "tok"), "--load",
                 str(tmp_path / "meg"), "--save", str(tmp_path / "out")]) == 0
    if fmt == "torch":
        first = LegacyCheckpoint(tmp_path / "out").open(1, 0).get("embedding.word_embeddings.weight")
        last = LegacyCheckpoint(tmp_path / "out").open(1, 4).get("output_layer.weight")
        assert torch.equal(first, last) and first.shape[0] == 256
    else:
        assert checkpoint_format(tmp_path / "out") == "torch_dist"
    convert.megatron_to_hf(tmp_path / "out", tmp_path / "hf")
    assert_kept_logits_equal(stories260k_hf, tmp_path / "hf", vmap, [1, 5, 17, 250, 2, 9])


# ------------------------------------------------------------------------------ clear errors
def _fails(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_keep_smaller_than_required(pruned_by, capsys, tmp_path):
    pruned = pruned_by("llama3")
    _fails(["prune-vocab", "--tokenizer", str(pruned.tok), "--freq", str(pruned.dir / "freq.json"),
            "--keep", "300", "--save", str(tmp_path / "o")], capsys,
           "--keep 300 is smaller than the 512 tokens that must always be kept")
    assert not (tmp_path / "o").exists()


def test_unknown_tokenizer_type(tmp_path, capsys):
    llama2c = DATA / "tokenizers" / "llama2" / "tokenizer.bin"
    _fails(["vocab-freq", "--tokenizer", str(llama2c), "--data", str(llama2c),
            "--save", str(tmp_path / "f.json")], capsys, "unknown tokenizer type")
    (tmp_path / "t.json").write_text('{"vocab": {}}')
    _fails(["vocab-freq", "--tokenizer", str(tmp_path / "t.json"), "--data", str(llama2c),
            "--save", str(tmp_path / "f.json")], capsys, "unknown tokenizer type")
    wp = tmp_path / "wp.json"
    wp.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    _fails(["vocab-freq", "--tokenizer", str(wp), "--data", str(llama2c),
            "--save", str(tmp_path / "f.json")], capsys, "model type 'WordPiece' is not supported")
    assert not (tmp_path / "f.json").exists()


def test_freq_and_map_from_another_tokenizer(pruned_by, stories260k_hf, llama3_model, tmp_path,
                                             capsys):
    pruned = pruned_by("llama2")
    # a frequency file counted with Llama-2 given with Llama-3's tokenizer
    _fails(["prune-vocab", "--tokenizer", str(TOKENIZERS["llama3"]), "--freq",
            str(pruned.dir / "freq.json"), "--coverage", "0.9", "--save", str(tmp_path / "o")],
           capsys, "was counted with another tokenizer")
    # the Llama-2 map on a model with another vocab size
    _fails(["prune-embeddings", "--map", str(pruned.dir / "tok"), "--hf-dir", str(stories260k_hf),
            "--save", str(tmp_path / "o")], capsys, "tokenizer and model vocab sizes disagree")
    _fails(["prune-embeddings", "--map", str(pruned.dir / "tok"), "--hf-dir", str(llama3_model),
            "--save", str(tmp_path / "o")], capsys,
           "is for a 32000-token tokenizer, --hf-dir")
    # same size, other tokenizer: a 512-token Llama-2 cut put into a copy of stories260K
    other = tmp_path / "other"
    assert main(["prune-vocab", "--tokenizer", str(pruned.tok), "--freq",
                 str(pruned.dir / "freq.json"), "--keep", "512", "--save", str(other)]) == 0
    assert VocabMap.load(other).new_vocab_size == 512
    model = tmp_path / "model"
    shutil.copytree(stories260k_hf, model)
    shutil.copy(other / "tokenizer.model", model / "tokenizer.model")
    stories_map = tmp_path / "stories_map"
    tok = load_vocabulary(stories260k_hf)
    FreqCounts(np.ones(512, dtype=np.int64), tok.describe()).save(tmp_path / "sf.json")
    assert main(["prune-vocab", "--tokenizer", str(stories260k_hf), "--freq",
                 str(tmp_path / "sf.json"), "--min-count", "1", "--save", str(stories_map)]) == 0
    err = _fails(["prune-embeddings", "--map", str(stories_map), "--hf-dir", str(model),
                  "--save", str(tmp_path / "o")], capsys, "was made for another tokenizer")
    assert "fingerprint" in err
    # an explicit --tokenizer is checked the same way
    _fails(["prune-embeddings", "--map", str(stories_map), "--hf-dir", str(stories260k_hf),
            "--tokenizer", str(other / "tokenizer.model"), "--save", str(tmp_path / "o")], capsys,
           "was made for another tokenizer")
    assert not (tmp_path / "o").exists()


def test_outputs_need_force(pruned_by, tmp_path, capsys):
    pruned = pruned_by("llama2")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _fails(["prune-vocab", "--tokenizer", str(pruned.tok), "--freq", str(pruned.dir / "freq.json"),
            "--coverage", "0.9", "--save", str(out)], capsys, "not empty")
    _fails(["vocab-freq", "--tokenizer", str(pruned.tok), "--data", str(out / "keep.txt"),
            "--save", str(out / "keep.txt")], capsys, "exists")
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("cmd", ["vocab-freq", "prune-vocab", "prune-embeddings"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out
