#!/usr/bin/env python3
"""Megatron-LM's `tools/preprocess_data.py`, same flags: a thin wrapper over
`megatron-prune preprocess` (see `megatron_prune/preprocess.py`).

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/data \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
