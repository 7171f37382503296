"""The JSON files vocabulary pruning writes (frequencies, vocabulary maps): one reader that names the
file, what it should be and which command writes it when it is missing, broken or foreign."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_prune.checkpoint.config import ConfigError


def read_tagged(path: Path, what: str, fmt: str, writer: str) -> dict:
    """The object of a JSON file whose "format" field is `fmt`, or a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file ({writer} writes it)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ConfigError(f"{path} is not a {what} written by {writer}")
    return obj
