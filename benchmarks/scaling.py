#!/usr/bin/env python
"""How cost grows with batch size and image size: pneumojax against Keras 3 on TensorFlow.

For DenseNet121 and InceptionV3 head-only (the study's configurations 2 and 3) this runs
``throughput.py``'s suite once per point — batch 8, 16, 32, 64 at 256 px and 128, 256, 384 px at
batch 32 — with the same workers (each framework in its own process, the same randomized
weights, the same batch), and writes one table and one plot of training and inference images/s,
compile time (the first call) and peak RSS.

Usage: ``python benchmarks/scaling.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import throughput  # noqa: E402

FULL = {"batches": [8, 16, 32, 64], "sizes": [128, 256, 384], "base": (32, 256), "steps": 3}
QUICK = {"batches": [2, 4], "sizes": [75, 96], "base": (4, 96), "steps": 1}
CONFIGS = (2, 3)
FRAMEWORKS = ("pneumojax", "keras-tf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size: tiny batches and images")
    p.add_argument("--out", type=Path, default=None, help="JSON (the .md and .png beside it)")
    p.add_argument("--configs", type=int, nargs="+", default=list(CONFIGS))
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    args = p.parse_args(argv)
    if args.out is None:
        name = "scaling-quick.json" if args.quick else "scaling-cpu.json"
        args.out = Path(__file__).resolve().parent / "results" / name
    return args


def points(plan: dict) -> list[tuple[int, int]]:
    """(batch, image size) pairs: the batch sweep at the base size, the size sweep at the
    base batch (the base point once)."""
    batch, size = plan["base"]
    out = [(b, size) for b in plan["batches"]]
    return out + [(batch, s) for s in plan["sizes"] if (batch, s) not in out]


def measure(args) -> dict:
    plan = QUICK if args.quick else FULL
    load_before = list(os.getloadavg())
    rows = []
    for batch, size in points(plan):
        print(f"== batch {batch}, {size} px", flush=True)
        suite = throughput.parse_args(
            [
                "--configs",
                *map(str, args.configs),
                "--frameworks",
                *args.frameworks,
                "--batch-size",
                str(batch),
                "--image-size",
                str(size),
                "--steps",
                str(plan["steps"]),
                "--warmup",
                "1",
            ]
        )
        payload = throughput.run_suite(suite)
        for entry in payload["configs"]:
            for fw, r in entry["results"].items():
                row = {"config": entry["number"], "model": entry["label"], "framework": fw}
                row.update(batch=batch, image_size=size)
                if "train" in r:
                    row.update(
                        train_ips=r["train"]["images_per_s"],
                        inference_ips=r["inference"]["images_per_s"],
                        first_train_s=r["train"]["first_call_s"],
                        peak_rss_mb=r["peak_rss_mb"],
                    )
                else:
                    row["error"] = r.get("error") or r.get("skipped")
                rows.append(row)
    return {
        "benchmark": "scaling",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": plan,
        "hardware": {**common.hardware(), "load_average_before": load_before},
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
    }


def _cell(rows, fw, key):
    r = rows.get(fw)
    return "–" if r is None or key not in r else f"{r[key]:.2f}"


def render_markdown(payload: dict) -> str:
    hw = payload["hardware"]
    lines = [
        "## Scaling: images/s against batch size and image size (float32, head-only)",
        "",
        f"CPU: {hw.get('cpu', '?')}; load average before {hw['load_average_before'][0]:.2f}, "
        f"after {payload['load_average_after'][0]:.2f}. {payload['plan']['steps']} timed calls "
        "after one warm-up per point; each framework in its own process (throughput.py's "
        "workers). Ratios above 1 mean pneumojax is faster.",
        "",
        "| model | batch | px | train img/s pneumojax / Keras-TF | ratio | inference img/s "
        "pneumojax / Keras-TF | ratio | first train step s pneumojax / Keras-TF | peak RSS MB "
        "pneumojax / Keras-TF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_point: dict[tuple, dict] = {}
    for r in payload["rows"]:
        by_point.setdefault((r["config"], r["model"], r["batch"], r["image_size"]), {})[
            r["framework"]
        ] = r
    for (_, model, batch, size), rows in sorted(by_point.items()):
        cells = []
        for key in ("train_ips", "inference_ips"):
            cells.append(f"{_cell(rows, 'pneumojax', key)} / {_cell(rows, 'keras-tf', key)}")
            try:
                cells.append(f"{rows['pneumojax'][key] / rows['keras-tf'][key]:.2f}×")
            except (KeyError, ZeroDivisionError):
                cells.append("–")
        for key in ("first_train_s", "peak_rss_mb"):
            cells.append(f"{_cell(rows, 'pneumojax', key)} / {_cell(rows, 'keras-tf', key)}")
        lines.append(f"| {model} | {batch} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(payload: dict, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    batch0, size0 = payload["plan"]["base"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    models = sorted({(r["config"], r["model"]) for r in payload["rows"]})
    for config, model in models:
        for fw, style in (("pneumojax", "-o"), ("keras-tf", "--s")):
            mine = [r for r in payload["rows"] if r["config"] == config and r["framework"] == fw]
            for ax, key, fixed, x in (
                (axes[0], "batch", ("image_size", size0), "batch"),
                (axes[1], "image_size", ("batch", batch0), "image_size"),
            ):
                pts = sorted(
                    (r[x], r["train_ips"])
                    for r in mine
                    if r[fixed[0]] == fixed[1] and "train_ips" in r
                )
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{model.split(',')[0]} {fw}")
    axes[0].set(xlabel=f"batch size ({size0} px)", ylabel="training images/s", xscale="log")
    axes[1].set(
        xlabel=f"image size, px (batch {batch0})", ylabel="training images/s (log)", yscale="log"
    )
    for ax, key in ((axes[0], "batches"), (axes[1], "sizes")):
        ticks = payload["plan"][key]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = measure(args)
    markdown = render_markdown(payload)
    md = common.write_outputs(args.out, payload, markdown)
    png = plot(payload, args.out.with_suffix(".png"))
    print(markdown)
    print(f"\nwrote {args.out}, {md} and {png}")
    return 1 if any("error" in r for r in payload["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
