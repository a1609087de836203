"""Fault-injection tests: each is marked `@pytest.mark.fault(name, expect=..., lost=...)`;
`lost` says what the user lost when the fault happened as the test makes it ("none" unless
given; a test asserts it).

With VITMPP_RELIABILITY_REPORT=docs/reliability.md set, the session writes a table of
every fault tried, how many times, and the outcome the run actually had (from the
test results, not by hand):

    VITMPP_RELIABILITY_REPORT=docs/reliability.md python -m pytest tests/reliability tests/distributed
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import pytest

_RESULTS: dict[str, dict] = defaultdict(
    lambda: {"tries": 0, "passed": 0, "expect": "", "lost": "none", "tests": set(), "seconds": 0.0}
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or report.when != "call":
        return
    row = _RESULTS[marker.args[0]]
    row["expect"] = marker.kwargs.get("expect", "survived")
    row["lost"] = marker.kwargs.get("lost", "none")
    row["tries"] += 1
    row["passed"] += int(report.passed)
    row["tests"].add(item.originalname or item.name)
    row["seconds"] += report.duration


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("VITMPP_RELIABILITY_REPORT")
    if not target or not _RESULTS:
        return
    lines = [
        "# Reliability: faults tried and what happened",
        "",
        "Written by the fault-injection tests in `tests/reliability/` (real commands in subprocesses, real files, "
        "tiny models on the CPU), not by hand. Regenerate with",
        "`VITMPP_RELIABILITY_REPORT=docs/reliability.md python -m pytest tests/reliability tests/distributed`.",
        "",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}.",
        "",
        "| fault | tries | expected outcome | outcome | time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in sorted(_RESULTS.items()):
        if row["passed"] == row["tries"]:
            outcome = row["expect"]
        else:
            outcome = f"**FAILED** in {row['tries'] - row['passed']} of {row['tries']}"
        lines.append(f"| {name} | {row['tries']} | {row['expect']} | {outcome} | {row['seconds']:.0f} |")
    lines += [
        "",
        "*survived*: the run finished with the same numbers as an uninterrupted one, or continued with the "
        "damage counted. *clear error*: it stopped with a one-sentence message naming the cause and a non-zero "
        "exit code, and nothing the user had was lost.",
        "",
    ]
    lines += [
        "## What each fault cost the user",
        "",
        "Every fault above, with the outcome the tests saw and the data it lost (declared by each test's `lost=` and "
        "asserted by it: files compared, runs resumed to the same numbers). The goal is *none* everywhere; a stop "
        "that loses work names exactly what.",
        "",
        "| fault | outcome | data lost |",
        "|---|---|---|",
    ]
    for name, row in sorted(_RESULTS.items()):
        outcome = row["expect"] if row["passed"] == row["tries"] else "**FAILED**"
        lines.append(f"| {name} | {outcome} | {row['lost']} |")
    lines.append("")
    Path(target).write_text("\n".join(lines))
