"""Vocabulary pruning: keep the tokens a corpus uses, in the tokenizer and in the checkpoint.

Three steps, each a `megatron-prune` command and a library call:

1. `vocab-freq`        `freq.count_frequencies` / `freq.vocab_freq`: token counts over text, JSONL
                       or a Megatron indexed dataset, with parallel workers;
2. `prune-vocab`       `prune.prune_vocab`: a criterion (`--keep`, `--coverage`, `--min-count`)
                       -> the pruned tokenizer (SentencePiece, HF tokenizer.json BPE or tiktoken)
                       and `vocab_map.json`, the old -> new id map tied to both tokenizers by
                       fingerprint;
3. `prune-embeddings`  `embeddings.prune_embeddings`: the map applied to an HF or Megatron
                       checkpoint through `VocabMappedSource` and the checkpoint layer's writers.

`bpe.py` explains why kept tokens bring their merge trees; `base.py` the tokenizer interface, `load.py` which kind a file is.
"""
