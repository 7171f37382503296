"""preprocess: text / jsonl -> Megatron indexed datasets, with Megatron-LM's preprocess_data.py flags."""
from __future__ import annotations

import argparse

from megatron_prune.data import preprocess as pre
from megatron_prune.data.tokenizers import add_tokenizer_args, spec_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help=".jsonl files (one JSON object per line) or plain text files (one "
                        "document each); several files or glob patterns, read in the order given")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys of the jsonl objects to tokenize, one dataset each (default: text)")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk Punkt, untrained: no downloaded data; "
                        "it knows no abbreviations, so 'Mr. Smith' is split)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences, keep the newlines after a sentence in it")
    g.add_argument("--lang", default="english",
                   help="accepted for Megatron-LM compatibility; the untrained splitter has no "
                        "per-language data")
    add_tokenizer_args(p)
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_{key}_document.bin/.idx (_sentence with --split-sentences)")
    g.add_argument("--force", action="store_true", help="overwrite existing outputs")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes in all, shared among the partitions (default 1)")
    g.add_argument("--partitions", type=int, default=1,
                   help="write N contiguous groups of the input files in parallel and merge "
                        "them in order (same output; at most one partition per file; default 1)")
    g.add_argument("--chunk-size", type=int, default=32,
                   help="documents sent to a worker at a time (default 32)")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines when stderr is not a terminal "
                        "(a tqdm bar otherwise)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted for Megatron-LM compatibility: the input order is always kept")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="text / jsonl -> Megatron indexed dataset (.bin/.idx)",
        description="Tokenize text or jsonl files into Megatron indexed datasets with "
                    "megatron-core's IndexedDatasetBuilder, as Megatron-LM's "
                    "tools/preprocess_data.py does (same flags). Writes into a temporary "
                    "directory renamed at the end; refuses to overwrite without --force.",
        epilog="example: megatron-prune preprocess --input data/*.jsonl --output-prefix "
               "data/books --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model "
               "--append-eod --workers 8")
    add_arguments(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    result = pre.preprocess(pre.PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer=spec_from_args(a),
        json_keys=a.json_keys, append_eod=a.append_eod, split_sentences=a.split_sentences,
        keep_newlines=a.keep_newlines, workers=a.workers, partitions=a.partitions,
        chunk_size=a.chunk_size, log_interval=a.log_interval, force=a.force))
    mb = result.bytes_read / 2**20
    print(f"read {len(result.input_files)} file(s), {mb:.1f} MiB in {result.seconds:.1f} s "
          f"({mb / max(result.seconds, 1e-9):.2f} MiB/s); token dtype {result.dtype} "
          f"(vocab {result.vocab_size})")
    for key, prefix in result.outputs.items():
        s = result.stats[key]
        skipped = f", {s.empty} empty skipped" if s.empty else ""
        print(f"wrote {prefix}.bin/.idx: {s.documents} documents, {s.sequences} sequences, "
              f"{s.tokens} tokens{skipped}")
    return 0
