"""A pytest plugin (``-p fault_report``, as ``scripts/run_faults.sh`` loads it) that prints the
fault scenarios' table at the end: scenario, expected outcome, what happened, and the test's
outcome (a row whose test failed says so, whatever it recorded)."""

from __future__ import annotations

import textwrap

import pytest

# Where tests/conftest.py's ``fault_row`` fixture keeps the rows.
FAULT_ROWS = pytest.StashKey[list]()

WIDTHS = (34, 44, 52, 6)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[report.nodeid] = report.outcome


_OUTCOMES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(FAULT_ROWS, [])
    if not rows:
        return
    write = terminalreporter.write_line
    write("")
    write("Fault scenarios")
    header = ("scenario", "expected", "what happened", "test")
    write(" | ".join(h.ljust(w) for h, w in zip(header, WIDTHS, strict=True)))
    write("-+-".join("-" * w for w in WIDTHS))
    for row in rows:
        outcome = _OUTCOMES.get(row["test"], "?")
        happened = row["happened"] or "(not reached: the test failed first)"
        cells = [
            textwrap.wrap(text, width) or [""]
            for text, width in zip(
                (row["scenario"], row["expected"], happened, outcome), WIDTHS, strict=True
            )
        ]
        for i in range(max(len(c) for c in cells)):
            write(
                " | ".join(
                    (c[i] if i < len(c) else "").ljust(w)
                    for c, w in zip(cells, WIDTHS, strict=True)
                )
            )
        write("-+-".join("-" * w for w in WIDTHS))
