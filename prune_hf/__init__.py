"""The seed's HF pruning entry point: `python prune_hf/prune_llama.py` (same as `megatron-prune prune-hf`)."""
