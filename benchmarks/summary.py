"""The committed benchmark records as one Markdown table (what the README's "Measured" section shows).

.venv/bin/python benchmarks/summary.py     # reads benchmarks/results/*.json
"""

import json
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "results"


def rows(record: dict) -> list[str]:
    when = f"{record['date'][:10]}, `{record['git_commit'][:7]}`"
    return [
        f"| {record['benchmark']} | {target} | {'met' if ok else '**missed**'} | {when} |"
        for target, ok in record["targets_met"].items()
    ]


def main() -> int:
    paths = sorted(RECORDS.glob("*.json"))
    if not paths:
        print(f"no records in {RECORDS}: run a benchmark first", file=sys.stderr)
        return 1
    print("| benchmark | target | verdict | measured |\n|---|---|---|---|")
    for path in paths:
        print("\n".join(rows(json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
