"""Render a results JSON of `python -m vitmpp.benchmarks` as a Markdown table (for docs/benchmarks.md).

python -m vitmpp.benchmarks.report benchmarks/results-cpu.json
"""

from __future__ import annotations

import json
import sys

from .harness import Row


def markdown(record: dict) -> str:
    lines = [
        f"Measured {record['date']} on {record['device_name']}, torch {record['torch']}, "
        f"{record['threads']} torch threads for the model rows.",
        "",
        "| group | row | value | sizes, spread, goal |",
        "| --- | --- | ---: | --- |",
    ]
    for data in record["rows"]:
        row = Row(**{k: data[k] for k in ("section", "name", "value", "unit", "note")})
        if row.value is None:
            value = "n/a"
        elif abs(row.value) >= 100:
            value = f"{row.value:,.0f} {row.unit}"
        else:
            value = f"{row.value:.3g} {row.unit}"
        note = row.note.replace("|", "/")
        lines.append(f"| {row.section} | {row.name} | {value} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m vitmpp.benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(markdown(json.load(f)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
