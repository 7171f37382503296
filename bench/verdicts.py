"""Verdicts that quote their own tables: the rule `bench/prune_recover.py`'s reports and the marked
sections of docs/benchmarks.md follow, and its checker.

A results section holds markdown tables. Its verdict table is the one whose first header cell
starts with "goal"; the others are its results tables. In each verdict row, the second cell
("measured") may hold two kinds of number:

- a quoted value: it must appear, digit for digit, among the numbers of the section's results
  tables (a verdict cannot quote a number of another run, or a rounding the table does not show);
- a derived value, only in one of these forms, checked against the two quoted values before it
  (within the rounding of all three):

      A vs B: R×          R = A / B
      A vs B: ±P%         P = 100 (A / B - 1)
      A vs B: P% below    P = 100 (1 - A / B)
      A vs B: 1/N         N = B / A

  (A and B may carry a unit, e.g. "10.06 M vs 60.4 M: 1/6.00".)

In docs/benchmarks.md a section opts in with the line `<!-- verdicts quote the tables -->`;
`check_markdown` checks each such section and returns what breaks the rule.
"""
from __future__ import annotations

import itertools
import re
from typing import List

MARKER = "<!-- verdicts quote the tables -->"
NUMBER = r"\d+(?:\.\d+)?"
_DERIVED = re.compile(
    rf"(?P<a>{NUMBER})(?: M)? vs (?P<b>{NUMBER})(?: M)?: "
    rf"(?:(?P<ratio>{NUMBER})×|(?P<sign>[+−-])?(?P<pct>{NUMBER})%(?P<below> below)?"
    rf"|1/(?P<inv>{NUMBER}))")


def numbers(text: str) -> List[str]:
    return re.findall(NUMBER, text)


def _half_unit(number: str) -> float:
    """Half a unit of the last digit written: the rounding a printed number may hide."""
    decimals = len(number.split(".")[1]) if "." in number else 0
    return 0.5 * 10 ** -decimals


def _derived_ok(m: re.Match) -> bool:
    a, b = float(m["a"]), float(m["b"])
    if m["ratio"]:
        f, shown = (lambda x, y: x / y), m["ratio"]
    elif m["inv"]:
        f, shown = (lambda x, y: y / x), m["inv"]
    elif m["below"]:
        f, shown = (lambda x, y: 100 * (1 - x / y)), m["pct"]
    else:
        f, shown = (lambda x, y: 100 * (x / y - 1)), m["pct"]
    value = float(shown) * (-1 if m["sign"] in ("−", "-") else 1)
    ha, hb, hd = _half_unit(m["a"]), _half_unit(m["b"]), _half_unit(shown)
    corners = [f(x, y) for x, y in itertools.product((a - ha, a + ha), (b - hb, b + hb))]
    return min(corners) - hd <= value <= max(corners) + hd  # f is monotonic in each argument


def table_rows(lines: List[str]) -> List[List[List[str]]]:
    """The markdown tables of `lines`: [table][row][cell], header included, rule row left out."""
    tables, current = [], None
    for line in lines:
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


def check_section(lines: List[str], name: str = "") -> List[str]:
    """What breaks the rule in one section: [] if its verdicts quote its tables."""
    tables = table_rows(lines)
    verdicts = [t for t in tables if t[0][0].lower().startswith("goal")]
    results = [t for t in tables if not t[0][0].lower().startswith("goal")]
    if not verdicts or not results:
        return [f"{name}: needs a results table and a goal table"]
    held = {n for t in results for row in t[1:] for cell in row for n in numbers(cell)}
    errors = []
    for row in (r for t in verdicts for r in t[1:]):
        cell = row[1]
        for m in _DERIVED.finditer(cell):
            if not _derived_ok(m):
                errors.append(f"{name}: {m[0]!r} does not follow from its two numbers")
        quoted = _DERIVED.sub(lambda m: f"{m['a']} vs {m['b']}", cell)
        errors += [f"{name}: {row[0]!r} quotes {n}, which no table of the section holds"
                   for n in numbers(quoted) if n not in held]
    return errors


def sections(text: str) -> List[tuple]:
    """(heading, lines) of each markdown section (split at every heading line)."""
    out, heading, body, fenced = [], "", [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            out.append((heading, body))
            heading, body = line.lstrip("# "), []
        else:
            body.append(line)
    out.append((heading, body))
    return out


def check_markdown(text: str) -> tuple:
    """(names of the sections that carry `MARKER`, what breaks the rule in them)."""
    checked, errors = [], []
    for heading, lines in sections(text):
        if MARKER in lines:
            checked.append(heading)
            errors += check_section(lines, heading)
    return checked, errors
