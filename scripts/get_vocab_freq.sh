#!/usr/bin/env bash
# Token frequencies of a corpus for vocabulary pruning (parallel; progress bar).
# usage: bash scripts/get_vocab_freq.sh TOKENIZER FREQ_JSON DATA... [-- extra flags]
#   TOKENIZER  tokenizer.model (SentencePiece or Llama-3 tiktoken), tokenizer.json, or HF model dir
#   DATA       text files, .jsonl files (field "text"), or Megatron dataset PREFIX.bin
#   WORKERS    environment variable, default: all CPUs
# example: WORKERS=16 bash scripts/get_vocab_freq.sh Llama-2-7b/tokenizer.model freq.json books/*.txt
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: [WORKERS=N] bash scripts/get_vocab_freq.sh TOKENIZER FREQ_JSON DATA... [-- flags]" >&2
  exit 2
fi
TOKENIZER=$1 SAVE=$2
shift 2
DATA=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do DATA+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the "--"
exec python -m megatron_prune vocab-freq --tokenizer "$TOKENIZER" --data "${DATA[@]}" \
  --save "$SAVE" --workers "${WORKERS:-$(nproc)}" "$@"
