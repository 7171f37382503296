"""import-gguf: a GGUF file (llama.cpp) -> a Hugging Face Llama directory, through transformers."""
from __future__ import annotations

import argparse
import textwrap

from megatron_prune.checkpoint import gguf


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "import-gguf", help="GGUF file (llama.cpp) -> Hugging Face Llama directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Import a Llama-architecture GGUF file into a Hugging Face directory: "
            "config.json + safetensors (the weights transformers dequantizes from the GGUF "
            "blocks) + the tokenizer transformers rebuilds from the GGUF vocabulary. The file is "
            "checked first (complete, architecture 'llama'); nothing is written unless the "
            "import succeeds. Needs the `gguf` package.", 79),
        epilog="example:\n  megatron-prune import-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf "
               "--save smollm2-hf\n\nthen: megatron-prune hf-to-megatron --hf-dir smollm2-hf "
               "--save smollm2-tp3 --tensor-model-parallel-size 3")
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--save", required=True, help="output HF model directory")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="output dtype (default fp32: the dequantized values exactly)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=_run)


def _run(a) -> int:
    cfg = gguf.import_gguf(a.gguf, a.save, dtype=a.dtype, force=a.force)
    print(f"wrote {a.save} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_query_groups} KV groups, "
          f"vocab {cfg.vocab_size}, {cfg.num_params():,} parameters)")
    return 0
