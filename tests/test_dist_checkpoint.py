"""megatron-core distributed checkpoints (`--ckpt-format torch_dist`): exact round trips through the
format, resharding through it, and real megatron-core GPTModels loading what we write (and us
reading what megatron-core writes)."""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from checks import assert_same_checkpoint, assert_same_tensors, hf_tensors
from hf_models import make_hf_llama
from megatron_prune.checkpoint import convert, layout
from megatron_prune.checkpoint.legacy import LegacyCheckpoint
from megatron_prune.checkpoint.megatron import open_megatron
from megatron_prune.checkpoint.megatron_dirs import checkpoint_format
from megatron_prune.checkpoint.tensor_io import CheckpointReadError, torch_load

pytest.importorskip("megatron.core")
from megatron_prune.checkpoint import torch_dist as dist_checkpoint  # noqa: E402
from megatron_prune.checkpoint.torch_dist_read import DistCheckpoint  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

MODELS = {
    "gqa_untied": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True),
    "gqa_tied_bf16": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                          dtype=torch.bfloat16),
    "mha_untied_bf16": dict(num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                            dtype=torch.bfloat16),
}


def dcp_metadata(it_dir):
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(it_dir)).read_metadata()


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_model(request, tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp(request.param) / "hf", **MODELS[request.param])


# ---------------------------------------------------------------------------- pure conversion
@pytest.mark.parametrize("tp,pp,impl", [(1, 1, layout.TE), (2, 2, layout.TE), (4, 1, layout.LOCAL)])
def test_hf_dist_hf_roundtrip_is_bit_identical(hf_model, tmp_path, tp, pp, impl):
    dist = tmp_path / "dist"
    convert.hf_to_megatron(hf_model, dist, tp=tp, pp=pp, impl=impl, ckpt_format="torch_dist")
    assert checkpoint_format(dist) == "torch_dist"
    assert not list(dist.glob("iter_*/mp_rank_*"))
    ckpt = open_megatron(dist)
    assert isinstance(ckpt, DistCheckpoint)
    assert (ckpt.tp, ckpt.pp, ckpt.impl, ckpt.format, ckpt.iteration) == (
        tp, pp, impl, "torch_dist", 1)
    assert ckpt.dtype == next(iter(hf_tensors(hf_model).values())).dtype

    out = tmp_path / "hf"
    convert.megatron_to_hf(dist, out)
    assert_same_tensors(hf_tensors(hf_model), hf_tensors(out))


def test_reshard_legacy_through_dist_equals_direct(hf_model, tmp_path):
    """legacy TP2 PP2 -> torch_dist -> legacy TP1 is bit-identical to converting HF at TP1."""
    convert.hf_to_megatron(hf_model, tmp_path / "tp2pp2", tp=2, pp=2)
    convert.reshard(tmp_path / "tp2pp2", tmp_path / "dist", tp=4, pp=1, ckpt_format="torch_dist")
    assert checkpoint_format(tmp_path / "dist") == "torch_dist"
    convert.reshard(tmp_path / "dist", tmp_path / "tp1", tp=1, pp=1, ckpt_format="torch")
    convert.hf_to_megatron(hf_model, tmp_path / "direct", tp=1)
    assert_same_checkpoint(tmp_path / "tp1", tmp_path / "direct")

    # and legacy TP2 from the same dist checkpoint equals the original TP2 PP2 split at PP1
    convert.reshard(tmp_path / "dist", tmp_path / "tp2", tp=2, pp=1, ckpt_format="torch")
    convert.hf_to_megatron(hf_model, tmp_path / "direct2", tp=2)
    assert_same_checkpoint(tmp_path / "tp2", tmp_path / "direct2")


def test_local_spec_and_dist_to_dist(tmp_path):
    hf = make_hf_llama(tmp_path / "hf", num_key_value_heads=2)
    convert.hf_to_megatron(hf, tmp_path / "a", tp=2, impl=layout.LOCAL, ckpt_format="torch_dist")
    convert.reshard(tmp_path / "a", tmp_path / "b", tp=1, pp=2)  # stays torch_dist, local spec
    b = DistCheckpoint(tmp_path / "b")
    assert (b.tp, b.pp, b.impl) == (1, 2, layout.LOCAL)
    convert.reshard(tmp_path / "b", tmp_path / "legacy", pp=2, ckpt_format="torch")
    assert LegacyCheckpoint(tmp_path / "legacy").impl == layout.LOCAL
    convert.hf_to_megatron(hf, tmp_path / "direct", pp=2, impl=layout.LOCAL)
    assert_same_checkpoint(tmp_path / "legacy", tmp_path / "direct")


# ---------------------------------------------------------------------------- the format itself
def test_layout_keys_shapes_and_common_state(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")  # 4 layers, hidden 64, 8 heads in 4 groups, ffn 96, vocab 300
    args = convert.hf_to_megatron(hf, tmp_path / "d", tp=2, impl=layout.TE,
                                  ckpt_format="torch_dist")
    it = tmp_path / "d" / "iter_0000001"
    assert sorted(p.name for p in it.iterdir()) == [".metadata", "__0_0.distcp", "common.pt",
                                                    "metadata.json"]
    assert (tmp_path / "d" / "latest_checkpointed_iteration.txt").read_text() == "1"
    md = dcp_metadata(it).state_dict_metadata
    L, h, ffn, qkv = 4, 64, 96, (8 + 2 * 4) * 8
    shapes = {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}
    assert shapes == {
        "embedding.word_embeddings.weight": (512, h),  # 300 padded to 128 x TP=2
        "output_layer.weight": (512, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, h),
        "decoder.layers.self_attention.linear_qkv.weight": (L, qkv, h),
        "decoder.layers.self_attention.linear_proj.weight": (L, h, 8 * 8),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, h),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * ffn, h),
        "decoder.layers.mlp.linear_fc2.weight": (L, h, ffn),
    }
    # linear_fc1 in the two chunks (gate, up) mcore's SwiGLU factory stores; layers one chunk each
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"].chunks
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in fc1) == sorted(
        ((i, k * ffn, 0), (1, ffn, h)) for i in range(L) for k in range(2))
    objects = sorted(k for k, v in md.items() if not hasattr(v, "size"))
    assert objects == sorted(
        [f"decoder.layers.{m}._extra_state/shard_{i}_{L}" for i in range(L) for m in (
            "self_attention.linear_qkv", "self_attention.core_attention",
            "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]
        + ["decoder.final_layernorm._extra_state/shard_0_1"])
    assert [k for k, *_ in dist_checkpoint.extra_state_keys(layout.LOCAL, 2)] == [
        f"decoder.layers.{m}._extra_state" for i in range(2) for m in (
            "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
            "mlp.linear_fc2")] + ["decoder.final_layernorm._extra_state"]

    common = torch_load(it / "common.pt", mmap_=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 1
    assert common["content_metadata"]["singleton_local_shards"] is False
    stored = common["args"]
    assert isinstance(stored, argparse.Namespace)
    assert (stored.tensor_model_parallel_size, stored.padded_vocab_size, stored.ckpt_format) == (
        2, 512, "torch_dist")
    assert stored.no_save_optim and stored.no_save_rng  # Megatron-LM asks for neither
    assert not getattr(args, "no_save_optim", False)  # the caller's args are left alone


def test_write_streams_one_group_at_a_time(tmp_path, monkeypatch):
    """Each parameter group is read from the source once, and written before the next is read."""
    hf = make_hf_llama(tmp_path / "hf")
    source = convert.HFSource(convert.HFCheckpoint(hf))
    events = []
    real_get, real_write = source.get, dist_checkpoint._write_item

    def get(name, *a, **k):
        events.append(("read", name))
        return real_get(name, *a, **k)

    def write_item(transforms, stream, data, write_item, *a, **k):
        events.append(("write", write_item.index.fqn))
        return real_write(transforms, stream, data, write_item, *a, **k)

    monkeypatch.setattr(source, "get", get)
    monkeypatch.setattr(dist_checkpoint, "_write_item", write_item)
    cfg = source.config
    args = cfg.to_megatron_args(tp=1, pp=1, dtype=torch.float32, ckpt_format="torch_dist")
    dist_checkpoint.write_dist(source, cfg, tmp_path / "d", args=args, dtype=torch.float32,
                               impl=layout.TE, iteration=7)
    reads = [n for kind, n in events if kind == "read"]
    names = [n for spec, layer in layout.iter_hf_entries(cfg) for n in spec.hf_names(layer)]
    assert sorted(reads) == sorted(names)  # every HF tensor read exactly once
    # reads and writes alternate: a group's HF tensors (at most q, k, v), then its chunks
    pattern = "".join("r" if kind == "read" else "w" for kind, name in events
                      if "_extra_state/" not in name)
    runs = pattern.replace("rw", "r w").replace("wr", "w r").split()
    groups = len(list(layout.iter_hf_entries(cfg)))
    assert len(runs) == 2 * groups and all(set(r) == {"r"} for r in runs[::2])
    assert max(len(r) for r in runs[::2]) <= 3
    assert pattern.count("w") == groups + cfg.num_layers  # linear_fc1: two chunks per layer
    assert (tmp_path / "d" / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert DistCheckpoint(tmp_path / "d").iteration == 7


def test_reader_errors_name_the_problem(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")
    convert.hf_to_megatron(hf, tmp_path / "d", ckpt_format="torch_dist")
    it = tmp_path / "d" / "iter_0000001"

    # args that disagree with the stored shapes
    common = torch_load(it / "common.pt", mmap_=False)
    common["args"].ffn_hidden_size = 128
    torch.save(common, it / "common.pt")
    with pytest.raises(CheckpointReadError, match="linear_fc1.weight has global shape"):
        DistCheckpoint(tmp_path / "d")

    common["args"].ffn_hidden_size = 96
    torch.save(common, it / "common.pt")
    DistCheckpoint(tmp_path / "d")

    # a truncated data file: found when a tensor in the cut-off part is read
    data = it / "__0_0.distcp"
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])
    ckpt = DistCheckpoint(tmp_path / "d")
    with pytest.raises(CheckpointReadError, match="output_layer.weight, truncated or corrupt"):
        ckpt.read_hf_group(layout.OUTPUT, None)
    data.write_bytes(full)

    # a tensor missing from the metadata
    meta = dcp_metadata(it)
    del meta.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
    with open(it / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(CheckpointReadError, match="missing tensor decoder.layers.mlp.linear_fc2"):
        DistCheckpoint(tmp_path / "d")

    # not a distributed checkpoint
    (it / "metadata.json").unlink()
    with pytest.raises(CheckpointReadError, match="metadata.json"):
        DistCheckpoint(tmp_path / "d")


# ---------------------------------------------------------------------------- real megatron-core
WORKER = textwrap.dedent('''
    """Load a torch_dist checkpoint into a real megatron-core GPTModel (local spec, gloo, CPU),
    compare it with the same model loaded from a legacy checkpoint, optionally save it with
    megatron-core's own dist_checkpointing.save."""
    import argparse
    from pathlib import Path

    import torch


    def main():
        p = argparse.ArgumentParser()
        p.add_argument("--dist")
        p.add_argument("--legacy")
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--pp", type=int, default=1)
        p.add_argument("--save")
        a = p.parse_args()

        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron_prune.mcore.load import load_legacy_into_model
        from megatron_prune.mcore.model import build_gpt_model
        from megatron_prune.mcore.parallel import destroy_distributed, init_distributed
        from megatron_prune.checkpoint.torch_dist import CONTENT_METADATA
        from megatron_prune.checkpoint.torch_dist_read import DistCheckpoint

        torch.serialization.add_safe_globals([argparse.Namespace])  # common.pt holds the args
        info = init_distributed(a.tp, a.pp)
        ckpt = DistCheckpoint(a.dist)

        def build():
            model = build_gpt_model(ckpt.config, impl="local", dtype=ckpt.dtype,
                                                divisible_by=ckpt.divisible_by)
            # Megatron-LM's Float16Module casts everything (the local spec's torch norms are
            # created in fp32 whatever params_dtype says)
            return model.to(ckpt.dtype)

        model = build()
        # as Megatron-LM does: the model's sharded state under "model", common items beside it
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.dir))
        assert loaded["iteration"] == 1 and loaded["args"].num_layers == ckpt.config.num_layers
        model.load_state_dict(loaded["model"], strict=True)
        ref = build()
        load_legacy_into_model(ref, a.legacy)
        got, want = model.state_dict(), ref.state_dict()
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
        n = 0
        for k, v in want.items():
            if torch.is_tensor(v):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
                n += 1
        print(f"MATCH rank {info['rank']} tensors {n}", flush=True)

        if a.save:
            # mcore's writer has two CUDA-only calls in 0.16.1 (a sync and a flag tensor)
            torch.cuda.synchronize = lambda *x, **k: None
            torch.cuda.current_device = lambda: "cpu"
            it = Path(a.save) / "iter_0000001"
            if info["rank"] == 0:
                it.mkdir(parents=True)
            dist.barrier()
            state = {"model": model.sharded_state_dict(), "args": ckpt.args,
                     "checkpoint_version": 3.0, "iteration": 1}
            dist_checkpointing.save(state, str(it), content_metadata=dict(CONTENT_METADATA))
            if info["rank"] == 0:
                (Path(a.save) / "latest_checkpointed_iteration.txt").write_text("1")
            print(f"SAVED rank {info['rank']}", flush=True)
        destroy_distributed()


    if __name__ == "__main__":
        main()
''')


def run_worker(tmp_path, nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "load_dist_worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in range(nproc):
        assert f"MATCH rank {r} " in proc.stdout, proc.stdout
    return proc


def test_mcore_gptmodel_loads_at_tp2_and_we_read_what_mcore_writes(tmp_path):
    """Written at TP=1 (vocab padded to 384, TE names/extra states), loaded by a TP=2 local-spec
    GPTModel (vocab 512: mcore re-pads) equal to the legacy TP2 checkpoint; the model saved again
    by megatron-core (TP-split chunks, 2 ranks x 2 files) reads back to the original HF tensors."""
    hf = make_hf_llama(tmp_path / "hf", **MODELS["gqa_untied"])
    convert.hf_to_megatron(hf, tmp_path / "dist", tp=1, impl=layout.TE, ckpt_format="torch_dist")
    convert.hf_to_megatron(hf, tmp_path / "legacy", tp=2)
    run_worker(tmp_path, 2, "--dist", tmp_path / "dist", "--legacy", tmp_path / "legacy",
               "--tp", 2, "--save", tmp_path / "mcore")

    ours = dcp_metadata(tmp_path / "dist" / "iter_0000001").state_dict_metadata
    theirs = dcp_metadata(tmp_path / "mcore" / "iter_0000001").state_dict_metadata
    tensors = {k for k, v in ours.items() if hasattr(v, "size")}
    assert tensors == {k for k, v in theirs.items() if hasattr(v, "size")}
    for k in tensors:
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert tuple(theirs[k].size) == (512, 64) and tuple(ours[k].size) == (384, 64)
        else:
            assert theirs[k].size == ours[k].size, k
    assert len(glob.glob(str(tmp_path / "mcore" / "iter_0000001" / "*.distcp"))) == 4

    convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "back")
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "back"))


def test_mcore_gptmodel_loads_tied_pp2_and_metadata_is_mcores(tmp_path):
    """A tied bf16 GQA model written with the local spec at TP=1 loads into a PP=2 GPTModel (the
    last stage's output layer comes from the embedding key), and the model saved by megatron-core
    at PP=2 has exactly our keys, global shapes, chunks and dtypes."""
    hf = make_hf_llama(tmp_path / "hf", **MODELS["gqa_tied_bf16"])
    convert.hf_to_megatron(hf, tmp_path / "dist", impl=layout.LOCAL, ckpt_format="torch_dist")
    convert.hf_to_megatron(hf, tmp_path / "legacy", pp=2, impl=layout.LOCAL)
    run_worker(tmp_path, 2, "--dist", tmp_path / "dist", "--legacy", tmp_path / "legacy",
               "--pp", 2, "--save", tmp_path / "mcore")

    ours = dcp_metadata(tmp_path / "dist" / "iter_0000001").state_dict_metadata
    theirs = dcp_metadata(tmp_path / "mcore" / "iter_0000001").state_dict_metadata
    # the final norm's extra state is there for models built where Transformer Engine is
    # installed (TENorm); this one has none, and ignored the unexpected object on load
    assert ours.pop("decoder.final_layernorm._extra_state/shard_0_1") is not None
    assert ours == theirs
    assert "output_layer.weight" not in ours
    convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "back")
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "back"))
