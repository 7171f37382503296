"""A `tokenizer.json` that makes transformers tokenize exactly as a SentencePiece BPE model does.

Megatron-LM's Llama2Tokenizer and GPTSentencePieceTokenizer (and so `preprocess` and the trainer)
encode with SentencePiece itself. Given only a `tokenizer.model`, transformers 5 builds its fast
Llama tokenizer with the BPE merges in piece-id order. SentencePiece merges by piece score instead.
The Llama-2 model's whitespace-run pieces ('▁▁', '▁▁▁▁', ...) come early in id order but carry
score -1e9, so SentencePiece merges them last. transformers therefore turns `"park.  She"` into
'▁▁', 'She' where SentencePiece gives '▁', '▁She': about 1% of a Gutenberg book's tokens.

The file written here lists the merges by the merged piece's score (ties by id), and normalizes
as SentencePiece does: a '▁' always prepended (add_dummy_prefix), spaces replaced by '▁'. On
the 101 Gutenberg books and WikiText-2 (18.4 M Llama-2 tokens) it gives SentencePiece's ids
exactly. transformers 5's LlamaTokenizer keeps these merges but uses its own Metaspace
pre-tokenizer, which only prepends '▁' where the text does not start with a space: text that
starts with a space begins '▁x' rather than '▁', '▁x'. That is one token at most per text.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# sentencepiece_model.proto ModelProto.SentencePiece.Type and TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BPE = 2


def _proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    return m


def unsupported(m) -> str:
    """Why this SentencePiece model cannot be written as a tokenizer.json ('' when it can)."""
    ns = m.normalizer_spec
    if m.trainer_spec.model_type != _BPE:
        return "not a BPE model"
    if ns.remove_extra_whitespaces:
        return "remove_extra_whitespaces is on"
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        return f"normalizer {ns.name!r} (only 'identity' is reproduced)"
    if any(p.type == _USER_DEFINED for p in m.pieces):
        return "user-defined pieces"
    return ""


def build(model_file: Path):
    """The `tokenizers.Tokenizer` of a SentencePiece BPE model (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    m = _proto(model_file)
    why = unsupported(m)
    if why:
        raise ValueError(f"{model_file}: {why}")
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, i, vocab[left], left, right))
    merges.sort()
    unk = next((p for p, _, t in pieces if t == _UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                               unk_token=unk, fuse_unk=True,
                               byte_fallback=m.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(" ", "▁")]
    if m.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if m.normalizer_spec.add_dummy_prefix else []))
    bos = m.trainer_spec.bos_id
    if 0 <= bos < len(pieces):  # BOS first, as Llama's tokenizer_config asks (add_bos_token)
        name = pieces[bos][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, bos)])
    return tok


def write(directory: Path) -> bool:
    """Write directory/tokenizer.json for the directory's tokenizer.model; False (and nothing
    written) where the model is of a kind this cannot reproduce."""
    model_file = Path(directory) / "tokenizer.model"
    why = unsupported(_proto(model_file))
    if why:
        log.info("no tokenizer.json for %s: %s; transformers builds one from it", model_file, why)
        return False
    build(model_file).save(str(Path(directory) / "tokenizer.json"))
    return True
