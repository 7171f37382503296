"""The package's layers (docs/architecture.md), checked on the source: which folder may import which,
no import cycles (imports inside functions count), and a checkpoint layer free of megatron-core.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_prune"

# Folder -> the folders its modules may import (itself included). Top-level modules (cli) and
# entry points (any `__main__`) are "top", which may import anything.
ALLOWED = {
    "checkpoint": {"checkpoint"},
    "mcore": {"checkpoint", "mcore"},
    "data": {"checkpoint", "data"},
    "eval": {"checkpoint", "mcore", "data", "eval"},
    "prune": {"checkpoint", "mcore", "data", "prune"},
    "vocab": {"checkpoint", "data", "vocab"},
    "train": {"checkpoint", "mcore", "data", "prune", "train"},
    "commands": {"checkpoint", "mcore", "data", "eval", "prune", "vocab", "train", "commands"},
}


def modules(root: Path, package: str = PACKAGE) -> dict:
    """{dotted module name: path} of every module under root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(mod: str, path: Path, node, known: dict) -> list:
    """The project modules one import statement loads (`from pkg import mod` names the module).
    A project import that names no module (a module moved away) is returned as "?name"."""
    if isinstance(node, ast.Import):
        names = [(a.name, a.name) for a in node.names]
    else:
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [(f"{prefix}.{a.name}", prefix) for a in node.names]
    out = []
    for full, owner in names:
        if not full.startswith(PACKAGE):
            continue
        target = full if full in known else owner
        if target not in known or (target == PACKAGE and full != PACKAGE):
            out.append(f"?{full}")
        elif target != mod:
            out.append(target)
    return out


def import_graph(root: Path, package: str = PACKAGE) -> dict:
    """{module: {modules it imports}}, counting every import statement anywhere in the file."""
    known = modules(root, package)
    graph = {}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[mod] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                      for t in _targets(mod, path, node, known)}
    return graph


def folder(mod: str) -> str:
    """The folder a module belongs to; entry points (`__main__`, the CLI) are "top"."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 and parts[-1] != "__main__" else "top"


def layer_violations(graph: dict) -> list:
    bad = []
    for mod, targets in graph.items():
        allowed = ALLOWED.get(folder(mod))
        for t in sorted(t for t in targets if t[0] != "?"):
            if allowed is not None and folder(t) not in allowed and t != PACKAGE:
                bad.append(f"{mod} imports {t}: {folder(mod)}/ may import only {sorted(allowed)}")
    return bad


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w[0] == "?":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


def test_every_project_import_names_a_module():
    graph = import_graph(REPO)
    broken = sorted(f"{m} imports {t[1:]}" for m, ts in graph.items() for t in ts if t[0] == "?")
    assert not broken, "imports of modules that do not exist:\n" + "\n".join(broken)


def test_layers_import_only_below():
    assert layer_violations(import_graph(REPO)) == []


def test_every_module_is_in_a_known_folder():
    unknown = {folder(m) for m in modules(REPO)} - set(ALLOWED) - {"top"}
    assert not unknown, f"folders without import rules: {sorted(unknown)} (add them to ALLOWED)"


def _write_tree(root: Path, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    """The shape the old tree had: two checkpoint modules, one importing the other inside a
    function, and a checkpoint module importing the model layer."""
    _write_tree(tmp_path, {
        f"{PACKAGE}/__init__.py": "",
        f"{PACKAGE}/checkpoint/__init__.py": "",
        f"{PACKAGE}/checkpoint/legacy.py": "def open_():\n    from . import dist\n",
        f"{PACKAGE}/checkpoint/dist.py": f"from {PACKAGE}.checkpoint.legacy import open_\n"
                                         f"from {PACKAGE}.mcore import model\n",
        f"{PACKAGE}/mcore/__init__.py": "",
        f"{PACKAGE}/mcore/model.py": "",
    })
    graph = import_graph(tmp_path)
    assert cycles(graph) == [[f"{PACKAGE}.checkpoint.dist", f"{PACKAGE}.checkpoint.legacy"]]
    assert layer_violations(graph) == [
        f"{PACKAGE}.checkpoint.dist imports {PACKAGE}.mcore.model: checkpoint/ may import only "
        "['checkpoint']"]


def test_checkpoint_layer_loads_without_megatron_core():
    """Importing every module of checkpoint/ leaves megatron.core (and mcore/) unloaded: the
    formats are read and written without the model layer; torch_dist imports it when used."""
    mods = [m for m in modules(REPO) if folder(m) == "checkpoint"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('megatron.core', "
            f"'{PACKAGE}.mcore'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("limit", [500])
def test_no_module_over_limit(limit):
    """Outside tests/, every Python file reads at a glance: the package, bench/, scripts/..."""
    files = [p for p in REPO.rglob("*.py") if not p.relative_to(REPO).parts[0].startswith(
        ("tests", ".")) and "site-packages" not in p.parts]
    long = {str(p.relative_to(REPO)): n for p in files
            if (n := len(p.read_text().splitlines())) > limit}
    assert files and not long, f"files over {limit} lines: {long}"


def test_legacy_conversion_runs_without_megatron_core(tmp_path):
    """HF -> legacy Megatron (TP=2), reshard to TP=1·PP=2, back to HF, then prune it on the
    shards: none of it loads megatron.core or mcore/ (a user without a working megatron-core
    can still convert, reshard and export legacy checkpoints)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from hf_models import make_hf_llama
        from megatron_prune.checkpoint import convert
        from megatron_prune.prune.apply import prune_megatron
        from megatron_prune.prune.plan import PruneTarget
        t = {str(tmp_path)!r}
        make_hf_llama(t + "/hf")
        convert.hf_to_megatron(t + "/hf", t + "/tp2", tp=2)
        convert.reshard(t + "/tp2", t + "/pp2", tp=1, pp=2)
        convert.megatron_to_hf(t + "/pp2", t + "/back")
        prune_megatron(t + "/pp2", t + "/pruned", PruneTarget(ffn_hidden_size=64))
        print(sorted(m for m in sys.modules if m.startswith(("megatron.core", "{PACKAGE}.mcore"))))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "back" / "config.json").is_file()
    assert (tmp_path / "pruned" / "latest_checkpointed_iteration.txt").is_file()
