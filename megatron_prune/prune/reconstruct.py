"""Least-squares reconstruction of the output projections after heads or FFN neurons go.

Pruning FFN neurons removes inputs of down_proj; pruning heads removes inputs of o_proj. Copying
the kept columns drops the removed inputs' contribution to the residual stream. With the Gram
matrix C = sum over calibration tokens of x x^T of that projection's input in the unpruned model,
the kept columns K can instead be refitted to reproduce the full projection on those tokens:

    W' = argmin sum ||W x - W'_K x_K||^2 = W C[:, K] (C[K, K] + ridge * mean(diag C[K, K]) I)^-1

(W's rows restricted to the kept hidden channels). Measured on SmolLM2-135M
(docs/benchmarks.md, "Beside the peers"), this is what takes width pruning from unusable to
merely damaged zero-shot. The Grams come from one forward pass of the unpruned model over the
calibration rows `importance` stores in the scores file (meta["fit_rows"], scored sequences, not
the held-out ones `auto` judges its choices on). A writer at TP > 1 fits each tensor once per
rank file that holds a slice of it (the fit is a small solve beside reading the weights).

Memory: `fit` streams the source one decoder layer at a time (prune/stream.py: the rows' hidden
states, rows x seq x hidden in fp32, pass through each layer in turn), so no whole model is
built; each Gram (one FFN x FFN and one (heads * head_dim)^2 fp32 matrix per layer, 17.6 GB
over a 7B model) is written to a temporary file as soon as its layer is done and read back
memory-mapped, so the kernel pages them in and out as the writer asks for them.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron_prune.prune.stream import LayerStream

# plan/layout key -> the HF module whose input is pruned
PROJECTIONS = {"proj": "self_attn.o_proj", "fc2": "mlp.down_proj"}
FIT_ROWS = 64     # calibration sequences `importance` keeps for the fit
RIDGE = 1e-2      # relative to the mean diagonal of C[K, K]: the fit stays well posed when the
                  # kept inputs are nearly collinear or outnumber the calibration tokens


@dataclass
class Reconstruction:
    grams: dict                     # (key, source layer) -> C, fp32 [in, in]
    tokens: int
    ridge: float = RIDGE
    store: Optional[object] = field(default=None, repr=False, compare=False)  # the grams' files

    def record(self) -> dict:
        return {"tokens": self.tokens, "ridge": self.ridge}

    def weight(self, key: str, src_layer: int, w: torch.Tensor, rows, cols) -> torch.Tensor:
        """The pruned projection: `w` (the source's full weight) refitted on the kept columns
        `cols`, restricted to `rows` (None: all). Kept-all columns need no fit: plain copy."""
        sel = w if rows is None else w.index_select(0, rows)
        if len(cols) == w.shape[1]:
            return sel.index_select(1, cols)
        return self._fit(self.grams[key, src_layer], sel, cols).to(w.dtype)

    def _fit(self, gram: torch.Tensor, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        c = gram.double()
        ck = c.index_select(0, cols).index_select(1, cols)
        ck.diagonal().add_(self.ridge * ck.diagonal().mean().clamp_min(1e-12))
        rhs = c.index_select(0, cols) @ w.double().T          # C[K, :] W^T
        return torch.linalg.solve(ck, rhs).T                  # (C[K,K] + r I)^-1 C[K,:] W^T


def fit(source, rows: torch.Tensor, micro_batch: int = 4, progress: bool = True) -> Reconstruction:
    """The input Grams of every layer's o_proj and down_proj over `rows` (token ids), measured on
    the unpruned `source` (any checkpoint source) one decoder layer at a time."""
    store = _GramStore()

    def measure(layer: int, block: torch.nn.Module):
        grams = {}
        hooks = [block.get_submodule(path).register_forward_pre_hook(_accumulate(grams, key))
                 for key, path in PROJECTIONS.items()]

        def done():
            for h in hooks:
                h.remove()
            for key, g in grams.items():
                store.put((key, layer), g)
        return done

    LayerStream(source, rows, micro_batch).run("reconstruction: Grams", progress, measure)
    return Reconstruction(store.grams, tokens=rows.numel(), store=store)


def _accumulate(grams: dict, key: str):
    def hook(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        grams[key] = x.T @ x if key not in grams else grams[key] + x.T @ x
    return hook


class _GramStore:
    """Grams on disk (a temporary directory removed with the store), read back memory-mapped."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="megatron_prune_grams_"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.grams = {}

    def put(self, key: tuple, gram: torch.Tensor) -> None:
        f = self.dir / f"{key[0]}_{key[1]}.pt"
        torch.save(gram.contiguous(), f)
        self.grams[key] = torch.load(f, mmap=True, weights_only=True)


def fit_rows(scores) -> Optional[torch.Tensor]:
    rows = scores.meta.get("fit_rows")
    return None if rows is None else torch.as_tensor(rows).long()
