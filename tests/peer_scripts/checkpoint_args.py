"""What Megatron-LM's `--use-checkpoint-args` makes of a checkpoint: parse its arguments as a run
with `--load CKPT --use-checkpoint-args [FLAGS...]` would, apply load_args_from_checkpoint and
validate_args (what initialize_megatron does), and print the model fields as JSON.

    python checkpoint_args.py CKPT [FLAGS...]
"""
import json
import sys

ckpt, flags = sys.argv[1], sys.argv[2:]
sys.argv = ["pretrain_gpt.py", "--micro-batch-size", "1", "--mock-data", "--load", ckpt,
            "--use-checkpoint-args", "--use-mp-args-from-checkpoint-args", *flags]

from megatron.training.arguments import parse_args, validate_args  # noqa: E402
from megatron.training.checkpointing import load_args_from_checkpoint  # noqa: E402

args = parse_args()
args, _ = load_args_from_checkpoint(args)
args.world_size = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
args = validate_args(args)
FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
          "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
          "rotary_base", "use_rope_scaling", "rope_scaling_factor", "layernorm_epsilon",
          "untie_embeddings_and_output_weights", "padded_vocab_size", "swiglu", "normalization",
          "add_bias_linear", "add_qkv_bias", "position_embedding_type", "params_dtype", "bf16",
          "fp16", "tensor_model_parallel_size", "pipeline_model_parallel_size", "iteration")
print(json.dumps({f: str(getattr(args, f)) if f == "params_dtype" else getattr(args, f)
                  for f in FIELDS}))
