"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def stories260k_hf(tmp_path_factory) -> Path:
    """stories260K (llama2.c, ../shared/data) imported to a Hugging Face directory, fp32, with
    its tokenizer. Read-only for tests: copy it before changing anything."""
    from megatron_prune.checkpoint.llama2c import import_llama2c

    src = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K"
    out = tmp_path_factory.mktemp("stories260k") / "hf"
    import_llama2c(src / "stories260K.bin", src / "tok512.bin", out, dtype="fp32")
    return out
