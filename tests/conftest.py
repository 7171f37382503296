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


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (../shared/data, GGUF) imported to a Hugging Face directory, fp32
    (the dequantized weights), with its tokenizer. Read-only for tests."""
    pytest.importorskip("gguf")
    from megatron_prune.checkpoint.gguf import import_gguf

    src = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models"
           / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(src, out)
    return out


@pytest.fixture(scope="session")
def stories260k_calib_text(stories260k_hf, tmp_path_factory) -> Path:
    """24 texts of 96 tokens sampled from stories260K (seed 0), one calibration file."""
    import sys

    from megatron_prune.checkpoint.hf_model import load_hf_model
    from megatron_prune.data.calibration import load_tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from prune_quality import sample_text

    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text("\n\n".join(sample_text(load_hf_model(stories260k_hf),
                                            load_tokenizer(stories260k_hf), 24, 96, 0)))
    return text
