"""WikiText as the evaluation harnesses score it: the tokenized release turned back into raw-style
text, one document per article.

The tokenized WikiText-2 (`../shared/data/wikitext-2/valid.txt`, the PyTorch examples' copy) puts
spaces around every punctuation mark, writes number separators as ` @-@ `, ` @,@ `, ` @.@ `,
headings as ` = = Heading = = ` and rare words as `<unk>`. A model trained on ordinary text pays
for every one of those spaces, so lm-evaluation-harness's `wikitext` task scores each article
after undoing the tokenization (its "detokenizer"): those are the rules below, reimplemented from
their documented effect. `<unk>` cannot be undone and stays.

`MARKUP` names the spans of the tokenized text that the detokenizer removes or rewrites, so that
`evaluate.loss_breakdown` can say how much of a model's loss falls on them.
"""
from __future__ import annotations

import re
from typing import Dict, List

# (pattern, replacement), applied in order. Order matters: the number separators go before the
# plain punctuation rules (" @.@ " must not become ". @"), and brackets/quotes before the
# trailing-space cleanup.
DETOKENIZE_RULES = [
    (r" @([-,.])@ ", r"\1"),                  # 1 @,@ 000 -> 1,000; 0 @.@ 7 -> 0.7; well @-@ known
    (r" ([.,;:!?])(?= |\n|$)", r"\1"),        # "word , next" -> "word, next"
    (r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1"),  # "it 's", "do n't" -> "it's", "don't"
    (r"(\w)s ' ", r"\1s' "),                  # plural possessive: "players ' union"
    (r"\( ([^()\n]*?) \)", r"(\1)"),          # spaces inside brackets
    (r"\[ ([^\[\]\n]*?) \]", r"[\1]"),
    (r"\{ ([^{}\n]*?) \}", r"{\1}"),
    (r'" ([^"\n]*?) "', r'"\1"'),             # spaces inside double quotes
    (r"(?m)^ *((?:= )+)(.*?)((?: =)+) *$",    # " = = Heading = = " -> "== Heading =="
     lambda m: m.group(1).replace(" ", "") + " " + m.group(2) + " "
     + m.group(3).replace(" ", "")),
    (r" ([°%])", r"\1"),                      # "20 °" / "5 %" -> "20°" / "5%"
    (r"(?m)^ +| +$", ""),                     # the release's leading/trailing space of a line
]
_RULES = [(re.compile(p), r) for p, r in DETOKENIZE_RULES]

# Spans of the tokenized text a loss breakdown attributes tokens to, in priority order (a token
# overlapping two spans counts for the first). Spaces before punctuation: the space only, so the
# token that carries it (Llama's "▁,") is the one counted.
MARKUP: Dict[str, str] = {
    "newline": r"\n",
    "@-@ @,@ @.@": r" @[-,.]@ ",
    "<unk>": r"<unk>",
    "space before punctuation": r" (?=[.,;:!?)\]}'\"%°])",
}

# An article starts at a level-1 heading: " = Title = " (one "=" each side; " = = Sub = = " is
# a section inside it).
_TITLE = re.compile(r"^ ?= [^=].* = ?$")


def detokenize(text: str) -> str:
    """Tokenized WikiText -> raw-style text (the rules above, in order)."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def split_articles(text: str) -> List[str]:
    """The tokenized text cut before each level-1 heading: one string per article, its lines as
    in the file (each ending in "\\n"). Lines before the first heading (the file's leading blank
    line) go with the first article."""
    articles = [""]
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")) and articles[-1].strip():
            articles.append("")
        articles[-1] += line
    return [a for a in articles if a.strip()]


def wikitext_documents(text: str) -> List[str]:
    """Document-level raw-style WikiText: each article detokenized, blank edges stripped."""
    return [detokenize(a).strip("\n") + "\n" for a in split_articles(text)]


def markup_spans(text: str) -> Dict[str, List[tuple]]:
    """{category: [(start, end), ...]} character spans of `MARKUP` in the tokenized text."""
    return {name: [m.span() for m in re.finditer(pattern, text)]
            for name, pattern in MARKUP.items()}
