"""Assertions shared by the tests: exact tensor/checkpoint equality, CLI failures."""
from __future__ import annotations

import glob
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_prune.cli import main
from megatron_prune.checkpoint.tensor_io import torch_load


def hf_tensors(path) -> dict:
    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def rank_files(root) -> dict:
    """{relative path: model state dict} of every rank file of a legacy checkpoint."""
    root = Path(root)
    return {str(p.relative_to(root)): torch_load(p, mmap_=False)["model"]
            for p in sorted(root.glob("iter_*/mp_rank_*/model_optim_rng.pt"))}


def assert_same_checkpoint(a, b):
    """Two legacy checkpoints hold the same rank files with bit-identical tensors."""
    fa, fb = rank_files(a), rank_files(b)
    assert fa and sorted(fa) == sorted(fb)
    for path in fa:
        sa, sb = fa[path], fb[path]
        assert sorted(sa) == sorted(sb), path
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (path, k)
            else:
                assert sa[k] is None and sb[k] is None, (path, k)


def cli_fails(argv, out: Path, capsys, match: str):
    """The CLI exits 2 with `match` in its message and leaves out.parent as it was."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert before == after, "something was left behind"


def write_indexed_dataset(prefix: Path, docs) -> Path:
    """A megatron-core indexed dataset (PREFIX.bin/.idx) of the given token-id documents."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for ids in docs:
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(str(prefix) + ".idx")
    return prefix
