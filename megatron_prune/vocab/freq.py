"""Token frequencies over text, JSONL or a Megatron indexed dataset, with parallel workers.

Inputs are cut into tasks the main process only describes (file, byte range on line boundaries;
or dataset, sequence range); each worker reads and encodes its tasks itself and returns sparse
counts, so the main process does almost nothing and W workers scale with W. Text files are
encoded in blocks of whole lines (~1 MiB), JSONL one document per line (field `--json-key`);
a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`) already holds ids and is only counted.

`freq.json`:

    {"format": "emb_pruner.freq", "version": 1, "tokenizer": {kind, fingerprint, vocab_size, path},
     "inputs": [...], "documents": n, "tokens": n, "bytes": n, "seconds": s, "workers": W,
     "counts": [count of id 0, count of id 1, ...]}
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import Vocabulary
from megatron_prune.vocab.jsonfile import read_tagged
from megatron_prune.vocab.load import load_vocabulary

log = logging.getLogger(__name__)

FORMAT = "emb_pruner.freq"
BLOCK_BYTES = 1 << 20
SEQUENCES_PER_TASK = 4096


@dataclass
class FreqCounts:
    counts: np.ndarray
    tokenizer: dict
    inputs: list = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    workers: int = 1

    def save(self, path) -> None:
        obj = {"format": FORMAT, "version": 1, "tokenizer": self.tokenizer, "inputs": self.inputs,
               "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
               "seconds": round(self.seconds, 3), "workers": self.workers,
               "counts": self.counts.tolist()}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> "FreqCounts":
        obj = read_tagged(Path(path), "frequency file", FORMAT, "vocab-freq")
        counts = np.asarray(obj["counts"], dtype=np.int64)
        return cls(counts, obj["tokenizer"], obj.get("inputs", []), obj.get("documents", 0),
                   obj.get("tokens", int(counts.sum())), obj.get("bytes", 0),
                   obj.get("seconds", 0.0), obj.get("workers", 1))

    def check_tokenizer(self, vocab: Vocabulary, path) -> None:
        if self.tokenizer["fingerprint"] != vocab.fingerprint or len(self.counts) != vocab.size:
            raise ConfigError(
                f"frequency file {path} was counted with another tokenizer: {self.tokenizer['kind']} "
                f"{self.tokenizer.get('path')} ({self.tokenizer['vocab_size']} tokens, fingerprint "
                f"{self.tokenizer['fingerprint'][:12]}), not {vocab.kind} {vocab.path} "
                f"({vocab.size} tokens, fingerprint {vocab.fingerprint[:12]})")


# ---------------------------------------------------------------------------- inputs -> tasks
def _indexed_prefix(p: Path) -> Optional[str]:
    """PREFIX for PREFIX.bin / PREFIX.idx / PREFIX when both files exist."""
    s = str(p)
    prefix = s[:-4] if s.endswith((".bin", ".idx")) else s
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return prefix
    return None


def _kind(p: Path) -> str:
    if _indexed_prefix(p) is not None and (p.suffix in (".bin", ".idx") or not p.is_file()):
        return "indexed"
    if not p.is_file():
        raise ConfigError(f"--data {p}: no such file (nor a PREFIX.bin/PREFIX.idx dataset)")
    return "jsonl" if p.suffix in (".jsonl", ".json") else "text"


def _line_blocks(path: Path, block: int) -> list:
    """[(start, end)) byte ranges of about `block` bytes that end on line boundaries."""
    size = path.stat().st_size
    out, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + block, size))
            if start + block < size:
                f.readline()
            end = min(f.tell(), size)
            out.append((start, end))
            start = end
    return out


def make_tasks(data: Sequence, block_bytes: int = BLOCK_BYTES,
               sequences_per_task: int = SEQUENCES_PER_TASK) -> tuple:
    """(tasks, described inputs, total work units for the progress bar: bytes or tokens)."""
    tasks, inputs, total = [], [], 0
    for d in data:
        p = Path(d)
        kind = _kind(p)
        if kind == "indexed":
            prefix = _indexed_prefix(p)
            from megatron.core.datasets.indexed_dataset import IndexedDataset
            ds = IndexedDataset(prefix)
            lengths = ds.sequence_lengths
            n = len(lengths)
            for lo in range(0, n, sequences_per_task):
                hi = min(n, lo + sequences_per_task)
                tasks.append(("indexed", prefix, lo, hi, int(lengths[lo:hi].sum())))
            inputs.append({"path": prefix, "kind": kind, "sequences": n,
                           "tokens": int(lengths.sum())})
            total += int(lengths.sum())
            del ds
        else:
            for lo, hi in _line_blocks(p, block_bytes):
                tasks.append((kind, str(p), lo, hi, hi - lo))
            inputs.append({"path": str(p), "kind": kind, "bytes": p.stat().st_size})
            total += p.stat().st_size
    return tasks, inputs, total


# ---------------------------------------------------------------------------- workers
_VOCAB: Optional[Vocabulary] = None
_JSON_KEY = "text"


def _init_worker(tokenizer_path: str, json_key: str) -> None:
    global _VOCAB, _JSON_KEY
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    if _VOCAB is None or str(_VOCAB.path) != tokenizer_path:  # not inherited through fork
        _VOCAB = load_vocabulary(tokenizer_path)
    _JSON_KEY = json_key


def _count(vocab: Vocabulary, json_key: str, task) -> tuple:
    """(ids, counts, documents, tokens, work units) of one task."""
    kind, path, lo, hi, units = task
    if kind == "indexed":
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        ds = IndexedDataset(path)
        seqs = ds[lo:hi]
        arr = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        docs = hi - lo
        if arr.size and (arr.min() < 0 or arr.max() >= vocab.size):
            raise ConfigError(f"dataset {path} holds token id {int(arr.max())}, outside the "
                              f"tokenizer's {vocab.size} ids: it was tokenized with another tokenizer")
    else:
        with open(path, "rb") as f:
            f.seek(lo)
            raw = f.read(hi - lo)
        text = raw.decode("utf-8", errors="replace")
        if kind == "text":
            arr = np.asarray(vocab.encode(text), dtype=np.int64)
            docs = 1 if lo == 0 else 0
        else:
            ids, docs = [], 0
            for n, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{path}: a line near byte {lo} is not a JSON object with "
                                      f"a {json_key!r} field ({e!r})") from None
                ids.extend(vocab.encode(doc))
                docs += 1
            arr = np.asarray(ids, dtype=np.int64)
    counts = np.bincount(arr, minlength=1)
    nz = np.flatnonzero(counts)
    return nz, counts[nz], docs, int(arr.size), units


def _worker_count(task) -> tuple:
    return _count(_VOCAB, _JSON_KEY, task)


def _pool_results(vocab: Vocabulary, json_key: str, tasks: list, workers: int):
    """Task results from a process pool, as they finish."""
    global _VOCAB
    _VOCAB = vocab  # forked workers inherit it; spawned ones load it from its path
    try:
        with _context().Pool(workers, initializer=_init_worker,
                             initargs=(str(vocab.path), json_key)) as pool:
            yield from pool.imap_unordered(_worker_count, tasks, chunksize=1)
    finally:
        _VOCAB = None


def _context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def count_frequencies(tokenizer, data: Sequence, *, workers: int = 1, json_key: str = "text",
                      block_bytes: int = BLOCK_BYTES, progress: bool = True) -> FreqCounts:
    """Count how often each token id occurs in `data` (files or dataset prefixes).

    workers=1 runs in this process; more start a process pool whose workers read and encode
    the tasks they are handed."""
    vocab = tokenizer if isinstance(tokenizer, Vocabulary) else load_vocabulary(tokenizer)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not data:
        raise ConfigError("no --data given")
    tasks, inputs, total = make_tasks(data, block_bytes)
    # Largest tasks first, so that no worker is left with a big one at the end.
    tasks.sort(key=lambda t: -t[4])
    vocab.encode("warm up")  # builds the encoder now: forked workers inherit it ready to use
    counts = np.zeros(vocab.size, dtype=np.int64)
    docs = tokens = 0
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    unit = "tok" if all(t[0] == "indexed" for t in tasks) else "B"
    with tqdm(total=total, unit=unit, unit_scale=True, desc="counting",
              disable=not progress) as bar:
        def collect(result):
            nonlocal docs, tokens
            ids, c, d, n, units = result
            if ids.size and ids[-1] >= vocab.size:
                raise ConfigError(f"token id {int(ids[-1])} outside the tokenizer's {vocab.size} ids")
            counts[ids] += c
            docs += d
            tokens += n
            bar.update(units)

        if workers == 1 or len(tasks) == 1:
            for task in tasks:
                collect(_count(vocab, json_key, task))
        else:
            for result in _pool_results(vocab, json_key, tasks, workers):
                collect(result)
    seconds = time.perf_counter() - t0
    nbytes = sum(i.get("bytes", 0) for i in inputs)
    return FreqCounts(counts, vocab.describe(), inputs, docs, tokens, nbytes, seconds, workers)


def vocab_freq(tokenizer, data: Sequence, save, *, workers: int = 1, json_key: str = "text",
               force: bool = False, progress: bool = True) -> FreqCounts:
    """The `vocab-freq` command: count and write `save` (refusing an existing file without force)."""
    save = Path(save)
    if save.exists() and not force:
        from megatron_prune.checkpoint.fsutil import OutputExistsError
        raise OutputExistsError(f"output {save} exists; pass --force to overwrite it")
    freq = count_frequencies(tokenizer, data, workers=workers, json_key=json_key, progress=progress)
    save.parent.mkdir(parents=True, exist_ok=True)
    freq.save(save)
    return freq
