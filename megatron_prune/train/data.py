"""Training data: megatron-core GPTDatasets over indexed datasets, and the order samples are used in.

`build_datasets` makes the train / valid / test `GPTDataset`s (blended when `--data-path` names
several prefixes with weights) through megatron-core's `BlendedMegatronDatasetBuilder`; rank 0
builds the index caches first, the others then read them.

The order is Megatron-LM's pretraining sampler: iteration `i` uses the global samples
`[consumed, consumed + global_batch)`; micro-batch `j` of data-parallel rank `r` holds samples
`consumed + j * micro * dp + r * micro + [0, micro)`. So a run is fully described by the number of
samples consumed: resuming from a checkpoint continues with exactly the next sample, and a run at
DP = 2 sees the same global batches as one at DP = 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from megatron_prune.checkpoint.config import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- tokenizer facts
@dataclass
class TokenizerInfo:
    """What GPTDataset needs from a tokenizer: the vocab size and the end-of-document id.

    (`pad` is left undefined on purpose: megatron then uses -1, which no real token has.)
    """
    vocab_size: int
    eod: int
    name: str = "checkpoint"
    unique_identifiers: dict = field(default_factory=dict)

    def __post_init__(self):
        self.unique_identifiers = {"class": "TokenizerInfo", "vocab_size": self.vocab_size,
                                   "eod": self.eod, "name": self.name}


def tokenizer_info(tokenizer_type: Optional[str], tokenizer_model: Optional[str],
                   vocab_size: Optional[int], eos_id: Optional[int],
                   eod_id: Optional[int] = None) -> TokenizerInfo:
    """From an explicit tokenizer, else from the model (its vocab and `eos_token_id`)."""
    name = tokenizer_type or "checkpoint"
    if tokenizer_type in ("HuggingFaceTokenizer",):
        if not tokenizer_model:
            raise ConfigError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_model)
        vocab_size, eos_id = len(tok), tok.eos_token_id
    elif tokenizer_type in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        if not tokenizer_model:
            raise ConfigError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
        vocab_size, eos_id = sp.vocab_size(), sp.eos_id()
    elif tokenizer_type == "TikTokenizer":
        # the vocabulary and end-of-document id of a tiktoken model are the checkpoint's
        if not tokenizer_model:
            raise ConfigError("--tokenizer-type TikTokenizer needs --tokenizer-model")
    elif tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
        eos_id = vocab_size - 1  # as Megatron-LM's NullTokenizer: the last id ends documents
    eod = eod_id if eod_id is not None else eos_id
    if vocab_size is None:
        raise ConfigError("cannot tell the vocabulary size: give --vocab-size or a tokenizer")
    if eod is None:
        eod = vocab_size - 1
        log.warning("no end-of-document id known (no tokenizer, no eos_token_id in the "
                    "checkpoint); using %d; pass --eod-id to set it", eod)
    return TokenizerInfo(vocab_size=int(vocab_size), eod=int(eod), name=name)


# ---------------------------------------------------------------------------- datasets
def parse_blend(data_path: List[str], flag: str = "--data-path"):
    """`["p"]`, `["p1", "p2"]` or `["w1", "p1", "w2", "p2"]` -> (prefixes, weights or None)."""
    items = [p for item in data_path for p in str(item).split()]
    if not items:
        raise ConfigError(f"{flag} is empty")

    def number(x):
        try:
            return float(x)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(number(w) is not None for w in items[0::2]):
        weights, prefixes = [number(w) for w in items[0::2]], items[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{flag} weights must be non-negative, not all zero: {weights}")
    else:
        weights, prefixes = None, items
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(p + ext).is_file():
                raise ConfigError(f"{flag} {p}: no {p + ext} (give the prefix of an "
                                  "indexed dataset written by `megatron-prune preprocess`)")
    return prefixes, weights


def parse_split(split: str) -> str:
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {split!r}: give weights like 969,30,1") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"--split {split!r}: one to three non-negative weights")
    return ",".join(parts)


def nonempty_split(prefixes, split: str) -> str:
    """`split` with the weight of any part that would hold no document of some dataset set to
    0 (megatron-core 0.16.1 loops forever building a GPTDataset over zero documents)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    weights = [float(w) for w in split.split(",")] + [0.0] * (3 - len(split.split(",")))
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        docs = len(IndexedDataset(prefix).sequence_lengths)
        for i, part in enumerate(matrix):
            if part is not None and weights[i] > 0 and \
                    int(round(part[1] * docs)) <= int(round(part[0] * docs)):
                if i == 0:
                    raise ConfigError(f"--split {split}: {prefix} has {docs} documents, "
                                      "none of them in the training part")
                log.warning("--split %s: the %s part of %s holds no document; leaving it out",
                            split, ("train", "validation", "test")[i], prefix)
                weights[i] = 0.0
    return ",".join(f"{w:g}" for w in weights)


def build_datasets(*, data_path, split, mock, seq_length, seed, tokenizer: TokenizerInfo,
                   sizes, cache_path=None, reset_position_ids=False, reset_attention_mask=False,
                   eod_mask_loss=False, split_paths=None):
    """[train, valid, test] datasets (None for a split with no weight) of `sizes` samples.

    `split_paths` = (train, valid, test) data paths (each a `--data-path`-style list, possibly
    empty) gives every split data of its own instead of cutting `data_path` by `split`."""
    from megatron_prune.checkpoint.mcore_import import quiet_megatron_import
    with quiet_megatron_import():
        from megatron.core.datasets.blended_megatron_dataset_builder import \
            BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    blend = per_split = None
    if split_paths is not None and any(split_paths):
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        blends = [parse_blend(p, f) if p else None for p, f in zip(split_paths, flags)]
        # a split nobody asks samples of (no evaluation) is checked above but not built
        per_split = [b if n else None for b, n in zip(blends, sizes)]
        split = None
    elif not mock:
        blend = parse_blend(data_path)
        split = nonempty_split(blend[0], parse_split(split))
    else:
        split = "1,1,1"
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=per_split,
        split=split,
        path_to_cache=cache_path, tokenizer=tokenizer,
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        # The causal mask is implied (SDPA's is_causal); a mask tensor only when documents
        # must not see each other.
        create_attention_mask=reset_attention_mask,
        mmap_bin_files=True)
    cls = MockGPTDataset if mock else GPTDataset
    with quiet_megatron_import():
        return BlendedMegatronDatasetBuilder(cls, list(sizes), lambda: True, config).build()


# ---------------------------------------------------------------------------- sample order
def micro_batch_indices(consumed: int, global_batch: int, micro_batch: int, dp_size: int,
                        dp_rank: int) -> List[List[int]]:
    """This DP rank's micro-batches (lists of sample indices) of the global batch that starts
    after `consumed` samples."""
    per_step = micro_batch * dp_size
    if global_batch % per_step:
        raise ConfigError(f"global batch {global_batch} is not a multiple of micro-batch "
                          f"{micro_batch} x data-parallel size {dp_size}")
    return [[consumed + j * per_step + dp_rank * micro_batch + k for k in range(micro_batch)]
            for j in range(global_batch // per_step)]


_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def collate(dataset, indices: List[int], device) -> dict:
    """Stack samples of a dataset into a micro-batch on `device`."""
    n = len(dataset)
    samples = [dataset[i % n] for i in indices]
    batch = {}
    for key in _KEYS:
        if key in samples[0]:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(
                device, non_blocking=True)
    return batch


class BatchSource:
    """Micro-batches of one split for this rank, in the sampler's order (see module doc)."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_size: int,
                 dp_rank: int, device, num_workers: int = 0):
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.device = device
        self.num_workers = num_workers
        self._pool = None

    def global_batch_at(self, consumed: int) -> List[dict]:
        """The micro-batches of the global batch that starts after `consumed` samples."""
        groups = micro_batch_indices(consumed, self.global_batch, self.micro_batch,
                                     self.dp_size, self.dp_rank)
        if self.num_workers > 0:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.num_workers)
            return list(self._pool.map(lambda g: collate(self.dataset, g, self.device), groups))
        return [collate(self.dataset, g, self.device) for g in groups]

