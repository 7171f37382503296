"""megatron-prune: prune Llama-family checkpoints to any shape on Megatron TP/PP shards."""
__version__ = "0.1.0"
