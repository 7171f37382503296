"""llama2.c checkpoints and tokenizers -> a Hugging Face Llama directory.

Checkpoints (Karpathy's llama2.c, `export.py`), all little-endian float32, linear weights [out, in]:

* legacy (version 0): 7 int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  seq_len`, then tok_emb[V,D], rms_att[L,D], wq[L,D,D], wk[L,KV*hd,D], wv[L,KV*hd,D], wo[L,D,D],
  rms_ffn[L,D], w1[L,F,D], w2[L,D,F], w3[L,F,D], rms_final[D], freq_cis_real[S,hd/2],
  freq_cis_imag[S,hd/2], then wcls[V,D] only when the classifier is untied, which the header says
  with a *negative* vocab_size.
* version 1: uint32 magic 0x616b3432 ("ak42"), int32 version=1, the same 7 int32, uint8
  shared_classifier, zero padding to 256 bytes; then rms_att, rms_ffn, rms_final, tok_emb, wq, wk,
  wv, wo, w1, w2, w3 (norms first, no freq_cis), then wcls when not shared. (Version 2 is the
  int8 group-quantized export; it is refused with a clear error.)

The file size must equal what the header implies, byte for byte: a truncated download (or a file
with trailing garbage) is refused before anything is written. Tensors are read through a memory
map, one HF parameter at a time.

llama2.c applies RoPE to *interleaved* pairs (x0,x1),(x2,x3)... of each head (Meta's layout); HF
Llama rotates halves (x_i with x_{i+hd/2}). The usual row permutation of wq (per query head) and
wk (per KV head) — the one in transformers' `convert_llama_weights_to_hf.py` and llama2.c's
`export.py --hf` — makes the two compute the same attention scores. RoPE theta is 10000 (the
legacy file's stored freq_cis table is checked against it), RMSNorm eps 1e-5, bos 1, eos 2.

Tokenizer (`tokenizer.bin` / `tok512.bin`, written by llama2.c's `tokenizer.py`): int32
max_token_length, then per piece: float32 score, int32 byte length, the bytes. It is a
SentencePiece BPE vocabulary written out with two edits that we undo: '▁' (U+2581) was replaced
by ' ', and <s>/</s> were written as "\\n<s>\\n"/"\\n</s>\\n". Pieces "<0xHH>" are SentencePiece's
byte-fallback pieces. We rebuild a SentencePiece `ModelProto` (BPE, byte_fallback, unk 0, bos 1,
eos 2, no pad) and save it as `tokenizer.model`, plus `tokenizer_config.json` and
`special_tokens_map.json` for `AutoTokenizer`. SentencePiece BPE encodes from the pieces and their
scores alone (merges are applied in score order), so the pieces, scores and types that the
.bin stores are everything the encoder uses — except the normalizer, which the .bin does not
store. What cannot be made exact, and why:

* Normalizer: we write Llama's (`identity` rules, add_dummy_prefix true,
  remove_extra_whitespaces false). That is exactly what llama2.c's C encoder (run.c) does with a
  .bin — prepend one space, no other normalization — and it is the Llama-2 tokenizer.model's own
  spec (converting the Llama-2 tokenizer.bin gives back its tokenizer.model's pieces, scores, types
  and encodings). But llama2.c's `train_vocab` trained the small custom vocabs (tok512 etc.) with
  sentencepiece's default remove_extra_whitespaces=true, and pretokenized TinyStories with it. So
  on text with leading/trailing or repeated spaces our tokenizer (like run.c) keeps them, where
  the training-time Python tokenizer collapsed them. Ordinary text tokenizes identically.
* Trainer fields that only matter for training (input, character_coverage, ...) are not stored in
  the .bin; we fill in llama2.c's `train_vocab` settings where known. `unk_surface` is
  SentencePiece's default " ⁇ ", as in llama2.c.
* Hugging Face's `LlamaTokenizer` (transformers 5) is a `tokenizers` BPE that transformers
  rebuilds from tokenizer.model (merges derived from the vocab). It encodes like SentencePiece
  except on text that *starts* with a space: its Metaspace pre-tokenizer adds the dummy '▁' only
  when the text does not already begin with one, so " lead" becomes [▁lead] where SentencePiece
  gives [▁, ▁lead]. The real Llama-2 tokenizer.model does the same under transformers, so this
  is transformers' behaviour, not a conversion error. Decoding agrees.
"""
from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import DTYPES, ConfigError, ModelConfig
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.checkpoint.hf import write_hf_checkpoint
from megatron_prune.checkpoint.hf_tokenizer import write_llama_tokenizer_config
from megatron_prune.checkpoint.tensor_io import CheckpointReadError

log = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42" little-endian
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4
ROPE_THETA = 10000.0
NORM_EPS = 1e-5
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPACE = "\u2581"  # SentencePiece's '▁'
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


# ---------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class Llama2cHeader:
    version: int  # 0 legacy, 1 "ak42" version 1
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def data_offset(self) -> int:
        return V1_HEADER_BYTES if self.version == 1 else LEGACY_HEADER_BYTES

    def shapes(self) -> list:
        """[(llama2.c name, shape)] in file order."""
        d, f, n, v, s = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.seq_len
        kv = self.n_kv_heads * self.head_dim
        common = [("wq", (n, d, d)), ("wk", (n, kv, d)), ("wv", (n, kv, d)), ("wo", (n, d, d))]
        if self.version == 1:
            out = [("rms_att", (n, d)), ("rms_ffn", (n, d)), ("rms_final", (d,)),
                   ("tok_emb", (v, d)), *common,
                   ("w1", (n, f, d)), ("w2", (n, d, f)), ("w3", (n, f, d))]
        else:
            half = self.head_dim // 2
            out = [("tok_emb", (v, d)), ("rms_att", (n, d)), *common, ("rms_ffn", (n, d)),
                   ("w1", (n, f, d)), ("w2", (n, d, f)), ("w3", (n, f, d)), ("rms_final", (d,)),
                   ("freq_cis_real", (s, half)), ("freq_cis_imag", (s, half))]
        if not self.shared_classifier:
            out.append(("wcls", (v, d)))
        return out

    def expected_size(self) -> int:
        return self.data_offset + 4 * sum(math.prod(s) for _, s in self.shapes())

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            num_layers=self.n_layers, hidden_size=self.dim, ffn_hidden_size=self.hidden_dim,
            num_attention_heads=self.n_heads, num_query_groups=self.n_kv_heads,
            head_dim=self.head_dim, vocab_size=self.vocab_size,
            max_position_embeddings=self.seq_len, norm_epsilon=NORM_EPS, rotary_base=ROPE_THETA,
            tie_embeddings=self.shared_classifier,
            hf_extra={"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})


def read_header(path) -> Llama2cHeader:
    """Parse and validate the header; the file size must match it exactly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"llama2.c checkpoint {path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < LEGACY_HEADER_BYTES:
        raise CheckpointReadError(
            f"llama2.c checkpoint {path}: truncated ({size} bytes, shorter than any header)")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise CheckpointReadError(
                f"llama2.c checkpoint {path}: truncated ({size} bytes, the version-1 header alone "
                f"is {V1_HEADER_BYTES})")
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            what = " (int8 quantized export)" if version == 2 else ""
            raise ConfigError(f"llama2.c checkpoint {path}: unsupported export version "
                              f"{version}{what}; only the legacy format and version 1 (fp32) are "
                              "supported")
        dim, hidden, layers, heads, kv, vocab, seq = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        if vocab <= 0:
            raise ConfigError(
                f"llama2.c checkpoint {path}: vocab_size={vocab} in a version-1 header")
        version = 1
    else:
        dim, hidden, layers, heads, kv, vocab, seq = struct.unpack_from("<7i", head, 0)
        shared = vocab > 0  # llama2.c: a negative vocab_size flags an untied classifier
        vocab = abs(vocab)
        version = 0
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                  vocab_size=vocab, seq_len=seq)
    bad = [f"{k}={v}" for k, v in fields.items() if not 0 < v < 2**24]
    if bad:
        raise CheckpointReadError(
            f"llama2.c checkpoint {path}: not a llama2.c checkpoint (header field(s) "
            f"{', '.join(bad)} out of range)")
    if dim % heads or heads % kv or (dim // heads) % 2:
        raise ConfigError(
            f"llama2.c checkpoint {path}: dim={dim}, n_heads={heads}, n_kv_heads={kv}: dim must be "
            "a multiple of n_heads with an even head size, and n_heads a multiple of n_kv_heads")
    hdr = Llama2cHeader(version=version, shared_classifier=shared, **fields)
    want = hdr.expected_size()
    if size != want:
        how = "truncated" if size < want else "has trailing bytes"
        raise CheckpointReadError(
            f"llama2.c checkpoint {path}: {how}: {size} bytes, but its "
            f"{'version-1' if version == 1 else 'legacy'} header ({_describe(hdr)}) needs exactly "
            f"{want}")
    return hdr


def _describe(h: Llama2cHeader) -> str:
    return (f"dim={h.dim} hidden_dim={h.hidden_dim} n_layers={h.n_layers} n_heads={h.n_heads} "
            f"n_kv_heads={h.n_kv_heads} vocab_size={h.vocab_size} seq_len={h.seq_len} "
            f"{'shared' if h.shared_classifier else 'separate'} classifier")


class Llama2cCheckpoint:
    """The arrays of a llama2.c checkpoint, by llama2.c name, memory-mapped (read-only)."""

    def __init__(self, path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self.config = self.header.model_config()
        self._mm = np.memmap(self.path, dtype="<f4", mode="r")
        self._where = {}
        off = self.header.data_offset // 4
        for name, shape in self.header.shapes():
            self._where[name] = (off, shape)
            off += math.prod(shape)

    def names(self) -> list:
        return list(self._where)

    def array(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """A copy of a llama2.c array (or of its index-th layer) as a float32 tensor."""
        off, shape = self._where[name]
        if index is not None:
            per = math.prod(shape[1:])
            off, shape = off + index * per, shape[1:]
        n = math.prod(shape)
        return torch.from_numpy(np.array(self._mm[off:off + n], dtype=np.float32).reshape(shape))

    # ------------------------------------------------------------------ HF view
    def hf_group(self, key: str, layer: Optional[int]) -> dict:
        """{hf_name: fp32 tensor} of one layout.ParamSpec group."""
        h = self.header
        spec = layout.SPECS_BY_KEY[key]
        names = spec.hf_names(layer)
        if key == "embedding":
            parts = [self.array("tok_emb")]
        elif key == "output":
            parts = [self.array("wcls")]
        elif key == "final_norm":
            parts = [self.array("rms_final")]
        elif key == "input_norm":
            parts = [self.array("rms_att", layer)]
        elif key == "mlp_norm":
            parts = [self.array("rms_ffn", layer)]
        elif key == "qkv":
            parts = [permute_rope(self.array("wq", layer), h.n_heads),
                     permute_rope(self.array("wk", layer), h.n_kv_heads),
                     self.array("wv", layer)]
        elif key == "proj":
            parts = [self.array("wo", layer)]
        elif key == "fc1":  # HF (gate_proj, up_proj) = llama2.c (w1, w3)
            parts = [self.array("w1", layer), self.array("w3", layer)]
        elif key == "fc2":
            parts = [self.array("w2", layer)]
        else:  # pragma: no cover - layout has no other groups
            raise ConfigError(f"unknown parameter group {key}")
        return dict(zip(names, parts))

    def hf_state_dict(self) -> dict:
        """Every HF tensor (fp32), for tests and small models."""
        out = {}
        for spec, layer in layout.iter_hf_entries(self.config):
            out.update(self.hf_group(spec.key, layer))
        return out

    def check_rope_table(self, theta: float = ROPE_THETA) -> None:
        """The legacy format stores RoPE's cos/sin table: it must be the one for `theta`."""
        if "freq_cis_real" not in self._where:
            return
        hd, s = self.header.head_dim, self.header.seq_len
        freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[: hd // 2] / hd))
        ang = torch.outer(torch.arange(s, dtype=torch.float64), freqs)
        real, imag = self.array("freq_cis_real").double(), self.array("freq_cis_imag").double()
        err = max((real - ang.cos()).abs().max().item(), (imag - ang.sin()).abs().max().item())
        if err > 1e-3:
            raise ConfigError(
                f"llama2.c checkpoint {self.path}: its stored RoPE table is not the one for "
                f"theta={theta:g} (max difference {err:.3g}); this importer assumes "
                f"theta={theta:g}")


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved RoPE pairs (llama2.c/Meta) to HF rotate-half.

    Within each head, output row 2i (pair i, first element) moves to row i and row 2i+1 to row
    i + head_dim/2 — transformers' `convert_llama_weights_to_hf.permute`.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------- tokenizer
@dataclass
class Llama2cTokenizer:
    pieces: list  # SentencePiece piece strings ('▁' for space, <s>/</s> restored)
    scores: list
    max_token_length: int


def read_tokenizer(path, vocab_size: Optional[int] = None) -> Llama2cTokenizer:
    """Parse a llama2.c tokenizer.bin. The file must end exactly after its last piece; when
    vocab_size is given, that is how many pieces it must hold (llama2.c reads exactly that many)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"llama2.c tokenizer {path}: no such file")
    data = path.read_bytes()
    if len(data) < 4:
        raise CheckpointReadError(f"llama2.c tokenizer {path}: truncated ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, off = [], [], 4
    while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if off + 8 > len(data):
            raise CheckpointReadError(
                f"llama2.c tokenizer {path}: truncated inside piece {len(pieces)} (offset {off})")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or off + n > len(data):
            raise CheckpointReadError(
                f"llama2.c tokenizer {path}: truncated or corrupt piece {len(pieces)} "
                f"(length {n} at offset {off - 4}, file is {len(data)} bytes)")
        raw = data[off:off + n]
        off += n
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointReadError(
                f"llama2.c tokenizer {path}: piece {len(pieces)} is not UTF-8 ({raw!r})") from e
        pieces.append(text)
        scores.append(score)
    if vocab_size is not None and len(pieces) < vocab_size:
        raise CheckpointReadError(
            f"llama2.c tokenizer {path}: holds {len(pieces)} pieces, the model's vocab_size is "
            f"{vocab_size} (truncated file, or the tokenizer of another model)")
    if off != len(data):
        raise CheckpointReadError(
            f"llama2.c tokenizer {path}: {len(data) - off} bytes after piece {len(pieces) - 1}; "
            f"it holds more pieces than the model's vocab_size={vocab_size} (the tokenizer of "
            "another model?)")
    if len(pieces) < 3:
        raise CheckpointReadError(f"llama2.c tokenizer {path}: only {len(pieces)} pieces")
    return Llama2cTokenizer(_sentencepiece_pieces(pieces, path), scores, max_len)


def _sentencepiece_pieces(pieces: list, path) -> list:
    """Undo llama2.c's export edits: "\\n<s>\\n" -> <s>, "\\n</s>\\n" -> </s>, ' ' -> '▁'."""
    out = list(pieces)
    expect = {UNK_ID: ("<unk>",), BOS_ID: ("\n<s>\n", "<s>"), EOS_ID: ("\n</s>\n", "</s>")}
    for i, ok in expect.items():
        if out[i] not in ok:
            raise ConfigError(
                f"llama2.c tokenizer {path}: piece {i} is {out[i]!r}, expected {ok[0]!r} "
                "(llama2.c tokenizers have unk=0, bos=1, eos=2)")
    out[BOS_ID], out[EOS_ID] = "<s>", "</s>"
    for i in range(3, len(out)):
        if SPACE in out[i]:
            raise ConfigError(f"llama2.c tokenizer {path}: piece {i} ({out[i]!r}) contains "
                              "U+2581, which llama2.c's export never leaves in a piece")
        out[i] = out[i].replace(" ", SPACE)
    if len(set(out)) != len(out):
        dup = sorted({p for p in out if out.count(p) > 1})[:3]
        raise ConfigError(f"llama2.c tokenizer {path}: duplicate pieces, e.g. {dup}")
    return out


def sentencepiece_model(tok: Llama2cTokenizer):
    """A SentencePiece BPE ModelProto equivalent to the llama2.c vocabulary (see module doc)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    Piece = pb.ModelProto.SentencePiece
    n_bytes = 0
    for i, (piece, score) in enumerate(zip(tok.pieces, tok.scores)):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        if i == UNK_ID:
            p.type = Piece.UNKNOWN
        elif i in (BOS_ID, EOS_ID):
            p.type = Piece.CONTROL
        elif _BYTE_PIECE.match(piece):
            p.type = Piece.BYTE
            n_bytes += 1
        else:
            p.type = Piece.NORMAL
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tok.pieces)
    ts.byte_fallback = n_bytes == 256
    ts.character_coverage = 1.0
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.max_sentencepiece_length = max(16, tok.max_token_length)
    ts.input_format = "text"
    ts.self_test_sample_size = 0
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = UNK_ID, BOS_ID, EOS_ID, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    ts.unk_surface = " \u2047 "
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.normalization_rule_tsv = ""
    if n_bytes not in (0, 256):
        raise ConfigError(f"tokenizer has {n_bytes} byte pieces <0xHH>; byte fallback needs 256")
    return m


def write_tokenizer(tok: Llama2cTokenizer, out: Path, max_length: int) -> None:
    """tokenizer.model + the two JSON files AutoTokenizer reads."""
    out = Path(out)
    (out / "tokenizer.model").write_bytes(sentencepiece_model(tok).SerializeToString())
    write_llama_tokenizer_config(out, {k: (i, tok.pieces[i]) for k, i in
                                       (("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID))},
                                 max_length)


# ---------------------------------------------------------------------------- command
def import_llama2c(checkpoint, tokenizer, save, *, dtype: str = "fp32",
                   force: bool = False) -> ModelConfig:
    """llama2.c checkpoint (+ tokenizer.bin) -> an HF Llama directory at `save`."""
    check_output(save, force)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose from {sorted(DTYPES)}")
    ckpt = Llama2cCheckpoint(checkpoint)
    ckpt.check_rope_table()
    cfg = ckpt.config
    tok = read_tokenizer(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    log.info("llama2.c %s checkpoint: %s", "version-1" if ckpt.header.version else "legacy",
             _describe(ckpt.header))
    with atomic_output_dir(save, force) as tmp:
        write_hf_checkpoint(tmp, cfg, layout.hf_plan(cfg), lambda g: ckpt.hf_group(*g), DTYPES[dtype])
        if tok is not None:
            write_tokenizer(tok, tmp, cfg.max_position_embeddings)
    return cfg
