"""The tokenizer files of a Hugging Face checkpoint directory made for a SentencePiece model.

transformers' AutoTokenizer reads `tokenizer.model` as a Llama tokenizer only with its config
files beside it; `sp_tokenizer_json` adds a tokenizer.json that gives SentencePiece's own ids.
Used by the llama2.c import and by the trainer when it saves a checkpoint's tokenizer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm

from megatron_prune.checkpoint import sp_tokenizer_json
from megatron_prune.checkpoint.config import ConfigError


def write_llama_tokenizer_config(out: Path, pieces: dict, max_length: int) -> None:
    """tokenizer_config.json + special_tokens_map.json that let transformers' AutoTokenizer read
    the SentencePiece `tokenizer.model` beside them as a Llama tokenizer (BOS added, no EOS),
    and a tokenizer.json that makes it give SentencePiece's own ids (`sp_tokenizer_json`).
    `pieces` = {"unk": (id, piece), "bos": (id, piece), "eos": (id, piece)}."""
    special = {f"{k}_token": pieces[k][1] for k in ("bos", "eos", "unk")}
    added = {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, text in sorted(pieces[k] for k in ("unk", "bos", "eos"))}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True,
        "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length, "pad_token": None, "padding_side": "left",
        "sp_model_kwargs": {}, "added_tokens_decoder": added, **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    sp_tokenizer_json.write(out)


def write_hf_sentencepiece_dir(model, out, max_length: int) -> Path:
    """A transformers tokenizer directory (tokenizer.model + config) for a SentencePiece model,
    so a checkpoint trained with `--tokenizer-type Llama2Tokenizer` carries a tokenizer that
    export, evaluation and importance read without flags."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{model} is not a SentencePiece model: {e}") from e
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model, out / "tokenizer.model")
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if min(ids.values()) < 0:
        raise ConfigError(f"{model}: a Llama tokenizer needs unk, bos and eos pieces ({ids})")
    write_llama_tokenizer_config(out, {k: (i, sp.id_to_piece(i)) for k, i in ids.items()},
                                 max_length)
    return out
