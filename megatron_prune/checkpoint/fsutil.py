"""Output directories that never look complete unless they are: temp dir, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_output(path, force: bool) -> Path:
    """Refuse a non-empty output directory unless --force (checked before any work starts)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError(f"output {path} exists and is not a directory")
        if any(path.iterdir()) and not force:
            raise OutputExistsError(f"output directory {path} is not empty; pass --force to overwrite it")
    return path


@contextlib.contextmanager
def atomic_output_dir(path, force: bool = False):
    """Yield a temporary sibling directory; on success it replaces `path`, on any error
    (Ctrl-C included) it is removed, leaving `path` as it was."""
    path = check_output(path, force).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
