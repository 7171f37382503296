"""Text and jsonl files -> Megatron indexed datasets (`.bin` + `.idx`), as Megatron-LM's
`tools/preprocess_data.py` makes them.

Inputs: `.jsonl` / `.json` files hold one JSON object per line, the text under each of
`json_keys` (a string, or a list of strings taken as its sentences, as Megatron-LM does); any other
file is plain UTF-8 text and is one document. Each key gets its own dataset,
`{output_prefix}_{key}_document.{bin,idx}` (`_sentence` with `split_sentences`), written by
megatron-core's `IndexedDatasetBuilder` with the dtype Megatron picks from the vocabulary size
(uint16 below 65500 tokens, else int32). A document is one sequence; with `split_sentences` each
sentence is a sequence and the documents are recorded in the index's document boundaries.
`append_eod` appends the tokenizer's end-of-document id to every document (to its last sentence).
Documents that give no tokens are skipped (Megatron-LM writes them as empty documents).

Sentence splitting uses nltk's `PunktSentenceTokenizer` with its default, *untrained* parameters:
it needs no downloaded `punkt` data, so it runs offline, but it knows no abbreviations ("Mr.
Smith" becomes two sentences) and does not split after an ellipsis. `keep_newlines` keeps the
whitespace that follows a sentence inside it, as Megatron-LM's `--keep-newlines`.

Parallelism: documents are tokenized by `workers` processes (a multiprocessing pool fed in chunks
of `chunk_size` documents, results taken in input order, so the output does not depend on the
number of workers); with `partitions` > 1, the input files are cut into that many contiguous groups
written in parallel (each with workers / partitions processes) and merged in order at the end, so
the output is again the same bytes. At most a few chunks per worker are in flight, so memory does
not grow with the input.

Outputs are written under a temporary directory beside them and renamed at the end (each `.bin`
before its `.idx`), so an interrupted run leaves no dataset that looks complete; existing outputs
are refused unless `force`.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.fsutil import OutputExistsError
from megatron_prune.data.records import (_check_first_record, _fields, _records, is_jsonl,
                                         resolve_inputs)
from megatron_prune.data.tokenizers import TokenizerSpec

log = logging.getLogger(__name__)

@dataclass
class PreprocessConfig:
    inputs: Sequence[str]  # files or glob patterns
    output_prefix: str
    tokenizer: TokenizerSpec
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    workers: int = 1
    partitions: int = 1
    chunk_size: int = 32  # documents per task sent to a worker
    log_interval: int = 1000  # documents between log lines when there is no progress bar
    progress: Optional[bool] = None  # None: a bar when stderr is a terminal, else log lines
    force: bool = False

    @property
    def level(self) -> str:
        return "sentence" if self.split_sentences else "document"


@dataclass
class KeyStats:
    documents: int = 0  # documents written
    empty: int = 0  # documents skipped because they gave no tokens
    sequences: int = 0  # sentences with split_sentences, else == documents
    tokens: int = 0

    def add(self, other: "KeyStats") -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class PreprocessResult:
    outputs: Dict[str, str]  # json key -> dataset path prefix (append .bin / .idx)
    stats: Dict[str, KeyStats]
    dtype: str
    vocab_size: int
    input_files: List[str]
    bytes_read: int = 0
    seconds: float = 0.0
    records: int = field(default=0)  # jsonl lines / text files read


# ---------------------------------------------------------------------------------- inputs
def sentence_splitter(keep_newlines: bool = False):
    """nltk's Punkt with default (untrained) parameters: needs no downloaded data."""
    try:
        from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer
    except ImportError as e:
        raise ConfigError("--split-sentences needs nltk: pip install nltk") from e
    if not keep_newlines:
        return PunktSentenceTokenizer()

    class KeepNewlines(PunktLanguageVars):
        # Megatron-LM's CustomLanguageVars: `\s*` instead of `\s+` after a sentence end, so
        # the whitespace (newlines) after a sentence stays with it.
        _period_context_fmt = r"""
            \S*                          # some word material
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # keep the whitespace that follows
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or some other token
            ))"""

    return PunktSentenceTokenizer(lang_vars=KeepNewlines())


class _Encoder:
    """Tokenizes records; lives in each worker process (or in this one with workers=1)."""

    def __init__(self, spec: TokenizerSpec, keys: Sequence[str], append_eod: bool,
                 split_sentences: bool, keep_newlines: bool, tokenizer=None):
        self.tokenizer = tokenizer if tokenizer is not None else spec.build()
        self.keys = tuple(keys)
        self.eod = self.tokenizer.eod if append_eod else None
        self.splitter = sentence_splitter(keep_newlines) if split_sentences else None

    def __call__(self, record: Tuple[str, int, bytes]):
        """-> (per key (ids, sequence lengths) or None for a blank line, bytes read)."""
        path, n, raw = record
        fields = _fields(path, n, raw, self.keys)
        if fields is None:
            return None, len(raw)
        return [self.encode(value) for value in fields], len(raw)

    def encode(self, value) -> Tuple[np.ndarray, List[int]]:
        if isinstance(value, list):
            sentences = value
        elif self.splitter is not None:
            sentences = self.splitter.tokenize(value)
        else:
            sentences = [value]
        ids: List[int] = []
        lengths: List[int] = []
        for sentence in sentences:
            sentence_ids = self.tokenizer.encode(sentence)
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if ids and self.eod is not None:
            ids.append(self.eod)
            lengths[-1] += 1
        return np.asarray(ids, dtype=np.int64), lengths


_ENCODER: Optional[_Encoder] = None


def _init_worker(*args) -> None:
    global _ENCODER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ENCODER = _Encoder(*args)


def _encode_in_worker(record):
    return _ENCODER(record)


def _mp_context():
    # fork: workers start at once and inherit the loaded modules; spawn where fork is unsafe.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class _Feeder:
    """Feed a pool at most `ahead` items before the consumer takes their results (Pool.imap
    alone would read the whole input into its task queue). `stop()` ends the feed, so the pool's
    task thread is never left blocked when the consumer gives up."""

    def __init__(self, items: Iterable, ahead: int):
        self._items, self._slots, self._stopped = items, threading.Semaphore(ahead), False

    def __iter__(self) -> Iterator:
        for item in self._items:
            self._slots.acquire()
            if self._stopped:
                return
            yield item

    def done_one(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stopped = True
        self._slots.release()


# ---------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _quiet_megatron():
    """megatron-core's import-time warnings and INFO lines (no Transformer Engine / Apex,
    Megatron-FSDP, each index it reads) off while in this block."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _indexed_dataset():
    with _quiet_megatron():
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def output_prefixes(output_prefix, keys: Sequence[str], level: str) -> Dict[str, str]:
    return {key: f"{output_prefix}_{key}_{level}" for key in keys}


class _Progress:
    """tqdm over input bytes when wanted, else a log line every `log_interval` records."""

    def __init__(self, total_bytes: int, enabled: Optional[bool], log_interval: int,
                 desc: str, position: int = 0):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc,
                            position=position, leave=position == 0, dynamic_ncols=True)
        self.log_interval, self.desc = max(1, log_interval), desc
        self.records, self.bytes, self.start = 0, 0, time.time()

    def update(self, nbytes: int, documents: int) -> None:
        self.records += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.records % self.log_interval == 0:
            dt = max(time.time() - self.start, 1e-9)
            log.info("%s: %d records (%d documents), %.1f records/s, %.2f MB/s", self.desc,
                     self.records, documents, self.records / dt, self.bytes / dt / 2**20)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_datasets(files: Sequence[Path], prefixes: Dict[str, str], cfg: PreprocessConfig,
                    dtype, workers: int, desc: str = "preprocess", position: int = 0,
                    tokenizer=None):
    """Tokenize `files` into one finished dataset per key at `prefixes` (with `tokenizer`, when
    given, in this process if workers == 1). Returns (stats per key, records, bytes)."""
    idx = _indexed_dataset()
    builders = {k: idx.IndexedDatasetBuilder(idx.get_bin_path(p), dtype=dtype)
                for k, p in prefixes.items()}
    stats = {k: KeyStats() for k in prefixes}
    keys = list(prefixes)
    encoder_args = (cfg.tokenizer, keys, cfg.append_eod, cfg.split_sentences, cfg.keep_newlines)
    progress = _Progress(sum(f.stat().st_size for f in files), cfg.progress, cfg.log_interval,
                         desc, position)
    pool = feeder = None
    try:
        if workers > 1:
            feeder = _Feeder(_records(files), workers * cfg.chunk_size * 4)
            pool = _mp_context().Pool(workers, initializer=_init_worker, initargs=encoder_args)
            results = pool.imap(_encode_in_worker, feeder, cfg.chunk_size)
        else:
            results = map(_Encoder(*encoder_args, tokenizer=tokenizer), _records(files))
        for encoded, nbytes in results:
            if feeder is not None:
                feeder.done_one()
            if encoded is not None:
                for key, (ids, lengths) in zip(keys, encoded):
                    s = stats[key]
                    if not lengths:
                        s.empty += 1
                        continue
                    builders[key].add_document(ids, lengths)
                    s.documents += 1
                    s.sequences += len(lengths)
                    s.tokens += len(ids)
            progress.update(nbytes, stats[keys[0]].documents)
        for key, builder in builders.items():
            builder.finalize(idx.get_idx_path(prefixes[key]))
    finally:
        progress.close()
        if pool is not None:
            feeder.stop()
            pool.terminate()
            pool.join()
        for builder in builders.values():
            builder.data_file.close()
    return stats, progress.records, progress.bytes


def _write_partition(args):
    files, prefixes, cfg, dtype, workers, part, parts = args
    return _write_datasets(files, prefixes, cfg, dtype, workers,
                           desc=f"part {part + 1}/{parts}", position=part)


def _partition_files(files: Sequence[Path], parts: int) -> List[List[Path]]:
    """Contiguous groups of files with about equal bytes (order kept, none empty)."""
    sizes = [max(f.stat().st_size, 1) for f in files]
    total, n = sum(sizes), len(files)
    groups: List[List[Path]] = [[] for _ in range(parts)]
    acc = g = 0
    for i, (f, size) in enumerate(zip(files, sizes)):
        by_bytes = min((2 * acc + size) * parts // (2 * total), g + 1)  # never skip a group
        g = max(g, by_bytes, parts - (n - i))  # leave a file for every group still to fill
        groups[g].append(f)
        acc += size
    return groups


# ---------------------------------------------------------------------------------- main
def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Tokenize the inputs into Megatron indexed datasets; see the module docstring."""
    started = time.time()
    if cfg.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.partitions < 1:
        raise ConfigError(f"--partitions must be at least 1, got {cfg.partitions}")
    keys = list(cfg.json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"--json-keys must name distinct keys, got {keys}")
    files = resolve_inputs(cfg.inputs)
    if any(not is_jsonl(f) for f in files) and keys != ["text"]:
        raise ConfigError("--json-keys applies to .jsonl inputs; plain text inputs (" +
                          ", ".join(str(f) for f in files if not is_jsonl(f))[:200] +
                          ") are one document each under the key 'text'")
    for f in files:
        if is_jsonl(f):
            _check_first_record(f, keys)
    finals = output_prefixes(cfg.output_prefix, keys, cfg.level)
    existing = [p for prefix in finals.values() for p in (f"{prefix}.bin", f"{prefix}.idx")
                if Path(p).exists()]
    if existing and not cfg.force:
        raise OutputExistsError(f"output {existing[0]} exists; pass --force to overwrite it")

    tokenizer = cfg.tokenizer.build()
    if cfg.append_eod and tokenizer.eod is None:
        raise ConfigError(f"--append-eod: the tokenizer {cfg.tokenizer.tokenizer_model} has no "
                          "end-of-document token")
    if cfg.split_sentences:
        sentence_splitter(cfg.keep_newlines)  # fails now if nltk is missing
    idx = _indexed_dataset()
    dtype = idx.DType.optimal_dtype(tokenizer.vocab_size)

    out_dir = Path(cfg.output_prefix).absolute().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{Path(cfg.output_prefix).name}.preprocess-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        staged = {k: str(tmp / Path(p).name) for k, p in finals.items()}
        parts = min(cfg.partitions, len(files))
        if parts < cfg.partitions:
            log.info("--partitions %d: only %d input file(s); using %d", cfg.partitions,
                     len(files), parts)
        if parts == 1:
            stats, records, nbytes = _write_datasets(files, staged, cfg, dtype, cfg.workers,
                                                     tokenizer=tokenizer)
        else:
            stats, records, nbytes = _write_partitioned(files, staged, cfg, dtype, parts, tmp)
        empty = [key for key, s in stats.items() if s.documents == 0]
        if empty:
            raise ConfigError(f"no document of the input gave any token under {empty} "
                              f"({records} records read); nothing written")
        for key, prefix in finals.items():
            os.replace(idx.get_bin_path(staged[key]), idx.get_bin_path(prefix))
            os.replace(idx.get_idx_path(staged[key]), idx.get_idx_path(prefix))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreprocessResult(outputs=finals, stats=stats, dtype=np.dtype(dtype).name,
                            vocab_size=tokenizer.vocab_size, input_files=[str(f) for f in files],
                            bytes_read=nbytes, seconds=time.time() - started, records=records)


def _write_partitioned(files, staged: Dict[str, str], cfg: PreprocessConfig, dtype, parts: int,
                       tmp: Path):
    idx = _indexed_dataset()
    groups = _partition_files(files, parts)
    workers = max(1, cfg.workers // parts)
    jobs = [(group, {k: str(tmp / f"part{i:04d}_{k}") for k in staged}, cfg, dtype, workers,
             i, parts) for i, group in enumerate(groups)]
    with ProcessPoolExecutor(max_workers=parts, mp_context=_mp_context()) as ex:
        results = list(ex.map(_write_partition, jobs))
    stats = {k: KeyStats() for k in staged}
    for part_stats, _, _ in results:
        for k, s in part_stats.items():
            stats[k].add(s)
    for key, prefix in staged.items():
        builder = idx.IndexedDatasetBuilder(idx.get_bin_path(prefix), dtype=dtype)
        for _, part_prefixes, *_ in jobs:
            with _quiet_megatron():
                builder.add_index(part_prefixes[key])
        builder.finalize(idx.get_idx_path(prefix))
    return stats, sum(r[1] for r in results), sum(r[2] for r in results)
