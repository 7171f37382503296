#!/usr/bin/env bash
# The main job on a small default: the real stories260K model (llama2.c, trained on TinyStories)
# through the checkpoint and pruning pipeline on CPU:
#   llama2.c -> HF -> Megatron TP2·PP2 -> logit check against HF over 4 gloo processes ->
#   activation importance on model-sampled text -> prune 50% of heads and FFN on the shards ->
#   export to HF -> generate.
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
  --samples 64 --seq-length 128 --save "$OUT/scores.pt"

step "prune 50% of attention heads (8 -> 4, 1 per KV group) and FFN (172 -> 86) on the TP2·PP2 shards"
megatron-prune prune --load "$OUT/tp2pp2" --save "$OUT/pruned_tp2pp2" \
  --num-attention-heads-remain 4 --ffn-hidden-size-remain 86 \
  --importance activation --scores "$OUT/scores.pt" --prune-type balance

step "reshard the pruned model to TP=1 and export it to Hugging Face"
bash "$ROOT/scripts/transfer.sh" "$OUT/pruned_tp2pp2" "$OUT/pruned_tp1" 1 1
megatron-prune megatron-to-hf --load "$OUT/pruned_tp1" --save "$OUT/pruned_hf"
megatron-prune generate --model "$OUT/pruned_hf" --max-new-tokens 60

step "done: outputs in $OUT (prune plan: $OUT/pruned_tp2pp2/prune_plan.json)"
