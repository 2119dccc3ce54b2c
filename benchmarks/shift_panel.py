#!/usr/bin/env python
"""How runs hold up when the test images are acquired differently: a proxy for images from
outside the training folder, made from a run's own test split.

Each *shift* rewrites every test image of the first run's ``splits.json`` once (PIL, saved as
JPEG quality 95 in ``NORMAL/ PNEUMONIA/``): darker or brighter exposure (gamma), lower contrast,
the patient smaller in the frame (a border added, as a wider collimation), a slight rotation.
Every run is then scored on every shifted folder with ``pneumojax evaluate --split all`` at
**its own validation-chosen threshold** (nothing is re-tuned on the shifted images), and the
table gives AUC, recall and specificity per run and shift, beside the unshifted test.

The shifts are guesses at what differs between hospitals or years, not the official test
split's real difference, which no folder here shows. The runs must share one test split.

Usage: ``python benchmarks/shift_panel.py RUN... --out benchmarks/results/shift-panel.json``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SHIFTS = {
    "none": lambda im: im,
    "darker (gamma 1.5)": lambda im: _gamma(im, 1.5),
    "brighter (gamma 0.67)": lambda im: _gamma(im, 1 / 1.5),
    "lower contrast (x0.7)": lambda im: _contrast(im, 0.7),
    "zoomed out (15% border)": lambda im: _border(im, 0.15),
    "rotated 7 degrees": lambda im: im.rotate(7, resample=Image.BILINEAR, fillcolor=0),
}


def _gamma(im: Image.Image, g: float) -> Image.Image:
    x = np.asarray(im, np.float32) / 255.0
    return Image.fromarray(np.round(255.0 * x**g).astype(np.uint8))


def _contrast(im: Image.Image, factor: float) -> Image.Image:
    x = np.asarray(im, np.float32)
    y = x.mean() + factor * (x - x.mean())
    return Image.fromarray(np.clip(np.round(y), 0, 255).astype(np.uint8))


def _border(im: Image.Image, fraction: float) -> Image.Image:
    w, h = im.size
    small = im.resize((round(w * (1 - 2 * fraction)), round(h * (1 - 2 * fraction))), Image.LANCZOS)
    canvas = Image.new(im.mode, (w, h), 0)
    canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
    return canvas


def write_shifted(run: Path, folder: Path) -> dict[str, Path]:
    """Every shift of the run's test images, one folder each; returns shift name -> folder."""
    splits = json.loads((run / "splits.json").read_text())
    root = Path(splits["root"])
    out = {}
    for i, (name, shift) in enumerate(SHIFTS.items()):
        target = folder / f"shift{i}"
        for rel, label in splits["test"]:
            dest = target / ("PNEUMONIA" if label else "NORMAL") / Path(rel).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(root / rel) as im:
                shift(ImageOps.grayscale(im)).save(dest.with_suffix(".jpeg"), quality=95)
        out[name] = target
    return out


def score(run: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pneumojax.cli", "evaluate", "--run", str(run), "--data"]
    cmd += [str(data), "--split", "all", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="JSON (the .md beside it)")
    args = p.parse_args(argv)
    tests = {json.dumps(json.loads((r / "splits.json").read_text())["test"]) for r in args.runs}
    if len(tests) != 1:
        print("the runs do not share one test split", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_shifted(args.runs[0], Path(tmp))
        for run in args.runs:
            for shift, folder in folders.items():
                m = score(run, folder, Path(tmp) / "eval" / run.name / folder.name / "m.json")
                results.setdefault(run.name, {})[shift] = {
                    k: m[k] for k in ("auc", "recall", "specificity", "threshold", "n")
                } | {"ci95": {k: m["ci95"][k] for k in ("auc", "recall", "specificity")}}
                print(f"{run.name} / {shift}: AUC {m['auc']:.3f} recall {m['recall']:.3f} "
                      f"specificity {m['specificity']:.3f}", flush=True)  # fmt: skip
    payload = {"runs": [str(r) for r in args.runs], "shifts": list(SHIFTS), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    shifts = payload["shifts"]
    lines = [
        "# Shift panel: each run at its own validation threshold on shifted test images",
        "",
        "Cells: AUC / recall / specificity.",
        "",
        "| run | " + " | ".join(shifts) + " |",
        "|---|" + "---|" * len(shifts),
    ]
    for run, by_shift in payload["results"].items():
        cells = [
            f"{r['auc']:.3f} / {r['recall']:.3f} / {r['specificity']:.3f}"
            for r in (by_shift[s] for s in shifts)
        ]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
