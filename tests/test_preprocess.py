"""Data: `megatron-prune preprocess` (text / jsonl -> Megatron indexed datasets), the tokenizer
factory it shares with the trainer, and the Gutenberg header/footer stripping.

Real inputs from ../shared/data: the Llama-2 SentencePiece model, Llama-3's tiktoken ranks, GPT-2's
vocab.json + merges.txt, GPT-NeoX's tokenizer.json and books from the Gutenberg archive. Every
dataset is read back with megatron-core's own `IndexedDataset`.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_prune.data import corpus, preprocess as pre
from megatron_prune.cli import main
from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.fsutil import OutputExistsError
from megatron_prune.data.tokenizers import TokenizerSpec, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOK = DATA / "tokenizers"
GUTENBERG = DATA / "corpus" / "gutenberg_en.tar.xz"
SENTENCE = "Hello world, the quick brown fox."

# (tokenizer type, model, MANIFEST ids of SENTENCE, vocab size, bos, eod, Megatron's dtype)
TOKENIZERS = {
    "llama2-sp": ("Llama2Tokenizer", TOK / "llama2" / "tokenizer.model",
                  [15043, 3186, 29892, 278, 4996, 17354, 1701, 29916, 29889],
                  32000, 1, 2, np.uint16),
    "llama2-gptsp": ("GPTSentencePieceTokenizer", TOK / "llama2" / "tokenizer.model",
                     [15043, 3186, 29892, 278, 4996, 17354, 1701, 29916, 29889],
                     32000, 1, 2, np.uint16),
    "llama3-tiktoken": ("TikTokenizer", TOK / "llama3" / "tokenizer.model",
                        [9906, 1917, 11, 279, 4062, 14198, 39935, 13],
                        128256, 128000, 128001, np.int32),
    "gpt2-hf": ("HuggingFaceTokenizer", TOK / "gpt2",
                [15496, 995, 11, 262, 2068, 7586, 21831, 13], 50257, 50256, 50256, np.uint16),
    "neox-hf": ("HuggingFaceTokenizer", TOK / "gpt-neox-20b" / "20B_tokenizer.json",
                [12092, 1533, 13, 253, 3158, 8516, 30013, 15], 50277, None, 0, np.uint16),
}

DOCS = [
    SENTENCE,
    "Alice was beginning to get very tired of sitting by her sister on the bank.\n\n"
    "“Curiouser and curiouser!” cried Alice.",
    "",  # gives no tokens: skipped
    "日本語のテキストと中文混合，还有한국어도 있습니다。 emoji 😀🎉 and ½ ① ﬁ",
    "  leading spaces, \u00a0nbsp, tabs\t\tand\r\nCRLF  ",
    "def f(x: int) -> dict:\n\treturn {'k': [x ** 2, 0x1F]}  # λ → ∞\n",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build_tokenizer(t[0], t[1]) for name, t in TOKENIZERS.items()}


def spec(name: str) -> TokenizerSpec:
    return TokenizerSpec(TOKENIZERS[name][0], str(TOKENIZERS[name][1]))


def write_jsonl(path: Path, docs, key: str = "text", **extra) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({key: doc, "id": i, **extra}, ensure_ascii=False) + "\n")
    return path


def run(tmp_path, inputs, name="llama2-sp", prefix="out/data", **kw) -> pre.PreprocessResult:
    return pre.preprocess(pre.PreprocessConfig(
        inputs=[str(i) for i in inputs], output_prefix=str(tmp_path / prefix),
        tokenizer=spec(name), progress=False, **kw))


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


# ------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_tokenizer_known_encodings(tokenizers, name):
    _, _, ids, vocab, bos, eod, _ = TOKENIZERS[name]
    tok = tokenizers[name]
    assert tok.encode(SENTENCE) == ids
    assert tok.decode(ids) == SENTENCE
    assert (tok.vocab_size, tok.bos, tok.eod) == (vocab, bos, eod)


def test_tiktoken_llama3_special_tokens(tokenizers):
    tok = tokenizers["llama3-tiktoken"]
    assert tok.decode([128000, 128001, 128009, 128255]) == (
        "<|begin_of_text|><|end_of_text|><|eot_id|><|reserved_special_token_250|>")
    # A special token's spelling in the text is text, not the special id.
    assert 128001 not in tok.encode("a <|end_of_text|> b")
    # Meta's cut of very long runs (25k chars) keeps the text; ids decode back to it.
    long = "x" * 30_000 + " y"
    assert tok.decode(tok.encode(long)) == long


# ------------------------------------------------------------------------------ exact output
@pytest.mark.parametrize("name", ["llama2-sp", "llama3-tiktoken", "gpt2-hf"])
@pytest.mark.parametrize("append_eod", [True, False])
def test_documents_hold_exactly_the_tokenizer_ids(tmp_path, tokenizers, name, append_eod):
    tok, dtype = tokenizers[name], TOKENIZERS[name][6]
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    res = run(tmp_path, [src], name, append_eod=append_eod)

    prefix = tmp_path / "out" / "data_text_document"
    assert res.outputs == {"text": str(prefix)}
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "data_text_document.bin", "data_text_document.idx"]  # no temp files left
    ds = read(prefix)
    assert ds.index.dtype == dtype
    expected = [tok.encode(d) + ([tok.eod] if append_eod else []) for d in DOCS if d]
    assert len(ds) == len(expected) == res.stats["text"].documents
    assert res.stats["text"].empty == 1
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))
    assert res.stats["text"].tokens == sum(map(len, expected))


def test_several_json_keys_text_files_and_globs(tmp_path, tokenizers):
    tok = tokenizers["llama2-sp"]
    a = write_jsonl(tmp_path / "a.jsonl", ["first doc.", "second doc."], title="T")
    b = write_jsonl(tmp_path / "b.jsonl", ["third doc."], title="U")
    res = run(tmp_path, [tmp_path / "*.jsonl"], json_keys=["text", "title"], append_eod=True)
    assert res.input_files == [str(a), str(b)]
    text = read(tmp_path / "out" / "data_text_document")
    title = read(tmp_path / "out" / "data_title_document")
    assert [x.tolist() for x in text] == [tok.encode(d) + [2] for d in
                                          ("first doc.", "second doc.", "third doc.")]
    assert [x.tolist() for x in title] == [tok.encode(t) + [2] for t in "TTU"]

    # Plain text: one document per file, read in the given order.
    (tmp_path / "t").mkdir()
    books = {"b.txt": "Book two.\nLine two.\n", "a.txt": "Book one.\r\n"}
    for n, t in books.items():
        (tmp_path / "t" / n).write_bytes(t.encode())
    run(tmp_path, [tmp_path / "t" / "b.txt", tmp_path / "t" / "a.txt"], prefix="txt/books")
    ds = read(tmp_path / "txt" / "books_text_document")
    assert [x.tolist() for x in ds] == [tok.encode(books["b.txt"]), tok.encode(books["a.txt"])]


# ------------------------------------------------------------------------------ parallelism
def test_workers_and_partitions_give_the_same_bytes(tmp_path):
    docs = [f"Document {i}: " + " ".join(DOCS[i % len(DOCS)] for _ in range(1 + i % 4))
            for i in range(60)]
    files = [write_jsonl(tmp_path / f"part{j}.jsonl", docs[j * 20:(j + 1) * 20]) for j in range(3)]

    def out_bytes(prefix, **kw):
        run(tmp_path, files, prefix=prefix, append_eod=True, chunk_size=3, **kw)
        return [(tmp_path / f"{prefix}_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]

    one = out_bytes("w1", workers=1)
    assert out_bytes("w2", workers=2) == one
    assert out_bytes("p2", workers=2, partitions=2) == one
    assert len(read(tmp_path / "w1_text_document")) == 60


# ------------------------------------------------------------------------------ sentences
def test_split_sentences_writes_sentence_boundaries(tmp_path, tokenizers):
    tok = tokenizers["llama2-sp"]
    docs = ["The cat sat on the mat. The dog ran away! Did it come back? Yes.",
            "One sentence only",
            "First line ends here.\nSecond line starts here."]
    sentences = [["The cat sat on the mat.", "The dog ran away!", "Did it come back?", "Yes."],
                 ["One sentence only"],
                 ["First line ends here.", "Second line starts here."]]
    res = run(tmp_path, [write_jsonl(tmp_path / "d.jsonl", docs)], split_sentences=True,
              append_eod=True)
    prefix = tmp_path / "out" / "data_text_sentence"
    assert res.outputs["text"] == str(prefix)
    ds = read(prefix)
    assert ds.document_indices.tolist() == [0, 4, 5, 7]
    flat = [s for doc in sentences for s in doc]
    assert len(ds) == len(flat) == res.stats["text"].sequences
    ends = {3, 4, 6}  # the last sentence of each document carries the eod
    for i, s in enumerate(flat):
        assert ds[i].tolist() == tok.encode(s) + ([tok.eod] if i in ends else [])

    # --keep-newlines keeps the whitespace after a sentence inside it (Megatron-LM's option).
    run(tmp_path, [tmp_path / "d.jsonl"], prefix="nl/data", split_sentences=True,
        keep_newlines=True)
    ds = read(tmp_path / "nl" / "data_text_sentence")
    assert ds[5].tolist() == tok.encode("First line ends here.\n")


# ------------------------------------------------------------------------------ errors
def test_clear_errors_and_nothing_written(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["a doc."])
    with pytest.raises(ConfigError, match="no such file"):
        run(tmp_path, [tmp_path / "missing.jsonl"])
    with pytest.raises(ConfigError, match="matches no file"):
        run(tmp_path, [tmp_path / "nothing-*.jsonl"])
    with pytest.raises(ConfigError, match=r"good.jsonl:1: no key 'body'.*--json-keys"):
        run(tmp_path, [good], json_keys=["body"])
    with pytest.raises(ConfigError, match="unknown --tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE", TOK / "gpt2")
    with pytest.raises(ConfigError, match="not a tiktoken ranks file"):
        build_tokenizer("TikTokenizer", TOK / "llama2" / "tokenizer.model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        build_tokenizer("Llama2Tokenizer", TOK / "llama3" / "tokenizer.model")

    # A bad line deep in the file, found by a worker: the error names it, no output is left.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"doc {i}."}) + "\n" for i in range(50))
                   + '{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:51: 'text' is a int, not text"):
        run(tmp_path, [bad], prefix="bad/data", workers=2, chunk_size=4)
    assert list((tmp_path / "bad").iterdir()) == []

    run(tmp_path, [good])
    with pytest.raises(OutputExistsError, match="--force"):
        run(tmp_path, [good])
    run(tmp_path, [good], force=True)


def test_cli_exit_codes_and_megatron_wrapper(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    args = ["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "cli"),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
            str(TOK / "gpt-neox-20b" / "20B_tokenizer.json"), "--append-eod"]
    assert main(args) == 0
    assert "5 documents" in capsys.readouterr().out
    assert main(args) == 2  # exists, no --force
    assert "pass --force" in capsys.readouterr().err
    assert main(args[:2] + [str(tmp_path / "nope.jsonl")] + args[3:]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse lists the four supported types
        main(args[:6] + ["GPT2BPETokenizer"] + args[7:])
    assert e.value.code == 2
    assert "invalid choice: 'GPT2BPETokenizer'" in capsys.readouterr().err

    # Megatron-LM's preprocess_data.py flags, all accepted.
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "example:" in help_text
    for flag in ("--input", "--output-prefix", "--json-keys", "--tokenizer-type",
                 "--tokenizer-model", "--append-eod", "--workers", "--split-sentences",
                 "--keep-newlines", "--lang", "--partitions", "--log-interval",
                 "--keep-sequential-samples"):
        assert flag in help_text

    # tools/preprocess_data.py: Megatron-LM's script name and flags.
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
         "--output-prefix", str(tmp_path / "tool"), "--tokenizer-type", "Llama2Tokenizer",
         "--tokenizer-model", str(TOK / "llama2" / "tokenizer.model"), "--append-eod",
         "--workers", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tok = build_tokenizer("Llama2Tokenizer", TOK / "llama2" / "tokenizer.model")
    ds = read(tmp_path / "tool_text_document")  # held: items are views of its memory map
    assert ds[0].tolist() == tok.encode(SENTENCE) + [2]


# ------------------------------------------------------------------------------ Gutenberg
def _books_from_archive(names):
    """Raw bytes of some books, streamed out of the archive (stops once all are found)."""
    found = {}
    with tarfile.open(GUTENBERG, "r:xz") as tar:
        for m in tar:
            name = Path(m.name).name
            if name in names:
                found[name] = tar.extractfile(m).read()
                if len(found) == len(names):
                    return found
    raise AssertionError(f"not in the archive: {set(names) - set(found)}")


def test_gutenberg_stripping_on_real_books():
    raw = _books_from_archive({"11-0.txt", "pg108.txt", "1952-0.txt"})
    alice = corpus.strip_gutenberg(raw["11-0.txt"].decode("utf-8-sig"), "11-0.txt")
    assert alice.startswith("ALICE’S ADVENTURES IN WONDERLAND\n\nLewis Carroll\n")
    assert alice.endswith("the happy summer days.\n\n              THE END\n")
    # Exactly the lines between the START and END lines, LF, minus the "End of Project
    # Gutenberg's ..." footer line and the blank lines around.
    lines = raw["11-0.txt"].decode("utf-8-sig").split("\r\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("*** START OF"))
    end = next(i for i, l in enumerate(lines) if l.startswith("*** END OF"))
    body = "\n".join(lines[start + 1:end]).strip("\n")
    assert body.endswith("\n\nEnd of Project Gutenberg’s Alice’s Adventures in Wonderland, "
                         "by Lewis Carroll")
    assert alice == body[:body.rindex("End of Project")].rstrip("\n") + "\n"

    holmes = corpus.strip_gutenberg(raw["pg108.txt"].decode("utf-8-sig"))  # indented END line
    for text in (alice, holmes):
        assert "\r" not in text and "*** START" not in text and "*** END" not in text
        assert "Project Gutenberg" not in text[-2000:] and "gutenberg.org" not in text[-2000:]
        assert "THE END" in text[-200:] or len(text) > 100_000
    lf_only = raw["1952-0.txt"].decode("utf-8-sig")  # the one LF book: same rule
    assert "\r" not in lf_only
    assert len(corpus.strip_gutenberg(lf_only)) < len(lf_only)


def test_gutenberg_rules_and_archive_order(tmp_path):
    book = ("header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
            "Text line one.\r\nLine two.\r\n\r\nEnd of the Project Gutenberg EBook of X, by\r\n"
            "Someone\r\n\r\n    *** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    assert corpus.strip_gutenberg(book) == "Text line one.\nLine two.\n"
    with pytest.raises(ConfigError, match="no '\\*\\*\\* START OF' line"):
        corpus.strip_gutenberg("just text\n", "plain.txt")
    # No END line (old etexts): cut where the old licence begins.
    old = "***START OF THE PROJECT GUTENBERG ETEXT Y***\nBody.\n**The Legal Small Print**\nlaw\n"
    assert corpus.strip_gutenberg(old) == "Body.\n"

    tar_path = tmp_path / "books.tar.xz"
    with tarfile.open(tar_path, "w:xz") as tar:
        for name in ("c.txt", "a.txt", "b.txt"):
            data = book.replace("Text line one", f"Book {name}").encode()
            info = tarfile.TarInfo(f"gutenberg_en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(corpus.iter_gutenberg_archive(tar_path))
    assert [n for n, _ in got] == ["a.txt", "b.txt", "c.txt"]
    assert got[0][1] == "Book a.txt.\nLine two.\n"

    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "unpacked")
    counts = corpus.write_gutenberg_jsonl(tmp_path / "unpacked", tmp_path / "train.jsonl",
                                          tmp_path / "valid.jsonl", valid_books=1)
    assert counts["train"]["files"] == ["a.txt", "b.txt"] and counts["valid"]["files"] == ["c.txt"]
    valid = [json.loads(l) for l in open(tmp_path / "valid.jsonl", encoding="utf-8")]
    assert valid == [{"text": "Book c.txt.\nLine two.\n", "file": "c.txt", "title": ""}]


@pytest.mark.slow
def test_prepare_gutenberg_script(tmp_path):
    """The whole corpus through scripts/prepare_gutenberg.sh (about 2 minutes on 2 cores)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "prepare_gutenberg.sh"),
                          str(tmp_path), "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    train, valid = (read(tmp_path / f"gutenberg_{s}_text_document") for s in ("train", "valid"))
    assert (len(train), len(valid)) == (96, 5)
    assert all(int(train[i][-1]) == 2 for i in range(len(train)))
    assert train.sequence_lengths.sum() > 10_000_000
