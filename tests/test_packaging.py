"""The Docker image installs what the package needs: docker/requirements.txt pins every runtime
dependency in pyproject.toml except those the NGC PyTorch container brings (a dependency added to
one file only once left the image without matplotlib, which the quickstart report imports)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FROM_CONTAINER = {"torch", "numpy"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_docker_requirements_pin_every_runtime_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (REPO / "docker/requirements.txt").read_text().splitlines()]
    pinned = {_name(ln): ln for ln in lines if ln and not ln.startswith("#")}
    missing = {_name(d) for d in deps} - FROM_CONTAINER - set(pinned)
    assert not missing, f"docker/requirements.txt lacks {sorted(missing)}"
    loose = [ln for ln in pinned.values() if "==" not in ln]
    assert not loose, f"docker/requirements.txt should pin exact versions: {loose}"
