"""Stage 1, data: the books tokenized for training and held out, and the calibration text."""
from __future__ import annotations


import json
import random
from pathlib import Path


from prune_recover_stages.protocol import Protocol
from prune_recover_stages.runner import CLI, Runner
from prune_recover_stages.teacher import _spm


# ---------------------------------------------------------------------------- 1. data
def prepare_data(r: Runner, p: Protocol, data_dir: Path, workers: int) -> dict:
    from megatron_prune.data.corpus import iter_gutenberg_archive, split_holdout
    from megatron_prune.checkpoint.hf_tokenizer import write_hf_sentencepiece_dir
    d = r.work / "data"
    d.mkdir(exist_ok=True)
    spm = _spm(data_dir)
    books = list(iter_gutenberg_archive(data_dir / "corpus" / "gutenberg_en.tar.xz"))
    train, valid = split_holdout(books, p.valid_books)
    if p.train_books:
        train = train[:p.train_books]
    for split, items in (("train", train), ("valid", valid)):
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for name, text in items:
                f.write(json.dumps({"text": text, "file": name}, ensure_ascii=False) + "\n")
    _write_calibration(d / "calibration.jsonl", train, p)
    jobs = {f"preprocess_{split}": preprocess_job(d / f"{split}.jsonl", d / split, spm, workers)
            for split in ("train", "valid")
            if not (r.reuse and (d / f"{split}_text_document.idx").is_file())}
    r.run_many(jobs, parallel=2)
    tok = write_hf_sentencepiece_dir(spm, d / "tokenizer", p.seq_length)
    return {"train": d / "train_text_document", "valid": d / "valid_text_document",
            "spm": spm, "tokenizer": tok, "calibration": d / "calibration.jsonl",
            "valid_books": [n for n, _ in valid], "train_books": len(train),
            "valid_rows": [t for _, t in valid],
            "wikitext": (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()}


def preprocess_job(jsonl: Path, prefix: Path, spm: Path, workers: int) -> list:
    """`megatron-prune preprocess` of a jsonl into PREFIX_text_document, with the Llama-2
    SentencePiece model and an end-of-document token after each row."""
    return CLI + ["preprocess", "--input", jsonl, "--output-prefix", prefix,
                  "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", spm, "--append-eod",
                  "--workers", workers, "--chunk-size", 1, "--force"]


def _write_calibration(path: Path, train: list, p: Protocol) -> None:
    """Chunks of training books chosen with a fixed seed (about 5 characters per token), so
    the calibration set spans many books rather than the first one."""
    rng = random.Random(0)
    chars = 5 * p.seq_length
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(p.calib_samples + 8):
            _, text = train[rng.randrange(len(train))]
            start = rng.randrange(max(1, len(text) - chars))
            f.write(json.dumps({"text": text[start:start + chars]}) + "\n")
