"""Project Gutenberg books as training text: the licence header and footer stripped.

Every Gutenberg file wraps the book between a `*** START OF ... ***` line and an
`*** END OF ... ***` line (sometimes indented, sometimes `***START OF`); what lies outside is the
same licence boilerplate in every book. `strip_gutenberg` keeps only the text between those lines,
with CRLF (and lone CR) line ends turned into LF and the blank lines at either end removed (and
the one-line "End of the Project Gutenberg EBook of ..." footer some books put just before the END
line).

The books come from a directory (the unpacked `gutenberg_en.tar.xz`) or straight from the
archive; both give the books sorted by file name, so "the last N books" means the same books
everywhere (the validation hold-out of `scripts/prepare_gutenberg.sh`).
"""
from __future__ import annotations

import csv
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from megatron_prune.checkpoint.config import ConfigError

log = logging.getLogger(__name__)

_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF\b.*$", re.MULTILINE)
_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF\b.*$", re.MULTILINE)
# The one-line footer older books put just before the END line ("End of the Project Gutenberg
# EBook of Emma, by Jane Austen"), and the licence of books from before the END convention.
_FOOTER = re.compile(r"^[ \t]*End of (the )?Project Gutenberg", re.MULTILINE | re.IGNORECASE)
_OLD_LICENCE = re.compile(r"^\**(The Legal Small Print|START\**THE SMALL PRINT|"
                          r"The Project Gutenberg Etext of )", re.MULTILINE | re.IGNORECASE)
_FOOTER_REACH = 1000  # characters before the END line in which the footer line is looked for


def strip_gutenberg(text: str, name: str = "book") -> str:
    """The book between the `*** START OF` and `*** END OF` lines, LF line ends, no blank lines
    at either end, without the "End of the Project Gutenberg EBook of ..." line that older books
    put just before the END line. A book without an END line (a few old etexts) ends where the
    old etext header and "Small Print" licence or that footer line begins, whichever comes first. Raises
    ConfigError when there is no START line."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start is None:
        raise ConfigError(f"{name}: no '*** START OF' line; not a Project Gutenberg text?")
    end = _END.search(text, start.end())
    if end is not None:
        stop = end.start()
        footer = _FOOTER.search(text, max(start.end(), stop - _FOOTER_REACH), stop)
        if footer is not None:
            stop = footer.start()
    else:
        stops = [m.start() for m in (_FOOTER.search(text, start.end()),
                                     _OLD_LICENCE.search(text, start.end())) if m is not None]
        stop = min(stops, default=len(text))
        log.warning("%s: no '*** END OF' line; the book is cut at character %d of %d",
                    name, stop, len(text))
    return text[start.end():stop].strip("\n") + "\n"


def read_gutenberg_book(path) -> str:
    path = Path(path)
    return strip_gutenberg(decode_book(path.read_bytes(), path.name), path.name)


def decode_book(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text ({e})") from e


def gutenberg_files(directory) -> List[Path]:
    """The `.txt` books of an unpacked corpus directory (searched recursively), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    books = sorted(directory.rglob("*.txt"), key=lambda p: (p.name, str(p)))
    if not books:
        raise ConfigError(f"{directory}: no .txt books")
    return books


def gutenberg_titles(directory) -> Dict[str, str]:
    """file name -> title, from the corpus' INDEX.tsv when there is one."""
    index = next(Path(directory).rglob("INDEX.tsv"), None)
    if index is None:
        return {}
    with open(index, newline="", encoding="utf-8") as f:
        return {row["file"]: row.get("title", "") for row in csv.DictReader(f, delimiter="\t")}


def iter_gutenberg_archive(tar_path) -> Iterator[Tuple[str, str]]:
    """(file name, stripped text) for every book of a `.tar.xz` (or any tar), sorted by file
    name, without unpacking to disk. Reads the archive twice (names, then books in name order
    as they stream by), holding at most the books that arrive before their turn."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise ConfigError(f"{tar_path}: no such file")
    with tarfile.open(tar_path, "r:*") as tar:
        names = sorted(Path(m.name).name for m in tar if m.isfile() and m.name.endswith(".txt"))
    order = {n: i for i, n in enumerate(names)}
    waiting: Dict[int, str] = {}
    nxt = 0
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".txt")):
                continue
            name = Path(m.name).name
            waiting[order[name]] = strip_gutenberg(decode_book(tar.extractfile(m).read(), name), name)
            while nxt in waiting:
                yield names[nxt], waiting.pop(nxt)
                nxt += 1


def split_holdout(items: Sequence, holdout: int) -> Tuple[list, list]:
    """(train, validation): the last `holdout` items (in the given order) are held out."""
    if not 0 <= holdout < len(items):
        raise ConfigError(f"cannot hold out {holdout} of {len(items)} books")
    cut = len(items) - holdout
    return list(items[:cut]), list(items[cut:])


def write_gutenberg_jsonl(directory, train_jsonl, valid_jsonl, valid_books: int = 5) -> dict:
    """Unpacked corpus -> two jsonl files of `{"text", "file", "title"}`, one book per line; the
    last `valid_books` books by file name go to `valid_jsonl`. Returns counts per split."""
    books = gutenberg_files(directory)
    titles = gutenberg_titles(directory)
    train, valid = split_holdout(books, valid_books)
    counts = {}
    for split, paths, out in (("train", train, train_jsonl), ("valid", valid, valid_jsonl)):
        chars = 0
        with open(out, "w", encoding="utf-8") as f:
            for p in paths:
                text = read_gutenberg_book(p)
                chars += len(text)
                f.write(json.dumps({"text": text, "file": p.name, "title": titles.get(p.name, "")},
                                   ensure_ascii=False) + "\n")
        counts[split] = {"books": len(paths), "chars": chars, "files": [p.name for p in paths]}
    return counts
