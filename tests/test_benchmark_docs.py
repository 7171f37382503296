"""docs/benchmarks.md: every verdict of a marked section quotes that section's own tables
(bench/verdicts.py states the rule)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import verdicts  # noqa: E402


def test_marked_sections_of_benchmarks_md():
    checked, errors = verdicts.check_markdown((ROOT / "docs" / "benchmarks.md").read_text())
    assert errors == []
    assert "The full protocol with Muon (the default now)" in checked
    assert any(h.startswith("The full protocol (AdamW, 10% LM loss") for h in checked)
    assert any(h.startswith("Where the WikiText-2 numbers come from") for h in checked)


SECTION = """<!-- verdicts quote the tables -->

| model | tokens | ppl |
|---|---|---|
| teacher | 60.4 M | **34.30** |
| student | 10.06 M | 34.05 |
| random init | 10.06 M | 47.93 |
| pruned | | 3630 |
| pruned (activation) | | 311.5 |

| goal | measured | met |
|---|---|---|
| close | {} | yes |
"""


@pytest.mark.parametrize("measured, error", [
    ("34.05 vs 34.30: −0.7%", None),
    ("34.05 vs 47.93: 29% below", None),
    ("3630 vs 311.5: 11.7×", None),
    ("10.06 M vs 60.4 M: 1/6.00", None),
    ("LM 34.05 vs 34.30; KD 47.93 vs 34.30", None),
    ("38.98 vs 69.09: 44% below", "quotes 38.98"),      # another run's numbers
    ("34.1 vs 34.30: −0.6%", "quotes 34.1"),            # a rounding the table does not show
    ("34.05 vs 34.30: −1.7%", "does not follow"),
    ("34.05 vs 47.93: 39% below", "does not follow"),
    ("3630 vs 311.5: 1.17×", "does not follow"),
    ("34.05 vs 34.30 (+5.7%)", "quotes 5.7"),           # a derived number in no checked form
])
def test_the_rule(measured, error):
    errors = verdicts.check_section(SECTION.format(measured).splitlines(), "s")
    if error is None:
        assert errors == []
    else:
        assert errors and error in errors[0], errors
