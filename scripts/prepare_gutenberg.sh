#!/usr/bin/env bash
# The Gutenberg corpus (../shared/data/corpus/gutenberg_en.tar.xz, 101 English books) as Megatron
# indexed datasets for pretraining / recovery training:
#   unpack into a temp dir -> keep only the text between each book's `*** START OF` and
#   `*** END OF` lines, CRLF -> LF (megatron_prune/data/corpus.py) -> one jsonl line per book, the last
#   5 books by file name held out for validation -> tokenize with the Llama-2 tokenizer, EOD after
#   every book (megatron-prune preprocess).
# usage: bash scripts/prepare_gutenberg.sh [OUTDIR] [WORKERS]
#   OUTDIR   default out/gutenberg; writes OUTDIR/gutenberg_{train,valid}_text_document.{bin,idx}
#   WORKERS  tokenizer processes (default 2)
# env: DATA (default ../shared/data), TOKENIZER_TYPE / TOKENIZER_MODEL (default Llama2Tokenizer and
#   $DATA/tokenizers/llama2/tokenizer.model), VALID_BOOKS (default 5), FORCE=1 to overwrite.
# The datasets are the prefixes OUTDIR/gutenberg_train_text_document and
# OUTDIR/gutenberg_valid_text_document (Megatron's --data-path takes such prefixes).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/out/gutenberg}
WORKERS=${2:-2}
DATA=${DATA:-$ROOT/../shared/data}
ARCHIVE=$DATA/corpus/gutenberg_en.tar.xz
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA/tokenizers/llama2/tokenizer.model}
VALID_BOOKS=${VALID_BOOKS:-5}
FORCE_FLAG=(); [ "${FORCE:-0}" = 1 ] && FORCE_FLAG=(--force)
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

[ -f "$ARCHIVE" ] || { echo "missing $ARCHIVE: put shared/data beside the repo or set DATA" >&2; exit 2; }
[ -f "$TOKENIZER_MODEL" ] || { echo "missing tokenizer $TOKENIZER_MODEL" >&2; exit 2; }
mkdir -p "$OUT"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gutenberg.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

step "unpack $ARCHIVE into $TMP"
tar -xJf "$ARCHIVE" -C "$TMP/"
mkdir "$TMP/jsonl"

step "strip the Gutenberg header/footer, write jsonl (last $VALID_BOOKS books by file name -> validation)"
python3 - "$TMP" "$TMP/jsonl" "$VALID_BOOKS" <<'EOF'
import sys
from megatron_prune.data.corpus import write_gutenberg_jsonl
src, dst, valid = sys.argv[1], sys.argv[2], int(sys.argv[3])
counts = write_gutenberg_jsonl(src, f"{dst}/train.jsonl", f"{dst}/valid.jsonl", valid_books=valid)
for split, c in counts.items():
    print(f"{split}: {c['books']} books, {c['chars'] / 1e6:.1f} M characters")
print("validation books:", " ".join(counts["valid"]["files"]))
EOF

for split in train valid; do
  step "tokenize $split ($TOKENIZER_TYPE, $WORKERS workers)"
  megatron-prune preprocess --input "$TMP/jsonl/$split.jsonl" \
    --output-prefix "$OUT/gutenberg_$split" \
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL" \
    --append-eod --workers "$WORKERS" --chunk-size 1 "${FORCE_FLAG[@]}"
done

step "done"
ls -l "$OUT"/gutenberg_*_text_document.*
