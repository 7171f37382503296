"""Vocabulary pruning — see issue: vocabulary pruning."""
