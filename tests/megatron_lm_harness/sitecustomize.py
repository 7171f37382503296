"""One harness for running the real Megatron-LM (../shared/peers/megatron-lm, core_v0.16.1,
unmodified) on a CPU machine, in subprocesses only (tests/megatron_lm.py starts them).

Python imports `sitecustomize` at start-up from this folder, first on PYTHONPATH, in every
process of the run: the converter's own saver/loader processes and each torchrun worker alike.
`MEGATRON_LM_HARNESS` picks the patch set:

    convert   cpu_convert.py: tools/checkpoint/convert.py (its loaders and savers)
    train     cpu_train.py:   pretrain_gpt.py and mlm_logits.py (its model builder and loader)

Each set has `install()` (run now) and `PATCHES` ({module: patch}), each applied right after
its module is first imported, before an importer copies a name out of it. Every patch names the
Megatron-LM call it replaces and why; none changes a computation.
"""
import importlib
import importlib.abc
import os
import sys


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                exec_module = spec.loader.exec_module

                def patched_exec(module, _exec=exec_module, _patch=self.patches[name]):
                    _exec(module)
                    _patch(module)
                spec.loader.exec_module = patched_exec
                return spec
        return None


_MODES = {"convert": "cpu_convert", "train": "cpu_train"}
_mode = os.environ.get("MEGATRON_LM_HARNESS")
if _mode:
    _patch_set = importlib.import_module(_MODES[_mode])
    _patch_set.install()
    sys.meta_path.insert(0, _PatchAfterImport(_patch_set.PATCHES))
