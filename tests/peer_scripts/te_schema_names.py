"""Print, as JSON, the parameter names Megatron-LM's converter uses for a GPT model of the
Transformer Engine layer spec without biases: python te_schema_names.py LAYERS UNTIED."""
import json
import sys

from schema_core import get_model_schema

layers, untied = int(sys.argv[1]), bool(int(sys.argv[2]))
schema = get_model_schema("GPT", "transformer_engine", None, 1)
names = [schema["embeddings"]["word"], schema["final_norm"]["weight"]]
if untied:
    names.append(schema["output_layer"]["weight"])
for i in range(layers):
    for key, name in schema["layer"].items():
        if not key.endswith("bias"):
            names.append(f"{schema['layer_prefix']}.{i}.{name}")
print(json.dumps(names))
