"""The tokenizer directories the project writes give SentencePiece's own ids under transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from megatron_prune.checkpoint import sp_tokenizer_json
from megatron_prune.data.corpus import iter_gutenberg_archive
from megatron_prune.checkpoint.hf_tokenizer import write_hf_sentencepiece_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2 = DATA / "tokenizers" / "llama2" / "tokenizer.model"
# runs of spaces (two after a full stop, indentation), digits, newlines, non-ASCII, byte fallback
EDGES = ["with.  This is", "x   y", "x\n  y", "  x", " x", "a ", "", " ", "1801.--I", "  1914",
         "日本語  テスト", "🙂  ok", "Ćne  ne", "tab\there", "▁x", "a▁▁b", "The end.\n\n\n"]


@pytest.fixture(scope="module")
def book_text():
    """Slices of 12 Gutenberg books: 600 K characters with their own spacing."""
    books = [t for _, t in iter_gutenberg_archive(DATA / "corpus" / "gutenberg_en.tar.xz")]
    return [t[len(t) // 3:len(t) // 3 + 50_000].lstrip(" ") for t in books[::8]]


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    return write_hf_sentencepiece_dir(LLAMA2, tmp_path_factory.mktemp("tok") / "llama2", 1024)


def test_tokenizer_json_gives_sentencepiece_ids(llama2_dir, book_text):
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    tj = Tokenizer.from_file(str(llama2_dir / "tokenizer.json"))
    for text in book_text + EDGES:
        assert tj.encode(text, add_special_tokens=False).ids == sp.encode(text), text[:60]
    assert tj.encode("hi").ids == [sp.bos_id()] + sp.encode("hi")


def test_auto_tokenizer_gives_sentencepiece_ids(llama2_dir, book_text):
    """What evaluation, importance and export read: AutoTokenizer on the directory. Only text
    that starts with a space (or '▁') may differ (transformers 5's Llama pre-tokenizer adds no '▁'
    there), and by its first token only."""
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    tok = AutoTokenizer.from_pretrained(llama2_dir)
    checked = 0
    for text in book_text + [e for e in EDGES if not e.startswith((" ", "▁"))]:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text[:60]
        assert tok.decode(ids) == sp.decode(ids)
        checked += len(ids)
    assert checked > 100_000
    # the case that made this necessary: two spaces after a full stop
    assert tok.tokenize("park.  She") == ["▁park", ".", "▁", "▁She"]
    assert tok("hi")["input_ids"] == [sp.bos_id()] + sp.encode("hi")


def test_unsupported_models_get_no_tokenizer_json(tmp_path):
    """A unigram model (or one that collapses whitespace) is left to transformers' converter."""
    import io
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g hello world"] * 50), model_writer=(buf := io.BytesIO()),
        vocab_size=16, model_type="unigram", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    assert not sp_tokenizer_json.write(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="not a BPE model"):
        sp_tokenizer_json.build(tmp_path / "tokenizer.model")
