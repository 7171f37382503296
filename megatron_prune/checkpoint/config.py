"""The model's shape in one dataclass, and the field maps to Hugging Face and Megatron-LM.

`ModelConfig` is what every tool of the project passes around. It is built from an HF
`config.json` (`from_hf`) or from the `args` Namespace stored in a Megatron checkpoint
(`from_megatron_args`), and written back to either (`to_hf`, `to_megatron_args`). Pruning changes
the shape fields; everything else (token ids, RoPE scaling, ...) rides along unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A checkpoint or request this project cannot handle; the message names the field."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# HF fields that describe features this project does not implement; a value other than the one
# given here is refused with an error that names the field.
_UNSUPPORTED_HF = {
    "attention_bias": False,
    "mlp_bias": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "qk_norm": False,
    "tie_word_embeddings_with_bias": None,
}
_SUPPORTED_ACT = ("silu", "swish")
# Megatron's Llama-3 RoPE scaling takes only the factor (--rope-scaling-factor); these are fixed
# (megatron/core/models/common/embeddings/rotary_pos_embedding.py, _apply_scaling).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
# HF fields derived from the shape: generated from ModelConfig, never copied from `hf_extra`.
_HF_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "tie_word_embeddings", "torch_dtype", "dtype",
    "architectures", "model_type", "rope_parameters",
)


@dataclass
class ModelConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the tokenizer's, unpadded
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF's llama3 rope_scaling dict, or None
    tie_embeddings: bool = False
    # HF fields that are not shape (token ids, initializer_range, ...), kept for export.
    hf_extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_epsilon", "rotary_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_query_groups ({self.num_query_groups})")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embedding: bool = True) -> int:
        h, d = self.hidden_size, self.head_dim
        per_layer = (self.qkv_rows * h + self.num_attention_heads * d * h
                     + 3 * self.ffn_hidden_size * h + 2 * h)
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + h + (emb if include_embedding else 0)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = hf.get("model_type")
        archs = hf.get("architectures") or []
        if arch not in (None, "llama") or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"unsupported architecture: model_type={arch!r} architectures={archs}; "
                "only Llama-family checkpoints (model_type 'llama', LlamaForCausalLM) are supported")
        for name, ok in _UNSUPPORTED_HF.items():
            if name in hf and hf[name] not in (ok, None, False):
                raise ConfigError(f"unsupported config field {name}={hf[name]!r}")
        act = hf.get("hidden_act", "silu")
        if act not in _SUPPORTED_ACT:
            raise ConfigError(f"unsupported config field hidden_act={act!r} (SwiGLU/silu only)")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"unsupported config field pretraining_tp={hf['pretraining_tp']}")
        rope = _hf_rope(hf)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            rotary_base=rope["theta"],
            rope_scaling=rope["scaling"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hf_extra={k: v for k, v in hf.items() if k not in _HF_SHAPE_FIELDS
                      and not k.startswith("_") and k != "transformers_version"},
        )

    def to_hf(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
        out.update(self.hf_extra)
        out.update({
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            # Written explicitly: after pruning, hidden_size != heads * head_dim is common.
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "rope_theta": self.rotary_base,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": HF_DTYPE_NAMES[dtype],
        })
        return out

    # ------------------------------------------------------------------ Megatron
    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Megatron's rule: pad the vocab up to a multiple of divisible_by * TP."""
        multiple = divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def to_megatron_args(self, *, tp: int, pp: int, dtype: torch.dtype,
                         divisible_by: int = 128, transformer_impl: str = "transformer_engine",
                         ckpt_format: str = "torch", first_stage_layers: Optional[int] = None,
                         last_stage_layers: Optional[int] = None,
                         base: Optional[argparse.Namespace] = None,
                         **extra: Any) -> argparse.Namespace:
        """The `args` Namespace Megatron-LM's `--use-checkpoint-args` and our trainer read.

        `base` (the args of a checkpoint being rewritten) keeps its other fields (tokenizer,
        training hyper-parameters, ...); the model and parallel fields are always set here.
        """
        a = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace(
            tokenizer_type="HuggingFaceTokenizer", tokenizer_model=None, seq_length=None,
            consumed_train_samples=0, consumed_valid_samples=0, iteration=0,
            attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02)
        scaling = self.rope_scaling or {}
        model = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            group_query_attention=self.num_query_groups != self.num_attention_heads,
            num_query_groups=self.num_query_groups, kv_channels=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size(tp, divisible_by),
            make_vocab_size_divisible_by=divisible_by,
            # Megatron-LM >= 0.14 stores --norm-epsilon as layernorm_epsilon (a TransformerConfig
            # field); older releases as norm_epsilon. Both are written, for either reader.
            normalization="RMSNorm", layernorm_epsilon=self.norm_epsilon,
            norm_epsilon=self.norm_epsilon, apply_layernorm_1p=False,
            layernorm_zero_centered_gamma=False,
            swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=False,
            position_embedding_type="rope", use_rotary_position_embeddings=True,
            add_position_embedding=False, rotary_base=self.rotary_base, rotary_percent=1.0,
            rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
            use_rope_scaling=bool(scaling), rope_scaling_factor=float(scaling.get("factor", 8.0)),
            untie_embeddings_and_output_weights=not self.tie_embeddings,
            qk_layernorm=False, apply_residual_connection_post_layernorm=False,
            num_experts=None, multi_latent_attention=False,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=None,
            decoder_first_pipeline_num_layers=first_stage_layers,
            decoder_last_pipeline_num_layers=last_stage_layers,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
            transformer_impl=transformer_impl, ckpt_format=ckpt_format,
            # Round trips to HF keep the fields that are not shape (token ids, rope details).
            hf_config_extra=json.dumps(self.hf_extra), hf_rope_scaling=json.dumps(self.rope_scaling),
        )
        vars(a).update(model)
        for name, value in _MEGATRON_RUN_FIELDS.items():
            if getattr(a, name, None) is None:
                setattr(a, name, value)
        if getattr(a, "tokenizer_type", None) == "NullTokenizer":
            # Megatron-LM's NullTokenizer holds --vocab-size ids plus the EOD id (see
            # megatron_lm_vocab_size): keep that meaning for args copied from such a checkpoint.
            a.vocab_size = self.vocab_size - 1
        if a.seq_length is None:
            a.seq_length = min(self.max_position_embeddings, 4096)
        vars(a).update(extra)
        return a

    def megatron_lm_flags(self, dtype: torch.dtype) -> list:
        """What a Megatron-LM run must pass beside `--use-checkpoint-args`.

        Its load_args_from_checkpoint (megatron/training/checkpointing.py, core_v0.16.1)
        restores the shape, RoPE base, vocab and parallel sizes from the args, but not the norm
        epsilon, the Llama-3 RoPE scaling or the dtype: without these flags Megatron-LM builds
        the model with epsilon 1e-5, unscaled RoPE and fp32 (tests/test_megatron_lm.py).
        """
        flags = ["--norm-epsilon", repr(float(self.norm_epsilon))]
        if self.rope_scaling:
            flags += ["--use-rope-scaling", "--rope-scaling-factor",
                      repr(float(self.rope_scaling.get("factor", 8.0)))]
        flags += {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])
        return flags

    def megatron_lm_rope_mismatch(self) -> Optional[str]:
        """Why Megatron-LM's own model would compute this model's RoPE differently, or None."""
        scaling = self.rope_scaling or {}
        off = {k: scaling[k] for k, v in MEGATRON_LLAMA3_ROPE.items()
               if k in scaling and float(scaling[k]) != v}
        if not off:
            return None
        return (f"Megatron-LM's Llama-3 RoPE scaling fixes {MEGATRON_LLAMA3_ROPE}; this model "
                f"has {off}, so Megatron-LM's own model will not reproduce its logits (this "
                "project's trainer applies them)")

    @classmethod
    def from_megatron_args(cls, a: argparse.Namespace) -> "ModelConfig":
        def need(name):
            if getattr(a, name, None) is None:
                raise ConfigError(f"checkpoint args lack the field {name!r}")
            return getattr(a, name)
        _check_megatron_features(a)
        heads = need("num_attention_heads")
        groups = a.num_query_groups if getattr(a, "group_query_attention", False) else heads
        groups = groups or heads
        rope_scaling = json.loads(getattr(a, "hf_rope_scaling", "null") or "null")
        if rope_scaling is None and getattr(a, "use_rope_scaling", False):
            rope_scaling = {"rope_type": "llama3", "factor": a.rope_scaling_factor,
                            **MEGATRON_LLAMA3_ROPE}
        vocab = megatron_lm_vocab_size(a) or need("padded_vocab_size")
        return cls(
            num_layers=need("num_layers"), hidden_size=need("hidden_size"),
            ffn_hidden_size=need("ffn_hidden_size"), num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=getattr(a, "kv_channels", None) or a.hidden_size // heads,
            vocab_size=vocab,
            max_position_embeddings=getattr(a, "max_position_embeddings", None) or 4096,
            norm_epsilon=_norm_epsilon(a),
            rotary_base=getattr(a, "rotary_base", 10000),
            rope_scaling=rope_scaling,
            tie_embeddings=not getattr(a, "untie_embeddings_and_output_weights", False),
            hf_extra=json.loads(getattr(a, "hf_config_extra", "{}") or "{}"),
        )


# Run fields that Megatron-LM's own converter reads from a checkpoint's args without a default
# (tools/checkpoint/saver_base.py:109-110); kept from `base` when it has them.
_MEGATRON_RUN_FIELDS = {"sequence_parallel": False, "apply_query_key_layer_scaling": False}

# Megatron args of features this project does not implement: (field, the values that are fine,
# what the field means). A checkpoint with any other value is refused with the field named.
_UNSUPPORTED_MEGATRON = (
    ("normalization", ("RMSNorm",), "RMSNorm only"),
    ("swiglu", (True,), "SwiGLU MLPs only"),
    ("squared_relu", (False,), "SwiGLU MLPs only"),
    ("add_bias_linear", (False,), "no biases"),
    ("add_qkv_bias", (False,), "no biases"),
    ("position_embedding_type", ("rope",), "RoPE only"),
    ("rotary_interleaved", (False,), "rotate-half RoPE only"),
    ("rotary_percent", (1.0,), "RoPE on the whole head"),
    ("num_experts", (None, 0), "dense MLPs only, no MoE"),
    ("qk_layernorm", (False,), "no QK norm"),
    ("apply_layernorm_1p", (False,), "plain RMSNorm weights"),
    ("layernorm_zero_centered_gamma", (False,), "plain RMSNorm weights"),
    ("multi_latent_attention", (False,), "standard attention, no MLA"),
    ("heterogeneous_layers_config_path", (None,), "identical layers"),
    ("heterogeneous_layers_config_encoded_json", (None,), "identical layers"),
)
# Defaults of Megatron-LM's parser for the fields above that a checkpoint may omit.
_MEGATRON_DEFAULTS = {"normalization": "LayerNorm", "swiglu": False, "rotary_percent": 1.0,
                      "position_embedding_type": "learned_absolute"}


def _check_megatron_features(a: argparse.Namespace) -> None:
    for name, ok, meaning in _UNSUPPORTED_MEGATRON:
        value = getattr(a, name, _MEGATRON_DEFAULTS.get(name, ok[0]))
        if value not in ok:
            raise ConfigError(f"unsupported checkpoint field {name}={value!r} "
                              f"(this project handles Llama-family models: {meaning})")


def megatron_lm_vocab_size(a: argparse.Namespace) -> Optional[int]:
    """The real (unpadded) vocabulary of a checkpoint's args, where the args tell it.

    `args.vocab_size` is Megatron-LM's `--vocab-size`, which only NullTokenizer reads: its
    tokenizer (megatron/training/tokenizer/tokenizer.py:813-835) has ids 0..vocab_size-1 and the
    EOD id vocab_size, so vocab_size + 1 ids, all of which training sees. Other tokenizers leave
    args.vocab_size None (Megatron-LM stores only padded_vocab_size) unless it was given anyway:
    then the tokenizer the args name is counted, where it is on this machine. The project's own
    writers store the real vocab in args.vocab_size.
    """
    vocab = getattr(a, "vocab_size", None)
    if vocab is None:
        return _tokenizer_vocab_size(a)
    return int(vocab) + 1 if getattr(a, "tokenizer_type", None) == "NullTokenizer" else int(vocab)


def _tokenizer_vocab_size(a: argparse.Namespace) -> Optional[int]:
    """The vocab of the tokenizer a Megatron-LM checkpoint's args name, counted as Megatron-LM
    counts it (megatron/training/tokenizer/tokenizer.py), when that tokenizer is on this machine;
    else None (and the caller keeps the padded vocab, padding rows included)."""
    kind, path = getattr(a, "tokenizer_type", None), getattr(a, "tokenizer_model", None)
    try:
        if kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer") and path \
                and os.path.isfile(path):
            import sentencepiece  # len(_vocab) = the model's pieces, no extra tokens
            return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size())
        if kind == "HuggingFaceTokenizer" and path and os.path.exists(path):
            from transformers import AutoTokenizer  # _HuggingFaceTokenizer: len(tokenizer)
            return len(AutoTokenizer.from_pretrained(path))
        vocab_file = getattr(a, "vocab_file", None)
        if kind == "GPT2BPETokenizer" and vocab_file and os.path.isfile(vocab_file):
            with open(vocab_file) as f:  # len(encoder)
                return len(json.load(f))
    except Exception as e:  # an unreadable tokenizer: as if it were absent
        log.warning("cannot read the checkpoint's tokenizer %s (%s): %s", path, kind, e)
        return None
    if kind is not None:
        log.warning("the checkpoint's args give no vocab size and its tokenizer (%s %s) is not "
                    "here: the padded vocab (%s) is taken as the vocab", kind, path,
                    getattr(a, "padded_vocab_size", None))
    return None


def _norm_epsilon(a: argparse.Namespace) -> float:
    """Megatron-LM (core_v0.16.1) keeps `--norm-epsilon` in args.layernorm_epsilon, the field
    its models read; checkpoints of older releases carry norm_epsilon (this project writes both).
    Megatron-LM's HF converter sets only norm_epsilon, which its own saver then drops
    (tests/test_megatron_lm.py::test_their_converter_drops_the_epsilon)."""
    for name in ("layernorm_epsilon", "norm_epsilon"):
        value = getattr(a, name, None)
        if value is not None:
            return float(value)
    return 1e-5


def _hf_rope(hf: dict) -> dict:
    """RoPE theta and llama3 scaling from either transformers 4.x or 5.x config layouts."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ConfigError(f"unsupported config field rope_scaling with type {kind!r} "
                              "(only 'llama3' scaling is supported)")
    return {"theta": float(theta), "scaling": scaling}


def load_hf_config(path) -> dict:
    with open(path) as f:
        return json.load(f)
