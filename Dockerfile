# GPU nodes: the NGC PyTorch container (Transformer Engine and apex included, used when present).
# Build:  docker build -t megatron-prune .
# Run:    docker run --gpus all --ipc=host --rm -it -v $PWD/ckpt:/ckpt megatron-prune \
#           megatron-prune megatron-to-hf --load /ckpt/tp2 --save /ckpt/hf
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/megatron-prune
# The container's own torch stays: install our other dependencies, then the project without deps
# (the pyproject pins torch==2.13.0 for CPU machines, which must not replace the CUDA build).
RUN pip install --no-cache-dir "megatron-core==0.16.1" transformers safetensors sentencepiece \
        protobuf tiktoken tqdm psutil numpy
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

CMD ["megatron-prune", "--help"]
