"""HF <-> Megatron conversion and resharding: bit-exact round trips and clear failures."""
from __future__ import annotations

import collections
import json
import os
import shutil

import pytest
import torch

from checks import assert_same_checkpoint, assert_same_tensors, cli_fails, hf_tensors
from hf_models import make_hf_llama
from megatron_prune.checkpoint import convert, layout
from megatron_prune.cli import main
from megatron_prune.checkpoint.legacy import LegacyCheckpoint
from megatron_prune.checkpoint.tensor_io import torch_load


MODELS = {
    "gqa_untied": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True),
    "gqa_tied_bf16": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                          dtype=torch.bfloat16),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_model(request, tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp(request.param) / "hf", **MODELS[request.param])


@pytest.mark.parametrize("tp,pp,first,last", [
    (1, 1, None, None), (2, 1, None, None), (4, 1, None, None),
    (1, 2, None, None), (2, 2, None, None), (4, 2, None, None),
    (2, 3, 1, 2),  # uneven: 1 + 1 + 2 layers
])
def test_hf_megatron_hf_roundtrip_is_bit_identical(hf_model, tmp_path, tp, pp, first, last):
    meg = tmp_path / "meg"
    convert.hf_to_megatron(hf_model, meg, tp=tp, pp=pp, first=first, last=last)
    ckpt = LegacyCheckpoint(meg)
    assert (ckpt.tp, ckpt.pp) == (tp, pp)
    assert ckpt.impl == layout.TE
    if first is not None:
        assert ckpt.stage_counts == [1, 1, 2]
    out = tmp_path / "hf"
    convert.megatron_to_hf(meg, out)
    assert_same_tensors(hf_tensors(hf_model), hf_tensors(out))
    src_cfg = json.loads((hf_model / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "num_key_value_heads", "tie_word_embeddings",
              "rms_norm_eps", "bos_token_id", "eos_token_id", "intermediate_size"):
        assert src_cfg[k] == out_cfg[k], k


def test_local_spec_names_and_args(hf_model, tmp_path):
    meg = tmp_path / "meg"
    convert.hf_to_megatron(hf_model, meg, tp=2, pp=2, impl=layout.LOCAL)
    obj = torch_load(meg / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt", mmap_=False)
    names = set(obj["model"])
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in names
    assert not any("layer_norm_weight" in n for n in names)
    a = obj["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (2, 2)
    assert a.padded_vocab_size == 512 and a.vocab_size == 300  # 300 -> multiple of 128*2
    assert a.swiglu and a.normalization == "RMSNorm" and a.position_embedding_type == "rope"
    assert obj["checkpoint_version"] == 3.0
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "1"
    out = tmp_path / "hf"
    convert.megatron_to_hf(meg, out)
    assert_same_tensors(hf_tensors(hf_model), hf_tensors(out))


def test_te_checkpoint_carries_te_extra_state(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")
    convert.hf_to_megatron(hf, tmp_path / "meg", tp=1, pp=1)
    sd = torch_load(tmp_path / "meg/iter_0000001/mp_rank_00/model_optim_rng.pt", mmap_=False)["model"]
    for m in ("linear_qkv", "core_attention", "linear_proj"):
        assert f"decoder.layers.0.self_attention.{m}._extra_state" in sd
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in sd
    assert "output_layer._extra_state" in sd


def test_shards_follow_megatron_layout(tmp_path):
    """Per-rank fc1 is [gate_r; up_r]; QKV is grouped [q_g, k_g, v_g]; vocab padded by TP."""
    hf = make_hf_llama(tmp_path / "hf")
    convert.hf_to_megatron(hf, tmp_path / "meg", tp=2, pp=1, impl=layout.LOCAL)
    ref = hf_tensors(hf)
    r1 = torch_load(tmp_path / "meg/iter_0000001/mp_rank_01/model_optim_rng.pt", mmap_=False)["model"]
    gate, up = ref["model.layers.0.mlp.gate_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[48:], up[48:]]))
    q, k, v = (ref[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    d = 8  # head dim; 8 heads / 4 groups: rank 1 holds groups 2 and 3
    want = torch.cat([q[4 * d:6 * d], k[2 * d:3 * d], v[2 * d:3 * d],
                      q[6 * d:8 * d], k[3 * d:4 * d], v[3 * d:4 * d]])
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_qkv.weight"], want)
    emb = r1["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 256  # padded 512 / TP 2
    assert torch.equal(emb[:44], ref["model.embed_tokens.weight"][256:300])
    assert not emb[44:].any()
    o = ref["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_proj.weight"], o[:, 32:])


@pytest.mark.parametrize("kind", ["bin", "mixed_dtype"])
def test_fused_reads_fall_back_where_they_cannot_read_in_place(tmp_path, kind, monkeypatch):
    """hf-to-megatron reads QKV and gate/up row runs straight into the fused tensor from
    safetensors; a .bin checkpoint (read, then copied in) and parts of different dtypes (left
    to torch.cat) give the same rank files as the concatenating path."""
    hf = make_hf_llama(tmp_path / "hf", num_attention_heads=8, num_key_value_heads=4)
    if kind == "bin":
        state = hf_tensors(hf)
        for f in hf.glob("model*.safetensors*"):
            f.unlink()
        torch.save(state, hf / "pytorch_model.bin")
    else:
        from safetensors.torch import load_file, save_file
        for f in hf.glob("model*.safetensors"):
            state = load_file(f)
            for name in state:
                if name.endswith("up_proj.weight") or name.endswith("k_proj.weight"):
                    state[name] = state[name].to(torch.bfloat16).to(torch.float32)
                elif "layernorm" not in name and "norm" not in name:
                    state[name] = state[name].to(torch.bfloat16)
            save_file(state, f, metadata={"format": "pt"})
    fast = tmp_path / "fast"
    convert.hf_to_megatron(hf, fast, tp=2, pp=1)
    monkeypatch.setattr(convert, "_read_fused", lambda *a, **k: None)  # torch.cat only
    convert.hf_to_megatron(hf, tmp_path / "cat", tp=2, pp=1)
    assert_same_checkpoint(fast, tmp_path / "cat")


def test_fused_reads_equal_concatenation(hf_model, tmp_path, monkeypatch):
    """The in-place reads give the same rank files as reading the parts and concatenating
    them, bit for bit: hf-to-megatron at TP 1, 2 and 4, and reshard from TP 4 to 2 (two input
    ranks per output rank), 2 to 4 (half of one) and 4 to 2·PP2 (GQA, MHA, fp32 and bf16)."""
    reshards = {"tp2": dict(tp=2), "tp2pp2": dict(tp=2, pp=2)}

    def run(tag):
        for tp in (1, 2, 4):
            convert.hf_to_megatron(hf_model, tmp_path / f"{tag}{tp}", tp=tp, pp=1)
        for name, kw in reshards.items():
            convert.reshard(tmp_path / f"{tag}4", tmp_path / f"{tag}-{name}", **kw)
        convert.reshard(tmp_path / f"{tag}2", tmp_path / f"{tag}-tp4", tp=4)
    run("fast")
    monkeypatch.setattr(convert, "_read_fused", lambda *a, **k: None)
    run("cat")
    for out in ("1", "2", "4", "-tp2", "-tp2pp2", "-tp4"):
        assert_same_checkpoint(tmp_path / f"fast{out}", tmp_path / f"cat{out}")


def _mapped_rss(paths) -> int:
    """Bytes of this process's mappings of `paths` that are resident (Linux smaps)."""
    names, total, current = {str(p) for p in paths}, 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                current = len(head) >= 6 and head[5] in names
            elif current and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux smaps")
@pytest.mark.parametrize("release", [True, False])
@pytest.mark.parametrize("out_tp", [1, 2])
def test_reshard_reads_keep_few_input_pages_mapped(tmp_path, monkeypatch, release, out_tp):
    """Reshard reads the input shards as views of their memory maps; their pages are released
    when the next parameter is read (TP2 -> 1: every tensor is a concatenation), or a few
    parameters later where views were handed on (TP2 -> 2), so after building a whole rank
    file only a few parameters' pages stay resident. Without the release, the whole input
    would be."""
    hf = make_hf_llama(tmp_path / "hf", hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=16)
    convert.hf_to_megatron(hf, tmp_path / "tp2", tp=2)
    if not release:
        monkeypatch.setattr(convert, "release_pages", lambda t: None)
    source = convert.open_source(tmp_path / "tp2")
    ckpt = source.ckpt
    queued = collections.deque()
    for _, make in convert.rank_plan(source, source.config, ckpt.impl, out_tp, 0, 0,
                                     layout.stage_ranges([16]), torch.float32, 128):
        if make is not None:
            queued.append(make())
        if len(queued) > 3:  # as the writer thread: it reads a tensor up to 3 tensors later
            queued.popleft().clone()
    files = list(ckpt.files.values()) if out_tp == 1 else [ckpt.files[(0, 0)]]
    size = sum(f.stat().st_size for f in files)
    resident = _mapped_rss(files)
    if release:
        assert resident < size / 4, (resident, size)
    else:  # the test can tell: every page was touched and stays mapped
        assert resident > size * 3 / 4, (resident, size)


def test_reshard_chain_equals_direct_conversion(tmp_path):
    hf = make_hf_llama(tmp_path / "hf", num_hidden_layers=4, tie_word_embeddings=True)
    convert.hf_to_megatron(hf, tmp_path / "tp4", tp=4, pp=1)
    convert.reshard(tmp_path / "tp4", tmp_path / "tp2pp2", tp=2, pp=2)
    convert.reshard(tmp_path / "tp2pp2", tmp_path / "tp1", tp=1, pp=1)
    convert.hf_to_megatron(hf, tmp_path / "direct", tp=1, pp=1)
    assert_same_checkpoint(tmp_path / "tp1", tmp_path / "direct")
    # and changing the layer spec on the way keeps every tensor
    convert.reshard(tmp_path / "tp2pp2", tmp_path / "local", tp=2, pp=1, impl=layout.LOCAL)
    convert.megatron_to_hf(tmp_path / "local", tmp_path / "back")
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "back"))


def test_uneven_pipeline_reshard(tmp_path):
    hf = make_hf_llama(tmp_path / "hf", num_hidden_layers=5)
    convert.hf_to_megatron(hf, tmp_path / "a", tp=1, pp=2, first=2)
    assert LegacyCheckpoint(tmp_path / "a").stage_counts == [2, 3]
    convert.reshard(tmp_path / "a", tmp_path / "b", tp=2, pp=2, last=1)
    assert LegacyCheckpoint(tmp_path / "b").stage_counts == [4, 1]
    convert.megatron_to_hf(tmp_path / "b", tmp_path / "hf2")
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "hf2"))


def test_export_loads_in_transformers_and_keeps_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    hf = make_hf_llama(tmp_path / "hf", tie_word_embeddings=True)
    convert.hf_to_megatron(hf, tmp_path / "meg", tp=2, pp=2)
    convert.megatron_to_hf(tmp_path / "meg", tmp_path / "out", max_shard_bytes=60_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 300, (2, 17))
    a = AutoModelForCausalLM.from_pretrained(hf).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_stories260k_roundtrip(stories260k_hf, tmp_path):
    for tp, pp in ((2, 1), (1, 5), (4, 1)):
        meg = tmp_path / f"m{tp}{pp}"
        # 8 heads / 4 KV groups: TP 4 is the largest valid TP
        convert.hf_to_megatron(stories260k_hf, meg, tp=tp, pp=pp)
        convert.megatron_to_hf(meg, tmp_path / f"h{tp}{pp}")
        assert_same_tensors(hf_tensors(stories260k_hf), hf_tensors(tmp_path / f"h{tp}{pp}"))


# ------------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("small") / "hf", num_hidden_layers=3,
                         intermediate_size=96, max_shard_size="60KB")


@pytest.mark.parametrize("flags,match", [
    (["--tensor-model-parallel-size", "3"], "num_attention_heads=8 is not divisible"),
    (["--tensor-model-parallel-size", "8"], "num_query_groups (KV heads)=4 is not divisible"),
    (["--pipeline-model-parallel-size", "2"], "cannot be split over 2 pipeline stages"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3"],
     "would hold no layers"),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2",
      "--decoder-last-pipeline-num-layers", "2"], "cannot be split"),
])
def test_bad_parallel_sizes(small_hf, tmp_path, capsys, flags, match):
    out = tmp_path / "out" / "meg"
    out.parent.mkdir()
    cli_fails(["hf-to-megatron", "--hf-dir", str(small_hf), "--save", str(out)] + flags,
               out, capsys, match)


def test_uneven_split_flag_makes_it_work(small_hf, tmp_path):
    assert main(["hf-to-megatron", "--hf-dir", str(small_hf), "--save", str(tmp_path / "m"),
                 "--pipeline-model-parallel-size", "2",
                 "--decoder-first-pipeline-num-layers", "1"]) == 0
    assert LegacyCheckpoint(tmp_path / "m").stage_counts == [1, 2]


def test_missing_and_truncated_inputs(small_hf, tmp_path, capsys):
    broken = tmp_path / "in" / "broken"
    shutil.copytree(small_hf, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "m"
    out.parent.mkdir()
    cli_fails(["hf-to-megatron", "--hf-dir", str(broken), "--save", str(out)], out, capsys,
               "truncated")
    shard.unlink()
    cli_fails(["hf-to-megatron", "--hf-dir", str(broken), "--save", str(out)], out, capsys,
               "missing checkpoint file")
    cli_fails(["hf-to-megatron", "--hf-dir", str(tmp_path / "nope"), "--save", str(out)], out,
               capsys, "missing")
    # Megatron side: truncated rank file, missing rank file, missing tracker
    meg = tmp_path / "in" / "meg"
    convert.hf_to_megatron(small_hf, meg, tp=2)
    rank = meg / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rank.write_bytes(rank.read_bytes()[:1000])
    cli_fails(["megatron-to-hf", "--load", str(meg), "--save", str(out)], out, capsys, "truncated")
    shutil.rmtree(rank.parent)
    cli_fails(["megatron-to-hf", "--load", str(meg), "--save", str(out)], out, capsys,
               "missing rank file")
    (meg / "latest_checkpointed_iteration.txt").unlink()
    cli_fails(["reshard", "--load", str(meg), "--save", str(out)], out, capsys,
               "latest_checkpointed_iteration.txt")


def test_non_empty_output_needs_force(small_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["hf-to-megatron", "--hf-dir", str(small_hf), "--save", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main(["hf-to-megatron", "--hf-dir", str(small_hf), "--save", str(out), "--force"]) == 0
    assert (out / "latest_checkpointed_iteration.txt").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
    ({"attention_bias": True}, "attention_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
])
def test_unsupported_configs_are_named(small_hf, tmp_path, capsys, change, match):
    bad = tmp_path / "in" / "bad"
    shutil.copytree(small_hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out" / "m"
    out.parent.mkdir()
    cli_fails(["hf-to-megatron", "--hf-dir", str(bad), "--save", str(out)], out, capsys, match)


def test_interrupt_leaves_nothing(small_hf, tmp_path, monkeypatch):
    """Ctrl-C while a rank file is half written (its writer thread busy) removes everything."""
    calls = {"n": 0}
    real = convert.layout.shard_from_hf

    def flaky(spec, get, *a, **k):
        if not isinstance(getattr(get, "__self__", None), convert._Shapes):  # real reads only
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(spec, get, *a, **k)

    monkeypatch.setattr(convert.layout, "shard_from_hf", flaky)
    assert main(["hf-to-megatron", "--hf-dir", str(small_hf), "--save", str(tmp_path / "m"),
                 "--tensor-model-parallel-size", "2"]) == 130
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_llama3_rope_scaling_and_head_dim_survive(tmp_path):
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = make_hf_llama(tmp_path / "hf", head_dim=16, rope_scaling=rope, rope_theta=500000.0,
                       tie_word_embeddings=True)
    convert.hf_to_megatron(hf, tmp_path / "m", tp=2)
    a = LegacyCheckpoint(tmp_path / "m").args
    assert a.kv_channels == 16 and a.use_rope_scaling and a.rope_scaling_factor == 32.0
    assert a.rotary_base == 500000.0
    convert.megatron_to_hf(tmp_path / "m", tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["head_dim"] == 16 and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["factor"] == 32.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "o"))


@pytest.mark.parametrize("cmd", ["hf-to-megatron", "megatron-to-hf", "reshard"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_save_streamed_is_what_torch_save_writes(tmp_path):
    """tensor_io.save_streamed: torch.load gives back every tensor (views, a 0-dim tensor, mixed
    dtypes) and the None entries, as from torch.save of the whole dict."""
    from megatron_prune.checkpoint import tensor_io
    base = torch.randn(8, 6)
    made = {"a": base[:, 2:4], "b": torch.tensor(3.5, dtype=torch.bfloat16), "c": None,
            "d": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0, 3)}
    plan = [(n, None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta"))
            for n, t in made.items()]
    tensor_io.save_streamed(tmp_path / "x.pt", {"iteration": 3}, "model", plan,
                            lambda n: made[n])
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert back["iteration"] == 3 and list(back["model"]) == list(made)
    for n, t in made.items():
        assert (back["model"][n] is None) if t is None else torch.equal(back["model"][n], t)


def test_save_streamed_surfaces_a_failed_write(tmp_path, monkeypatch):
    """An error in the writer thread is raised to the caller (which never blocks on it)."""
    from megatron_prune.checkpoint import tensor_io

    def boom(fd, t, offset):
        raise ValueError("disk on fire")

    monkeypatch.setattr(tensor_io, "_pwrite_all", boom)
    plan = [(f"t{i}", torch.empty(4, 4, device="meta")) for i in range(8)]
    with pytest.raises(ValueError, match="disk on fire"):
        tensor_io.save_streamed(tmp_path / "x.pt", {}, "model", plan, lambda n: torch.ones(4, 4))
