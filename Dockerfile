# GPU nodes: the NGC PyTorch container, whose torch, Transformer Engine and apex are used as they are
# (the trainer picks Transformer Engine's layer spec when it is importable).
#   docker build -t megatron-prune .
#   docker run --gpus all --ipc=host --rm -it -v "$PWD/ckpt:/ckpt" megatron-prune \
#     megatron-prune megatron-to-hf --load /ckpt/tp2 --save /ckpt/hf
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/megatron-prune
# pyproject.toml pins torch==2.13.0 for CPU machines: install our other dependencies first, then the
# project itself without dependencies, so the container's CUDA build of torch is never replaced.
COPY docker/requirements.txt docker/requirements.txt
RUN pip install --no-cache-dir -r docker/requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

CMD ["megatron-prune", "--help"]
