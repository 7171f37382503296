"""Preprocessing's inputs: glob patterns resolved to files, and their records read lazily.

A `.jsonl` / `.json` file holds one JSON object per line (its text under each json key: a string,
or a list of strings taken as sentences, as Megatron-LM reads it); any other file is one plain
UTF-8 document. Records are raw bytes until a worker decodes them (`_fields`), so the reading
process stays cheap.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_prune.checkpoint.config import ConfigError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")


def resolve_inputs(patterns: Iterable[str]) -> List[Path]:
    """Files named or matched by glob patterns, in the order given (each glob sorted)."""
    import glob
    files: List[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if any(c in pattern for c in "*?["):
            matched = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            matched = [m for m in matched if m.is_file()]
            if not matched:
                raise ConfigError(f"--input {pattern}: the pattern matches no file")
            files.extend(matched)
        else:
            path = Path(pattern)
            if path.is_dir():
                raise ConfigError(f"--input {pattern} is a directory; name its files or a glob "
                                  f"such as '{pattern}/*.jsonl'")
            if not path.is_file():
                raise ConfigError(f"--input {pattern}: no such file")
            files.append(path)
    if not files:
        raise ConfigError("no --input files")
    unique = list(dict.fromkeys(files))
    if len(unique) != len(files):
        log.warning("--input names %d file(s) more than once; each is read once",
                    len(files) - len(unique))
    return unique


def is_jsonl(path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def _check_first_record(path: Path, keys: Sequence[str]) -> None:
    """Fail before any work when the first object of a jsonl file lacks a key."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                _fields(str(path), n, line, keys)
                return


def _records(files: Sequence[Path]) -> Iterator[Tuple[str, int, bytes]]:
    """(file, line number, raw bytes): one per jsonl line (blank lines too, for the byte count),
    one per text file (line number 0)."""
    for path in files:
        if is_jsonl(path):
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    yield str(path), n, line
        else:
            yield str(path), 0, path.read_bytes()


def _fields(path: str, n: int, raw: bytes, keys: Sequence[str]) -> Optional[List]:
    """The texts of one record, one per key (a str, or a list of sentences); None if blank."""
    where = f"{path}:{n}" if n else path
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e})") from e
    if n == 0:
        return [text]
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not a JSON object ({e}); .jsonl inputs hold one object "
                          "per line") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a JSON {type(obj).__name__}, not an object")
    out = []
    for key in keys:
        if key not in obj:
            raise ConfigError(f"{where}: no key {key!r} (the object has {sorted(obj)}); "
                              "choose the text fields with --json-keys")
        value = obj[key]
        if not (isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
            raise ConfigError(f"{where}: {key!r} is a {type(value).__name__}, not text "
                              "(a string or a list of strings)")
        out.append(value)
    return out


# ---------------------------------------------------------------------------------- encoding
