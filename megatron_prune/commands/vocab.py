"""vocab-freq, prune-vocab and prune-embeddings (vocabulary pruning, `megatron_prune/vocab/`)."""
from __future__ import annotations

import argparse
import os


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "vocab-freq", help="count token frequencies of a corpus (parallel)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Count how often each token id of a tokenizer occurs in text files, JSONL "
                    "files (one document per line) or a Megatron indexed dataset (PREFIX.bin + "
                    "PREFIX.idx, counted as stored). Inputs are cut into ~1 MiB blocks of whole "
                    "lines that --workers processes encode in parallel. The tokenizer is a "
                    "SentencePiece model, a tiktoken BPE ranks file (Llama-3 tokenizer.model), a "
                    "Hugging Face tokenizer.json, or an HF model directory holding one.",
        epilog="example:\n  megatron-prune vocab-freq --tokenizer llama2/tokenizer.model "
               "--data books/*.txt c4.jsonl --save freq.json --workers 8")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or HF model directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="text files, .jsonl files, or Megatron dataset PREFIX(.bin|.idx)")
    p.add_argument("--save", required=True, help="output freq.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all CPUs; 1 = in this process)")
    p.add_argument("--json-key", default="text", help="document field of .jsonl input (default text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save file")
    p.set_defaults(func=_freq)

    p = sub.add_parser(
        "prune-vocab", help="prune a tokenizer by frequency; write it and the old->new id map",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Keep the most frequent tokens of a vocab-freq count (by --keep, --coverage "
                    "or --min-count) plus, always, special/control tokens and every byte-fallback "
                    "or base-byte token, so any text still encodes. For BPE tokenizers a kept "
                    "token also keeps the tokens the merges build it from, so every text whose "
                    "tokens were all kept encodes to exactly the mapped ids; tokens no text can "
                    "encode to are dropped and reported. Writes the pruned tokenizer (same format: "
                    "tokenizer.model, tokenizer.json, or a tiktoken ranks file + "
                    "tiktoken_config.json with the renumbered special tokens) and vocab_map.json.",
        epilog="example:\n  megatron-prune prune-vocab --tokenizer llama2/tokenizer.model "
               "--freq freq.json --coverage 0.999 --save llama2-pruned")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or HF model directory")
    p.add_argument("--freq", required=True, help="freq.json written by vocab-freq")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=int, help="keep at most N tokens in all")
    g.add_argument("--coverage", type=float,
                   help="keep the most frequent tokens covering this share of the counted tokens")
    g.add_argument("--min-count", type=int, help="keep tokens counted at least C times")
    p.add_argument("--keep-tokens", default=None,
                   help="always keep these: a text file (each line's tokens) or a JSON list of "
                        "ids and strings")
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=_prune_vocab)

    p = sub.add_parser(
        "prune-embeddings", help="apply a vocab_map.json to an HF or Megatron checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Keep the embedding (and untied output layer) rows of the kept tokens, in "
                    "new-id order, reading only those rows. HF: sharded safetensors, config "
                    "vocab_size and bos/eos/pad ids, generation_config.json. Megatron: the same "
                    "TP/PP, layer spec and format, vocab-parallel tensors re-padded to a multiple "
                    "of make-vocab-size-divisible-by x TP. The pruned tokenizer is copied along. "
                    "Refuses a checkpoint whose vocab size or tokenizer is not the map's.",
        epilog="examples:\n  megatron-prune prune-embeddings --map llama2-pruned/vocab_map.json "
               "--hf-dir Llama-2-7b --save Llama-2-7b-pruned\n"
               "  megatron-prune prune-embeddings --map llama2-pruned --load ckpt/tp2 "
               "--save ckpt/tp2-pruned")
    p.add_argument("--map", required=True, help="vocab_map.json (or the prune-vocab directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    src.add_argument("--load", help="Megatron checkpoint directory")
    p.add_argument("--save", required=True, help="output directory (same format as the input)")
    p.add_argument("--tokenizer", default=None,
                   help="the checkpoint's tokenizer, to check against the map (default: the one "
                        "stored with the checkpoint, if any)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="HF safetensors shard size")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=_prune_embeddings)


def _freq(a) -> int:
    from megatron_prune.vocab.freq import vocab_freq
    f = vocab_freq(a.tokenizer, a.data, a.save, workers=a.workers, json_key=a.json_key,
                   force=a.force, progress=not a.no_progress)
    print(f"wrote {a.save}: {f.tokens:,} tokens in {f.documents:,} documents, "
          f"{int((f.counts > 0).sum()):,} of {len(f.counts):,} ids used "
          f"({f.seconds:.1f} s, {f.workers} workers)")
    return 0


def _prune_vocab(a) -> int:
    from megatron_prune.vocab.prune import prune_vocab
    vmap, sel = prune_vocab(a.tokenizer, a.freq, a.save, keep=a.keep, coverage=a.coverage,
                            min_count=a.min_count, keep_tokens=a.keep_tokens, force=a.force)
    print(f"wrote {a.save}: {vmap.old_vocab_size:,} -> {vmap.new_vocab_size:,} tokens "
          f"({sel.required:,} required, {sel.added_for_merges:,} kept for merges, "
          f"{len(sel.unreachable):,} unreachable dropped; coverage {sel.coverage:.5f})")
    return 0


def _prune_embeddings(a) -> int:
    from megatron_prune.vocab.embeddings import prune_embeddings
    cfg = prune_embeddings(a.map, a.save, hf_dir=a.hf_dir, load=a.load, tokenizer=a.tokenizer,
                           force=a.force, max_shard_bytes=int(a.max_shard_size_gb * 2**30))
    print(f"wrote {a.save}: vocab_size {cfg.vocab_size:,}, {cfg.num_params():,} parameters")
    return 0
