"""HF-checkpoint pruning (prune_hf/prune_llama.py) — see issue: pruning."""
