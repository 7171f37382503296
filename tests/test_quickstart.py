"""The README's main job, end to end (about 5 minutes on 2 CPU cores): `python -m pytest -m slow`."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), str(out)],
                       capture_output=True, text=True, env=dict(os.environ, MASTER_PORT="29561"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "report.md").is_file() and (out / "loss_curves.png").stat().st_size > 10_000
    ppl = {k: json.loads((out / f"eval_{k}.json").read_text())[0]["value"]
           for k in ("teacher", "pruned", "recovered", "scratch")}
    # recovery brings the pruned model most of the way back, far ahead of random init
    assert ppl["teacher"] < ppl["recovered"] < ppl["pruned"]
    assert ppl["recovered"] < 0.5 * ppl["scratch"]
