"""Books streamed out of the Gutenberg archive (shared/data/corpus/gutenberg_en.tar.xz), in
archive order and stopping early, for frequency counting. The header/footer stripping (and the
CRLF -> LF normalisation) is the project's one rule in `megatron_prune.data.corpus`, the same that
prepares training data, so counted and trained text agree.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator, Optional

from megatron_prune.data.corpus import decode_book, strip_gutenberg


def iter_gutenberg(tar_path, limit: Optional[int] = None, skip: int = 0) -> Iterator[tuple]:
    """(file name, stripped text) of the books in archive order, streaming (stops early)."""
    n = 0
    with tarfile.open(Path(tar_path), "r:*") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".txt")):
                continue
            n += 1
            if n <= skip:
                continue
            name = Path(m.name).name
            yield name, strip_gutenberg(decode_book(tar.extractfile(m).read(), name), name)
            if limit is not None and n - skip >= limit:
                return
