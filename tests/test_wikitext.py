"""WikiText as lm-eval scores it: the detokenizer, the article splitter, `--txt-mode wikitext`,
and the loss breakdown over the tokenized release's markup (stories260K, real WikiText-2)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from megatron_prune.eval import evaluate
from megatron_prune.data.calibration import load_tokenizer
from megatron_prune.cli import main
from megatron_prune.checkpoint.hf_model import load_hf_model
from megatron_prune.eval.wikitext import detokenize, split_articles, wikitext_documents

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.mark.parametrize("tokenized, raw", [
    (" = Homarus gammarus = \n", "= Homarus gammarus =\n"),
    (" = = Description = = \n", "== Description ==\n"),
    (" = = = Early life = = = \n", "=== Early life ===\n"),
    ("weigh 0 @.@ 7 – 2 @.@ 2 kg", "weigh 0.7 – 2.2 kg"),
    ("1 @,@ 000 well @-@ known", "1,000 well-known"),
    ("a lobster , H. americanus . It", "a lobster, H. americanus. It"),
    ("prey ; the other : this", "prey; the other: this"),
    ("60 cm ( 24 in ) and", "60 cm (24 in) and"),
    ('becoming " lobster red " on', 'becoming "lobster red" on'),
    ("it 's the players ' union , do n't", "it's the players' union, don't"),
    ("a [ note ] ! really ?", "a [note]! really?"),
    (" a line \n \n next", "a line\n\nnext"),
])
def test_detokenize(tokenized, raw):
    assert detokenize(tokenized) == raw


def test_articles_of_wikitext2_valid():
    text = VALID.read_text(encoding="utf-8")
    articles = split_articles(text)
    assert len(articles) == 60  # WikiText-2's validation split holds 60 articles
    assert "".join(articles) == text  # nothing lost, nothing added
    assert articles[0].startswith(" \n = Homarus gammarus = \n")
    assert all(a.lstrip(" \n").startswith("= ") for a in articles)
    docs = wikitext_documents(text)
    assert docs[0].startswith("= Homarus gammarus =\n\nHomarus gammarus, known as the European")
    assert "== Description ==" in docs[0] and "0.7 – 2.2 kg" in docs[0]
    joined = "".join(docs)
    assert " @" not in joined and " , " not in joined and " . " not in joined


def test_eval_txt_mode_wikitext(stories260k_hf, tmp_path, capsys):
    assert main(["eval", "--hf-dir", str(stories260k_hf), "--task", "ppl", "--data", str(VALID),
                 "--txt-mode", "wikitext", "--window", "64", "--max-tokens", "3000",
                 "--save", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())[0]
    assert got["count"] == 3000 and "txt mode wikitext" in got["detail"]
    assert got["extra"]["bits_per_byte"] > 0 and got["extra"]["word_perplexity"] > got["value"]
    assert "bits_per_byte" in capsys.readouterr().out


def test_loss_breakdown_on_tokenized_wikitext(stories260k_hf):
    """Shares add up; the breakdown's total is the loss `perplexity` gives the same text (one
    scoring code); every markup category of the release is met."""
    text = VALID.read_text(encoding="utf-8")[:12000]
    tok, model = load_tokenizer(stories260k_hf), load_hf_model(stories260k_hf)
    parts = evaluate.loss_breakdown(model, tok, text, 128)
    total = parts.pop("total")
    assert sum(p["tokens"] for p in parts.values()) == total["tokens"]
    assert sum(p["loss_share"] for p in parts.values()) == pytest.approx(1.0)
    assert all(p["tokens"] > 0 for p in parts.values()), parts
    ppl = evaluate.perplexity(model, tok, [text], 128)
    assert ppl.count == total["tokens"]
    assert math.exp(total["nll"] / total["tokens"]) == pytest.approx(ppl.value, rel=1e-9)
    # markup is costlier than plain text for a model that never saw it
    assert parts["<unk>"]["loss_share"] > parts["<unk>"]["token_share"]


def test_wikitext_breakdown_bench(stories260k_hf, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import wikitext_breakdown
    assert wikitext_breakdown.main(["--model", str(stories260k_hf), "--window", "64",
                                    "--max-tokens", "2000", "--save",
                                    str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| @-@ @,@ @.@ |" in out and "wikitext: token ppl" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["breakdown"]["total"]["tokens"] == 2000
    assert set(res["perplexity"]) == {"lines", "wikitext"}
