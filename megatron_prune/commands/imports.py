"""import-llama2c and import-gguf: other formats -> a Hugging Face Llama directory."""
from __future__ import annotations

import argparse
import textwrap

from megatron_prune.checkpoint import gguf, llama2c


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "import-llama2c", help="llama2.c checkpoint (.bin) + tokenizer.bin -> Hugging Face Llama",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Import a model exported by Karpathy's llama2.c (legacy format, or version 1 "
            "with the 'ak42' magic; fp32) into a Hugging Face Llama directory: "
            "config.json + model.safetensors, plus tokenizer.model (SentencePiece BPE "
            "rebuilt from the llama2.c tokenizer.bin), tokenizer_config.json and "
            "special_tokens_map.json, so that transformers' AutoModelForCausalLM and "
            "AutoTokenizer load it. q/k rows are permuted from llama2.c's interleaved "
            "RoPE pairs to HF's rotate-half layout; RoPE theta 10000, RMSNorm eps 1e-5, "
            "bos 1, eos 2, max_position_embeddings = the checkpoint's seq_len. The "
            "checkpoint's size must match its header exactly.", 79),
        epilog="example:\n  megatron-prune import-llama2c --checkpoint stories260K.bin "
               "--tokenizer tok512.bin --save stories260K-hf\n\n"
               "then: AutoModelForCausalLM.from_pretrained('stories260K-hf'), "
               "AutoTokenizer.from_pretrained('stories260K-hf')")
    p.add_argument("--checkpoint", required=True,
                   help="llama2.c model file (e.g. stories15M.bin, stories260K.bin)")
    p.add_argument("--tokenizer", default=None,
                   help="llama2.c tokenizer file (tokenizer.bin for the 32000-piece Llama-2 "
                        "vocab, tok512.bin for stories260K); omit to write the model only")
    _output_args(p, "default fp32, llama2.c's own")
    p.set_defaults(func=lambda a: _report(a, llama2c.import_llama2c(
        a.checkpoint, a.tokenizer, a.save, dtype=a.dtype, force=a.force)))
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
    _output_args(p, "default fp32: the dequantized values exactly")
    p.set_defaults(func=lambda a: _report(a, gguf.import_gguf(a.gguf, a.save, dtype=a.dtype,
                                                             force=a.force)))


def _output_args(p, dtype_default: str) -> None:
    p.add_argument("--save", required=True, help="output HF model directory")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help=f"output dtype ({dtype_default})")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def _report(a, cfg) -> int:
    print(f"wrote {a.save} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_query_groups} KV groups, "
          f"vocab {cfg.vocab_size}, {cfg.num_params():,} parameters)")
    return 0
