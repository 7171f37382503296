#!/usr/bin/env bash
# The main job on a small default: the real stories260K model (llama2.c, trained on TinyStories)
# through the whole pipeline on CPU:
#   llama2.c -> HF -> Megatron TP2·PP2 -> logit check against HF over 4 gloo processes ->
#   activation importance on model-sampled text -> prune about half the non-embedding parameters
#   (heads and FFN) on the shards -> recovery by distillation from the unpruned model with torchrun
#   on 2 gloo processes, and the same shape from random init on the same tokens -> export to HF ->
#   evaluate before/after -> report.md + loss_curves.png.
# usage: bash scripts/quickstart.sh [OUTDIR]     (needs ../shared/data beside the repo)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/out/quickstart}
DATA=${DATA:-$ROOT/../shared/data}
MODEL=$DATA/models/stories260K
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

[ -f "$MODEL/stories260K.bin" ] || { echo "missing $MODEL: put shared/data beside the repo" >&2; exit 2; }
python3 -c "import megatron_prune, megatron.core" 2>/dev/null || {
  step "installing megatron-prune (pip install -e $ROOT)"; python3 -m pip install -q -e "$ROOT"; }
rm -rf "$OUT"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

step "import the llama2.c checkpoint and tokenizer as a Hugging Face model"
megatron-prune import-llama2c --checkpoint "$MODEL/stories260K.bin" --tokenizer "$MODEL/tok512.bin" \
  --save "$OUT/hf"
megatron-prune generate --model "$OUT/hf" --max-new-tokens 60

step "convert to Megatron TP=2 · PP=2 (5 layers: 3 on the first stage, 2 on the last)"
megatron-prune hf-to-megatron --hf-dir "$OUT/hf" --save "$OUT/tp2pp2" \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --decoder-first-pipeline-num-layers 3 --dtype fp32

step "megatron-core GPTModel (4 gloo processes) vs Hugging Face logits"
torchrun --nproc_per_node 4 --master_port "${MASTER_PORT:-29533}" -m megatron_prune verify \
  --hf-dir "$OUT/hf" --load "$OUT/tp2pp2" --tolerance 1e-4

step "calibration text sampled from the model, then activation importance"
megatron-prune generate --model "$OUT/hf" --num-samples 64 --max-new-tokens 256 --temperature 1.0 \
  --seed 0 --save "$OUT/calibration.jsonl"
megatron-prune importance --load "$OUT/tp2pp2" --data "$OUT/calibration.jsonl" \
  --importance activation --samples 64 --seq-length 128 --save "$OUT/scores.pt"

step "prune 50% of attention heads (8 -> 4, 1 per KV group) and FFN (172 -> 86) on the TP2·PP2 shards"
megatron-prune prune --load "$OUT/tp2pp2" --save "$OUT/pruned_tp2pp2" \
  --num-attention-heads-remain 4 --ffn-hidden-size-remain 86 \
  --importance activation --scores "$OUT/scores.pt" --prune-type balance

step "training text sampled from the model, tokenized into a Megatron indexed dataset"
megatron-prune generate --model "$OUT/hf" --num-samples ${TRAIN_SAMPLES:-160} --max-new-tokens 256 \
  --temperature 1.0 --seed 1 --save "$OUT/train.jsonl"
megatron-prune generate --model "$OUT/hf" --num-samples 24 --max-new-tokens 256 --temperature 1.0 \
  --seed 2 --save "$OUT/heldout.jsonl"
megatron-prune preprocess --input "$OUT/train.jsonl" --output-prefix "$OUT/data/train" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/hf" --append-eod --workers 1

train() {  # NAME EXTRA_FLAGS...: the same recipe and the same tokens for both runs
  local name=$1; shift
  torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29533}" -m megatron_prune.train \
    --tensor-model-parallel-size 2 --data-path "$OUT/data/train_text_document" --split 90,10,0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/hf" \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 --train-iters ${TRAIN_ITERS:-120} \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.01 \
    --clip-grad 1.0 --eval-interval 20 --eval-iters 4 --log-interval 10 \
    --teacher "$OUT/tp2pp2" --kd-temperature 1.0 \
    --save "$OUT/$name" --save-interval 1000 --log-json "$OUT/$name.jsonl" "$@"
}
step "recover the pruned model: distillation from the unpruned model (TP=2, 2 gloo processes)"
train recovered --pretrained-checkpoint "$OUT/pruned_tp2pp2"
cp "$OUT/recovered.jsonl" "$OUT/recover.jsonl"
step "baseline: the same shape from random init, same recipe, same tokens"
train scratch --init random --pretrained-checkpoint "$OUT/pruned_tp2pp2"

step "evaluate perplexity on held-out sampled text (window 128)"
for m in "hf:teacher" "pruned_tp2pp2:pruned" "recovered:recovered" "scratch:scratch"; do
  src=${m%%:*} key=${m##*:}
  if [ "$src" = hf ]; then flag=(--hf-dir "$OUT/hf"); else flag=(--load "$OUT/$src" --tokenizer "$OUT/hf"); fi
  megatron-prune eval "${flag[@]}" --task ppl --data "$OUT/heldout.jsonl" --window 128 \
    --save "$OUT/eval_$key.json"
done

step "export the recovered model to Hugging Face (TP=1) and generate"
bash "$ROOT/scripts/transfer.sh" "$OUT/recovered" "$OUT/recovered_tp1" 1 1
megatron-prune megatron-to-hf --load "$OUT/recovered_tp1" --save "$OUT/recovered_hf" --tokenizer "$OUT/hf"
megatron-prune generate --model "$OUT/recovered_hf" --max-new-tokens 60

step "report"
python3 "$ROOT/scripts/quickstart_report.py" "$OUT"
step "done: $OUT/report.md, $OUT/loss_curves.png (prune plan: $OUT/pruned_tp2pp2/prune_plan.json)"
