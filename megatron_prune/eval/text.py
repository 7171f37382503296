"""What text a perplexity evaluation scores: the documents of --data (`read_documents`).

Kept free of torch so that the CLI's parser can list the modes without importing it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.eval.wikitext import wikitext_documents

# What a .txt file of --data holds (--txt-mode); a .jsonl holds one document per row always.
TXT_MODES = {
    "document": "each .txt file is one document, its text as is",
    "lines": "each line of a .txt file is a row, the rows joined by blank lines (\\n\\n) into "
             "one document per file (WikiText-style files whose lines are paragraphs)",
    "wikitext": "tokenized WikiText: split into articles at ' = Title = ' lines, each "
                "detokenized (' @-@ ' -> '-', ' , ' -> ', ', ...) as lm-eval's wikitext task",
}


def read_documents(files, json_key: str = "text", txt_mode: str = "document") -> List[str]:
    """The documents of --data: one per row of a .jsonl; for a .txt, as `txt_mode` says
    (`TXT_MODES`)."""
    if txt_mode not in TXT_MODES:
        raise ConfigError(f"--txt-mode {txt_mode}: choose from {', '.join(TXT_MODES)}")
    from megatron_prune.data.calibration import iter_documents
    docs = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"--data {f}: no such file")
        if p.suffix in (".jsonl", ".json") or txt_mode == "document":
            docs.extend(iter_documents([p], json_key))
        elif txt_mode == "lines":
            docs.append("\n\n".join(p.read_text(encoding="utf-8").splitlines()))
        else:
            docs.extend(wikitext_documents(p.read_text(encoding="utf-8")))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError("no evaluation text in --data")
    return docs


def data_protocol(files, txt_mode: str) -> str:
    """How `read_documents` read --data, for a result's detail."""
    kinds = {"jsonl rows" if Path(f).suffix in (".jsonl", ".json") else f"txt mode {txt_mode}"
             for f in files}
    return " + ".join(sorted(kinds))
