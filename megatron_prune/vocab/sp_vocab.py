"""SentencePiece models (BPE and Unigram): prune by editing the ModelProto.

Piece types decide what stays: CONTROL and UNKNOWN (`<s>`, `</s>`, `<unk>`), USER_DEFINED and
BYTE (`<0x00>`..`<0xFF>`, the byte fallback) are always kept, so any text still encodes; without
byte fallback every single-character piece is kept too. For BPE models a kept piece brings the
pieces SentencePiece's merge loop builds it from (`bpe.merge_tree` with SentencePiece's rule:
highest score first, leftmost on ties, over NORMAL/USER_DEFINED/UNUSED pieces). Unigram models
segment by Viterbi over whatever pieces exist, so any subset works as is.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from megatron_prune.checkpoint import sp_tokenizer_json
from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.vocab.base import Vocabulary
from megatron_prune.vocab.bpe import merge_tree

log = logging.getLogger(__name__)

SPACE = "\u2581"


class SentencePieceVocabulary(Vocabulary):
    kind = "sentencepiece"

    def __init__(self, path: Path, proto, sidecar_dir: Optional[Path] = None):
        super().__init__(path, sidecar_dir)
        from sentencepiece import sentencepiece_model_pb2 as pb
        self._pb = pb
        self.proto = proto
        T = pb.ModelProto.SentencePiece
        self._T = T
        ts = proto.trainer_spec
        if ts.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
            name = pb.TrainerSpec.ModelType.Name(ts.model_type)
            raise ConfigError(f"tokenizer {path}: SentencePiece model type {name} is not supported "
                              "(BPE and UNIGRAM are)")
        self.is_bpe = ts.model_type == pb.TrainerSpec.BPE
        self.byte_fallback = bool(ts.byte_fallback)
        self.pieces = [p.piece for p in proto.pieces]
        self.types = [p.type for p in proto.pieces]
        self.scores = [p.score for p in proto.pieces]
        # What SentencePiece's merge loop looks pieces up in (model_interface.cc).
        self._mergeable = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types))
                           if t in (T.NORMAL, T.USER_DEFINED, T.UNUSED)}
        self._user_defined = sorted((p for p, t in zip(self.pieces, self.types)
                                     if t == T.USER_DEFINED), key=len, reverse=True)
        self._special = frozenset(i for i, t in enumerate(self.types) if t in (T.CONTROL, T.UNKNOWN))
        self._sp = None

    @property
    def processor(self):
        if self._sp is None:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor(model_proto=self.proto.SerializeToString())
        return self._sp

    @property
    def size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list:
        return self.processor.encode(text)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    @property
    def special_ids(self) -> frozenset:
        return self._special

    def token_bytes(self, i: int) -> bytes:
        if self.types[i] == self._T.BYTE:
            return self.pieces[i].encode()  # "<0x0A>", as HF byte-fallback vocabularies spell it
        return self.pieces[i].replace(SPACE, " ").encode()

    def required_ids(self) -> set:
        T = self._T
        keep = {i for i, t in enumerate(self.types)
                if t in (T.CONTROL, T.UNKNOWN, T.USER_DEFINED, T.BYTE)}
        if not self.byte_fallback:  # characters have no other way to encode
            keep |= {i for i, (p, t) in enumerate(zip(self.pieces, self.types))
                     if t == T.NORMAL and len(p) == 1}
        return keep

    def _symbols(self, text: str) -> list:
        """SentencePiece's initial split: user-defined pieces whole, then single characters."""
        out, i = [], 0
        while i < len(text):
            for ud in self._user_defined:
                if text.startswith(ud, i):
                    out.append(("ud", ud))
                    i += len(ud)
                    break
            else:
                out.append(text[i])
                i += 1
        return out

    def _priority(self, a, b):
        if isinstance(a, tuple) or isinstance(b, tuple):  # user-defined pieces never merge
            return None
        i = self._mergeable.get(a + b)
        return None if i is None else (-self.scores[i],)

    def needs(self, i: int) -> Optional[frozenset]:
        T = self._T
        t = self.types[i]
        if t in (T.CONTROL, T.UNKNOWN, T.BYTE, T.USER_DEFINED):
            return frozenset()
        if t == T.UNUSED:
            return None  # SentencePiece splits unused pieces back into their parts
        if not self.is_bpe:
            return frozenset()
        piece = self.pieces[i]
        symbols = self._symbols(piece)
        tree = merge_tree(piece, symbols, self._priority)
        if tree is None:
            return None
        leaves = [s for s in symbols if isinstance(s, str) and s in self._mergeable]
        return frozenset(self._mergeable[p] for p in tree + leaves if p != piece)

    def write_pruned(self, out: Path, kept: Sequence[int]) -> list:
        pb = self._pb
        m = pb.ModelProto()
        m.CopyFrom(self.proto)
        del m.pieces[:]
        for i in kept:
            m.pieces.append(self.proto.pieces[i])
        old_to_new = {old: new for new, old in enumerate(kept)}
        ts = m.trainer_spec
        ts.vocab_size = len(kept)
        for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
            old = getattr(ts, field)
            if old >= 0:
                setattr(ts, field, old_to_new.get(old, -1))
        (out / "tokenizer.model").write_bytes(m.SerializeToString())
        written = ["tokenizer.model"] + self.write_sidecars(out, old_to_new)
        # an HF directory: the pruned model's tokenizer.json, so transformers gives
        # SentencePiece's ids (a stale one would map the old ids)
        if self.sidecar_dir is not None and sp_tokenizer_json.write(out):
            written.append("tokenizer.json")
        return written
