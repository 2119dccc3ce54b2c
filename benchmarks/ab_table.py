#!/usr/bin/env python
"""Side by side: one framework's images/s from several ``throughput.py`` runs, grouped by the
setting they were run with (an A/B of a process option, alternated between runs).

Each cell lists every run's median, then the group's median of them; the last column is the
second group over the first. On a machine whose speed drifts between runs, a lever is real
only where the groups' ranges do not overlap.

Usage: ``python benchmarks/ab_table.py --group "one device" a1.json a2.json
--group "two devices" b1.json b2.json [--phase train] [--framework pneumojax] --out FILE.md``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", nargs="+", action="append", required=True, metavar="LABEL FILE")
    p.add_argument("--phase", default="train", choices=["train", "inference", "explain"])
    p.add_argument("--framework", default="pneumojax")
    p.add_argument("--title", default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: print)")
    args = p.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            p.error(f"--group {group[0]!r} needs a label and at least one JSON file")
    return args


def rates(path: Path, phase: str, framework: str) -> dict[int, tuple[str, float]]:
    """config number -> (label, median images/s) of one run."""
    payload = json.loads(path.read_text())
    out = {}
    for entry in payload["configs"]:
        result = entry["results"].get(framework, {})
        if entry["same_step_as"] is None and phase in result:
            out[entry["number"]] = (entry["label"], result[phase]["images_per_s"])
    return out


def table(groups: list[list[str]], phase: str, framework: str) -> str:
    runs = {label: [rates(Path(f), phase, framework) for f in files] for label, *files in groups}
    labels = list(runs)
    numbers = sorted({n for rs in runs.values() for r in rs for n in r})
    header = ["config", "model", *labels]
    if len(labels) == 2:
        header.append("second / first")
    rows = []
    for n in numbers:
        model = next(r[n][0] for rs in runs.values() for r in rs if n in r)
        medians, cells = [], []
        for label in labels:
            values = [r[n][1] for r in runs[label] if n in r]
            medians.append(statistics.median(values) if values else None)
            listed = ", ".join(f"{v:.2f}" for v in values)
            cells.append(f"{listed} → **{medians[-1]:.2f}**" if values else "–")
        row = [str(n), model, *cells]
        if len(labels) == 2:
            row.append(f"{medians[1] / medians[0]:.2f}×" if None not in medians else "–")
        rows.append(row)
    return common.markdown_table(header, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = table(args.group, args.phase, args.framework)
    if args.title:
        text = f"{args.title}\n\n{text}"
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
