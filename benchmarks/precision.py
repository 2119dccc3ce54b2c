#!/usr/bin/env python
"""bfloat16 against float32 on real images: backbone activations and complete runs.

Two measurements, each on real chest X-rays (``--data``, Kaggle ``train/val/test`` or flat
``NORMAL/ PNEUMONIA/``):

* **Activations.** For each backbone of ``--activation-backbones`` at Keras's random init
  (``init_variables``, as ``--weights none``), the outputs at the cut layer and at the final
  layer for ``--activation-images`` test-split images, computed once in float32 and once in
  bfloat16 (``backbone_model(..., dtype=bfloat16)``, float32 parameters). Reported:
  max |difference| / max |float32| (what the unit test checks on synthetic images) and
  mean |difference| / mean |float32|, over all images and their distribution per image, next
  to what one bfloat16 rounding of the float32 output alone costs.
* **Complete runs.** ``pneumojax.run.train_run`` (the CLI's path) four times, the same
  seed and splits: float32; bfloat16; float32 compute with ``--feature-cache-dtype bfloat16``;
  bfloat16 without the feature cache. Test figures with their 95% bootstrap intervals, whether
  each lies inside the float32 run's interval, how far the per-image test probabilities move,
  and the wall time of each run.

Every measurement runs in its own subprocess (``--in-process`` runs them in this one, for
tests); all share one fresh ``PNEUMOJAX_CACHE`` folder, so decoded images are made once per
invocation and nothing comes from an earlier one.

Usage: ``python benchmarks/precision.py [--data DIR] [--image-size 128] [--epochs 10]
[--out FILE.json]``.

One file on purpose, though longer than the library's modules: a benchmark is run as a script
and read top to bottom (parent, workers, tables), and nothing else imports it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_DATA = common.REPO.parent / "shared" / "data" / "chest_xray_mini"
# name: (title, --precision, feature cache on, --feature-cache-dtype)
VARIANTS = {
    "float32": ("float32", "float32", True, "auto"),
    "bfloat16": ("bfloat16", "bfloat16", True, "auto"),
    "float32-bf16-cache": ("float32, bfloat16 cache", "float32", True, "bfloat16"),
    "bfloat16-uncached": ("bfloat16, no cache", "bfloat16", False, "auto"),
}
REFERENCE = "float32"
# Claim 3 compares these two: the same bfloat16 model with and without the activation cache.
CACHE_PAIR = ("bfloat16", "bfloat16-uncached")
FIGURES = ("auc", "recall", "specificity", "accuracy", "precision", "f1")
INSIDE_FIGURES = ("auc", "recall", "specificity", "accuracy")
BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: one rounding is at most 2**-9 relative
BUSY_LOAD = 0.5


# --- the parent ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="data folder (Kaggle train/val/test or flat NORMAL/PNEUMONIA); default %(default)s",
    )
    p.add_argument("--backbone", default="densenet121", help="backbone of the complete runs")
    p.add_argument("--cut", default=None, help="cut layer of the runs (default: the backbone's)")
    p.add_argument(
        "--activation-backbones",
        nargs="*",
        default=["densenet121", "inception_v3"],
        help="backbones whose activations are compared (none: skip)",
    )
    p.add_argument(
        "--activation-cut",
        default=None,
        help="cut layer for the activations (default: each backbone's)",
    )
    p.add_argument(
        "--activation-images",
        type=int,
        default=120,
        help="test images whose activations are compared (at most the split)",
    )
    p.add_argument("--activation-batch", type=int, default=16)
    p.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="complete runs to make (none: skip)",
    )
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=0, help="early stopping; 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-recall", type=float, default=0.98)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="carved from a flat folder; a Kaggle folder keeps its own test/",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=SCRIPT.parent / "results" / "precision.json",
        help="JSON output (the markdown goes beside it, same stem, .md)",
    )
    p.add_argument(
        "--keep-workdir",
        type=Path,
        default=None,
        help="keep run folders, logs and the cache here instead of a temp folder",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every measurement in this process (for tests: faster, but the runs "
        "then share JAX's compile caches and the wall times mean less)",
    )
    p.add_argument(
        "--rerender",
        type=Path,
        default=None,
        metavar="FILE.json",
        help="measure nothing: recompute the comparisons of an earlier JSON and "
        "rewrite it and its markdown",
    )
    p.add_argument("--worker-timeout", type=float, default=3 * 3600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if REFERENCE not in args.variants and args.variants:
        args.variants = [REFERENCE, *args.variants]  # every comparison is against float32
    return args


def base_job(args, workdir: Path) -> dict:
    return {
        "data": str(Path(args.data).resolve()),
        "backbone": args.backbone,
        "cut": args.cut,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "patience": args.patience,
        "seed": args.seed,
        "target_recall": args.target_recall,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "activation_cut": args.activation_cut,
        "activation_images": args.activation_images,
        "activation_batch": args.activation_batch,
        "workdir": str(workdir),
    }


def run_job(job: dict, workdir: Path, in_process: bool, timeout: float) -> dict:
    """One measurement: in a fresh interpreter (``common.run_worker``) or, for tests, here."""
    env = {"PNEUMOJAX_CACHE": job["cache"]}
    if not in_process:
        return common.run_worker(SCRIPT, job, workdir, env=env, timeout=timeout)
    before = os.environ.get("PNEUMOJAX_CACHE")
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        result = ROLES[job["role"]](job)
    except Exception as e:  # noqa: BLE001 - reported like a failed worker
        return {"error": f"{type(e).__name__}: {e}", "log_tail": ""}
    finally:
        if before is None:
            os.environ.pop("PNEUMOJAX_CACHE", None)
        else:
            os.environ["PNEUMOJAX_CACHE"] = before
    return {
        **result,
        "process_wall_s": round(time.perf_counter() - t0, 2),
        "versions": common.versions(),
    }


def run_suite(args, workdir: Path) -> dict:
    """Activations per backbone, then the complete runs, each as its own job."""
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())
    job = {**base_job(args, workdir), "cache": str(workdir / "cache")}
    loads = [load_before[0]]
    activations = {}
    for name in args.activation_backbones:
        print(f"activations {name}: float32 and bfloat16 ...", flush=True)
        activations[name] = run_job(
            {
                **job,
                "name": f"activations-{name}",
                "role": "activations",
                "backbone": name,
                "cut": args.activation_cut,
            },
            workdir,
            args.in_process,
            args.worker_timeout,
        )
        loads.append(os.getloadavg()[0])
        print("  " + activation_line(activations[name]), flush=True)
    runs = {}
    for variant in args.variants:
        print(f"run {variant} ...", flush=True)
        runs[variant] = run_job(
            {**job, "name": f"run-{variant}", "role": "run", "variant": variant},
            workdir,
            args.in_process,
            args.worker_timeout,
        )
        loads.append(os.getloadavg()[0])
        print("  " + run_line(runs[variant]), flush=True)
    return assemble(args, activations, runs, time.perf_counter() - t0, load_before, loads)


def activation_line(result: dict) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}\n{result.get('log_tail', '')}"
    return "; ".join(
        f"{key} {layer}: max|d|/max|ref| {s['rel_max']:.4f}, mean|d|/mean|ref| {s['rel_mean']:.4f}"
        for key in ("layers", "layers_random_stats")
        for layer, s in result[key].items()
    )


def run_line(result: dict) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}\n{result.get('log_tail', '')}"
    m = result["metrics"]
    return (
        f"auc {m['auc']:.3f}, recall {m['recall']:.3f}, specificity {m['specificity']:.3f}, "
        f"threshold {m['threshold']:.4f}, {result['seconds']['total']:.1f} s"
    )


def inside(value, interval) -> bool | None:
    if value is None or not interval or None in interval:
        return None
    return bool(interval[0] <= value <= interval[1])


def probability_shift(a: list[float], b: list[float]) -> dict:
    """How far per-image test probabilities moved between two runs."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


def history_shift(a: list[dict], b: list[dict]) -> dict:
    """Largest relative difference of the per-epoch losses between two runs."""
    out = {}
    for key in ("loss", "val_loss"):
        x = np.array([r[key] for r in a if key in r], np.float64)
        y = np.array([r[key] for r in b if key in r], np.float64)
        n = min(len(x), len(y))
        out[f"{key}_max_rel"] = float(np.max(np.abs(x[:n] - y[:n]) / np.abs(x[:n]))) if n else None
    return out


def compare_runs(runs: dict) -> dict:
    """Each run against float32 (inside its intervals, probability shift) and the cached and
    uncached bfloat16 runs against each other."""
    ok = {v: r for v, r in runs.items() if "metrics" in r}
    out: dict = {"vs_float32": {}, "cache_pair": None}
    ref = ok.get(REFERENCE)
    if ref is None:
        return out
    ci = ref["metrics"]["ci95"]
    for variant, r in ok.items():
        if variant == REFERENCE:
            continue
        m = r["metrics"]
        out["vs_float32"][variant] = {
            "inside_float32_ci95": {f: inside(m.get(f), ci.get(f)) for f in INSIDE_FIGURES},
            "confusion_inside_float32_ci95": confusion_inside(m, ref["metrics"]),
            "same_confusion_matrix": m["confusion_matrix"] == ref["metrics"]["confusion_matrix"],
            "auc_diff": abs(m["auc"] - ref["metrics"]["auc"]),
            "probabilities": probability_shift(r["test_p"], ref["test_p"]),
            "history": history_shift(r["history"], ref["history"]),
        }
    a, b = CACHE_PAIR
    if a in ok and b in ok:
        ma, mb = ok[a]["metrics"], ok[b]["metrics"]
        out["cache_pair"] = {
            "runs": list(CACHE_PAIR),
            "same_confusion_matrix": ma["confusion_matrix"] == mb["confusion_matrix"],
            "threshold_diff": abs(ma["threshold"] - mb["threshold"]),
            "auc_diff": abs(ma["auc"] - mb["auc"]),
            "probabilities": probability_shift(ok[a]["test_p"], ok[b]["test_p"]),
            "history": history_shift(ok[a]["history"], ok[b]["history"]),
            "same_best_epoch": ok[a]["best_epoch"] == ok[b]["best_epoch"],
        }
    return out


def confusion_inside(m: dict, ref: dict) -> dict:
    """Each confusion-matrix cell against the count interval that float32's recall and
    specificity intervals imply (tn, fp from specificity; fn, tp from recall)."""
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    neg, pos = tn + fp, fn + tp
    spec, rec = ref["ci95"]["specificity"], ref["ci95"]["recall"]
    return {
        "tn": inside(tn / neg, spec),
        "fp": inside(1 - fp / neg, spec),
        "fn": inside(1 - fn / pos, rec),
        "tp": inside(tp / pos, rec),
    }


def claims(activations: dict, comparison: dict) -> dict:
    """The README's three bfloat16 claims, each held or not by these measurements (None: not
    measured)."""
    rel = [
        s["rel_max"]
        for r in activations.values()
        if "layers" in r
        for key in ("layers", "layers_random_stats")
        for s in r[key].values()
    ]
    rel_cut = [r["layers"][r["cut"]]["rel_max"] for r in activations.values() if "layers" in r]
    vs = comparison["vs_float32"]
    bf16 = vs.get("bfloat16", {}).get("inside_float32_ci95", {})
    cache = vs.get("float32-bf16-cache", {}).get("inside_float32_ci95", {})
    pair = comparison.get("cache_pair")
    return {
        "backbone_within_3pct_at_cut": (max(rel_cut) < 0.03) if rel_cut else None,
        "backbone_within_3pct_all_layers": (max(rel) < 0.03) if rel else None,
        "max_rel_max": max(rel) if rel else None,
        "bf16_auc_inside_float32_ci": bf16.get("auc"),
        "bf16_cache_auc_recall_specificity_inside_float32_ci": (
            all(cache.get(f) for f in ("auc", "recall", "specificity")) if cache else None
        ),
        # "The same within bfloat16 rounding": per-epoch losses within two bfloat16 roundings
        # (2**-7 relative) and the same confusion matrix on test.
        "bf16_cached_equals_uncached_within_rounding": (
            bool(
                pair["same_confusion_matrix"]
                and (pair["history"]["loss_max_rel"] or 0) <= 2 * BF16_EPS
                and (pair["history"]["val_loss_max_rel"] or 0) <= 2 * BF16_EPS
            )
            if pair
            else None
        ),
    }


def assemble(args, activations, runs, wall_s, load_before, loads) -> dict:
    comparison = compare_runs(runs)
    devices = next(
        (r.get("devices") for r in [*runs.values(), *activations.values()] if r.get("devices")), []
    )
    return {
        "benchmark": "precision",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.executable).name, os.path.relpath(SCRIPT, Path.cwd()), *sys.argv[1:]]
        ),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "out", "keep_workdir", "worker_timeout")
        },
        "hardware": {
            **common.hardware(),
            "load_average_before": load_before,
            "load_1min_between_jobs": loads,
            "accelerators": devices,
        },
        "versions": next(
            (
                r.get("versions")
                for r in [*runs.values(), *activations.values()]
                if r.get("versions")
            ),
            None,
        ),
        "activations": activations,
        "runs": runs,
        "comparison": comparison,
        "claims": claims(activations, comparison),
        "wall_s": round(wall_s, 1),
    }


# --- the tables ------------------------------------------------------------------------------------


def _f(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _yes_no(x) -> str:
    return {True: "yes", False: "**NO**", None: "–"}[x]


def _interval(m: dict, name: str) -> str:
    lo, hi = m.get("ci95", {}).get(name) or (None, None)
    return f"{m[name]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else _f(m.get(name))


def busy(payload: dict) -> float | None:
    """The highest 1-minute load seen before or between the jobs, if above BUSY_LOAD."""
    hw = payload["hardware"]
    worst = max([hw["load_average_before"][0], *hw.get("load_1min_between_jobs", [])])
    return worst if worst > BUSY_LOAD else None


def _intro(payload: dict) -> list[str]:
    s, hw = payload["settings"], payload["hardware"]
    acc = ", ".join(a for a in hw["accelerators"] if not a.startswith("cpu")) or "none"
    v = payload.get("versions") or {}
    lines = [
        "## Precision: bfloat16 against float32 on real images",
        "",
        f"Command: `{payload['command']}`",
        f"Date: {payload['created']}. Data: `{s['data']}`.",
        f"Machine: {hw['cpu']} ({hw['usable_cores']} usable cores, {hw['memory_gb']} GB); "
        f"accelerators: {acc}. 1-minute load average before: {hw['load_average_before'][0]:.2f}"
        f" (between jobs: {', '.join(f'{x:.2f}' for x in hw['load_1min_between_jobs'][1:])}). "
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in ("jax", "flax") if k in v) + ".",
    ]
    worst = busy(payload)
    if worst is not None:
        lines.append(
            f"**Warning:** the machine was busy (1-minute load up to {worst:.2f} on "
            f"{hw['usable_cores']} cores, other people's processes): the wall times are "
            "too long; the figures themselves do not depend on load."
        )
    return lines + [""]


def _activation_table(payload: dict) -> list[str]:
    acts = {n: r for n, r in payload["activations"].items() if "layers" in r}
    if not acts:
        return []
    first = next(iter(acts.values()))
    rows = []
    for name, r in acts.items():
        for init, key in (
            ("Keras (as --weights none)", "layers"),
            ("random statistics", "layers_random_stats"),
        ):
            rows += _activation_rows(name, init, r, key)
    header = [
        "backbone",
        "initial values",
        "layer",
        "shape per image",
        "max abs Δ / max abs f32, all images",
        "per image: median / p95 / max",
        "mean abs Δ / mean abs f32, all images",
        "per image: median / p95 / max",
        "one bf16 rounding of f32: mean abs Δ / mean abs f32",
    ]
    secs = "; ".join(
        f"{n} {r['seconds']['float32']['second_pass']:.1f} s in float32, "
        f"{r['seconds']['bfloat16']['second_pass']:.1f} s in bfloat16"
        for n, r in acts.items()
    )
    return [
        f"### Backbone activations, bfloat16 against float32 ({first['n_images']} "
        f"test-split images, {first['image_size']} px, seed {payload['settings']['seed']})",
        "",
        common.markdown_table(header, rows),
        "",
        "Δ = bfloat16 output (float32 parameters) − float32 output, on the same images. "
        "Initial values: Keras's (Glorot kernels, BatchNorm 1/0 statistics), what "
        "`--weights none` trains from; and the parity tests' random BatchNorm statistics and "
        "gammas, nearer to trained weights (ImageNet weights need internet, not measured). "
        "The last column is the error of storing the float32 output in bfloat16 once (what "
        "`--feature-cache-dtype bfloat16` adds); the rest accumulates through the layers. "
        f"One pass over the images, compiled: {secs}.",
        "",
    ]


def _activation_rows(name: str, init: str, r: dict, key: str) -> list[list[str]]:
    rows = []
    for layer, st in r[key].items():
        role = "cut" if layer == r["cut"] else "final"
        rows.append(
            [
                name,
                init,
                f"`{layer}` ({role})",
                "×".join(map(str, st["shape"])),
                _f(st["rel_max"], 4),
                " / ".join(_f(st["per_image_rel_max"][k], 4) for k in ("median", "p95", "max")),
                _f(st["rel_mean"], 4),
                " / ".join(_f(st["per_image_rel_mean"][k], 4) for k in ("median", "p95", "max")),
                _f(st["rounding_only_rel_mean"], 4),
            ]
        )
    return rows


def _runs_tables(payload: dict) -> list[str]:
    runs = {v: r for v, r in payload["runs"].items() if "metrics" in r}
    if not runs:
        return []
    s = payload["settings"]
    vs = payload["comparison"]["vs_float32"]
    titles = [VARIANTS[v][0] for v in runs]
    ref = runs.get(REFERENCE)
    first = next(iter(runs.values()))
    split = first.get("splits", {})
    lines = [
        f"### Complete runs (`train_run`): {s['backbone']} head-only, weights none, "
        f"{s['image_size']} px, {s['epochs']} epochs, patience {s['patience']}, batch "
        f"{s['batch_size']}, seed {s['seed']}",
        "",
        "Splits: "
        + ", ".join(
            f"{k} {v['n']} ({v['normal']} NORMAL / {v['pneumonia']} PNEUMONIA)"
            for k, v in split.items()
        )
        + f"; threshold chosen on validation for recall ≥ {s['target_recall']}; test "
        "figures with 95% bootstrap intervals.",
        "",
    ]
    rows = [[f, *[_interval(r["metrics"], f) for r in runs.values()]] for f in FIGURES]
    rows.append(
        [
            "threshold (from validation)",
            *[f"{r['metrics']['threshold']:.4f}" for r in runs.values()],
        ]
    )
    rows.append(
        [
            "confusion tn / fp / fn / tp",
            *[
                " / ".join(str(c) for pair in r["metrics"]["confusion_matrix"] for c in pair)
                for r in runs.values()
            ],
        ]
    )
    rows.append(
        ["best epoch (of run)", *[f"{r['best_epoch']} ({r['epochs_run']})" for r in runs.values()]]
    )
    rows.append(
        [
            "feature cache stored as",
            *[r["feature_cache"] or "off (uncached)" for r in runs.values()],
        ]
    )
    lines += [common.markdown_table(["test figure", *titles], rows), ""]
    if ref is not None and vs:
        others = [v for v in runs if v != REFERENCE]
        rows = [
            [
                f"{f} inside float32's interval",
                *[_yes_no(vs[v]["inside_float32_ci95"][f]) for v in others],
            ]
            for f in INSIDE_FIGURES
        ]
        rows.append(
            [
                "confusion cells inside float32's recall / specificity intervals (tn fp fn tp)",
                *[
                    " ".join(_yes_no(c) for c in vs[v]["confusion_inside_float32_ci95"].values())
                    for v in others
                ],
            ]
        )
        rows.append(
            [
                "same confusion matrix as float32",
                *[_yes_no(vs[v]["same_confusion_matrix"]) for v in others],
            ]
        )
        rows.append(["AUC abs Δ vs float32", *[f"{vs[v]['auc_diff']:.4f}" for v in others]])
        rows.append(
            [
                "test P(pneumonia) vs float32: max / mean abs Δ",
                *[
                    f"{vs[v]['probabilities']['max_abs']:.4f} / "
                    f"{vs[v]['probabilities']['mean_abs']:.4f}"
                    for v in others
                ],
            ]
        )
        rows.append(
            [
                "per-epoch loss / val_loss vs float32: max relative abs Δ",
                *[
                    f"{_f(vs[v]['history']['loss_max_rel'], 4)} / "
                    f"{_f(vs[v]['history']['val_loss_max_rel'], 4)}"
                    for v in others
                ],
            ]
        )
        lines += [
            "Against the float32 run:",
            "",
            common.markdown_table(["", *[VARIANTS[v][0] for v in others]], rows),
            "",
        ]
    pair = payload["comparison"].get("cache_pair")
    if pair:
        a, b = (VARIANTS[v][0] for v in pair["runs"])
        lines += [
            f"Cached against uncached in bfloat16 ({a} vs {b}): same confusion matrix "
            f"{_yes_no(pair['same_confusion_matrix'])}, threshold |Δ| "
            f"{pair['threshold_diff']:.4f}, AUC |Δ| {pair['auc_diff']:.4f}, test "
            f"P(pneumonia) max / mean |Δ| {pair['probabilities']['max_abs']:.4f} / "
            f"{pair['probabilities']['mean_abs']:.4f}, per-epoch loss / val_loss max "
            f"relative |Δ| {_f(pair['history']['loss_max_rel'], 4)} / "
            f"{_f(pair['history']['val_loss_max_rel'], 4)}, same best epoch "
            f"{_yes_no(pair['same_best_epoch'])}.",
            "",
        ]
    rows = [
        [label, *[_f(get(r), 1) for r in runs.values()]]
        for label, get in (
            (
                "data (decode, resize; cached images after the first run)",
                lambda r: r["seconds"].get("data"),
            ),
            (
                "fit (frozen activations once if cached, then epochs)",
                lambda r: r["seconds"].get("fit"),
            ),
            ("run total, in process", lambda r: r["seconds"].get("total")),
            ("process wall, with imports", lambda r: r.get("process_wall_s")),
        )
    ]
    lines += ["Wall time (s):", "", common.markdown_table(["part", *titles], rows), ""]
    return lines


def _claims(payload: dict) -> list[str]:
    c = payload["claims"]
    yes = {True: "holds", False: "**does not hold**", None: "not measured"}
    return [
        "### The README's claims",
        "",
        f"1. bfloat16 backbone within 3% of float32 (max abs Δ / max abs f32): at the cut "
        f"layer (Keras's initial values) "
        f"{yes[c['backbone_within_3pct_at_cut']]}, at every layer measured "
        f"{yes[c['backbone_within_3pct_all_layers']]} (largest {_f(c['max_rel_max'], 4)}, "
        "both initial values); "
        f"a bfloat16 run's AUC inside float32's 95% interval: "
        f"{yes[c['bf16_auc_inside_float32_ci']]}.",
        "2. `--feature-cache-dtype bfloat16` under float32 keeps AUC, recall and specificity "
        f"inside float32's 95% intervals: "
        f"{yes[c['bf16_cache_auc_recall_specificity_inside_float32_ci']]}.",
        "3. bfloat16 cached equals uncached within bfloat16 rounding (here: the same test "
        f"confusion matrix, per-epoch losses within 2·2⁻⁸ relative): "
        f"{yes[c['bf16_cached_equals_uncached_within_rounding']]}.",
        "",
    ]


def render_markdown(payload: dict) -> str:
    lines = _intro(payload) + _activation_table(payload) + _runs_tables(payload)
    lines += _claims(payload)
    failed = [
        f"{kind} {name} FAILED: {r['error']}"
        for kind in ("activations", "runs")
        for name, r in payload[kind].items()
        if "error" in r
    ]
    lines += failed + [f"Total wall time of the benchmark: {payload['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.rerender:
        return rerender(args.rerender)
    with common.workdir_of(args.keep_workdir, "pneumojax-precision-") as workdir:
        payload = run_suite(args, workdir)
    markdown = render_markdown(payload)
    md = common.write_outputs(args.out, payload, markdown)
    print(markdown)
    print(f"\nwrote {args.out} and {md}")
    failed = [
        n for kind in ("activations", "runs") for n, r in payload[kind].items() if "error" in r
    ]
    return 1 if failed else 0


def rerender(path: Path) -> int:
    """Comparisons, claims and tables again from an earlier run's measurements."""
    payload = json.loads(path.read_text())
    payload["comparison"] = compare_runs(payload["runs"])
    payload["claims"] = claims(payload["activations"], payload["comparison"])
    md = common.write_outputs(path, payload, render_markdown(payload))
    print(f"rewrote {path} and {md}")
    return 0


# --- the workers -------------------------------------------------------------------------------


def worker_main(job_path: str) -> int:
    job = common.read_job(job_path)
    common.write_result(job, ROLES[job["role"]](job))
    return 0


def _test_items(job: dict) -> list:
    """The test split pneumojax makes for this folder and seed (Kaggle: its own test/; flat:
    the patient-grouped carve), ``activation_images`` of it drawn with the seed."""
    from pneumojax.data import find_images, make_splits  # noqa: PLC0415
    from pneumojax.workspace import cache_dir  # noqa: PLC0415

    source = find_images(job["data"], cache_dir=cache_dir() / "images")  # as train_run
    test = make_splits(source, job["val_fraction"], job["test_fraction"], seed=job["seed"]).test
    order = np.random.default_rng(job["seed"]).permutation(len(test))
    return [test[i] for i in sorted(order[: job["activation_images"]])]


def _stats(ref: np.ndarray, out: np.ndarray) -> dict:
    """max|Δ|/max|ref| and mean|Δ|/mean|ref|, over all images and per image."""
    d = np.abs(out - ref)
    a = np.abs(ref)
    axes = tuple(range(1, ref.ndim))
    per_max = d.max(axis=axes) / np.maximum(a.max(axis=axes), 1e-30)
    per_mean = d.mean(axis=axes) / np.maximum(a.mean(axis=axes), 1e-30)
    rounded = np.asarray(ref.astype(_bf16()), np.float32)

    def dist(x):
        return {
            "median": float(np.median(x)),
            "p95": float(np.percentile(x, 95)),
            "max": float(x.max()),
        }

    return {
        "shape": list(ref.shape[1:]),
        "ref_max_abs": float(a.max()),
        "rel_max": float(d.max() / a.max()),
        "rel_mean": float(d.mean() / a.mean()),
        "per_image_rel_max": dist(per_max),
        "per_image_rel_mean": dist(per_mean),
        "rounding_only_rel_max": float(np.abs(rounded - ref).max() / a.max()),
        "rounding_only_rel_mean": float(np.abs(rounded - ref).mean() / a.mean()),
    }


def _bf16():
    import ml_dtypes  # noqa: PLC0415 - ships with jaxlib

    return ml_dtypes.bfloat16


def measure_activations(job: dict) -> dict:
    """Cut-layer and final-layer outputs of one backbone at random init, float32 vs bfloat16."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from pneumojax.backbones import backbone_model, get_backbone, preprocess  # noqa: PLC0415
    from pneumojax.data import load_images  # noqa: PLC0415
    from pneumojax.model import build_classifier, init_variables  # noqa: PLC0415
    from pneumojax.workspace import cache_dir  # noqa: PLC0415

    info = get_backbone(job["backbone"])
    cut = info.check_layer(job["cut"] or info.default_cut)
    final = info.layers[-1].name
    size = job["image_size"]
    items = _test_items(job)
    images = np.asarray(load_images(items, size, cache_dir=cache_dir() / "images", progress=False))
    # The whole backbone's variables, as --weights none draws them (the cut model's are a part).
    v = init_variables(build_classifier(info, final, frozenset()), size, job["seed"])
    keras_init = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}
    inits = {"keras": keras_init, "random-stats": randomized(keras_init, job["seed"])}
    applies = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        model = backbone_model(info, outputs=[cut, final], dtype=dtype)
        applies[name] = jax.jit(
            lambda v, x, m=model, dt=dtype: {
                k: y.astype(jnp.float32)
                for k, y in m.apply(v, preprocess(x, info.preprocess_mode, dt)).items()
            }
        )
    batch = job["activation_batch"]
    result, seconds = {}, {}
    for init, variables in inits.items():
        outputs = {}
        for name, apply in applies.items():
            t0 = time.perf_counter()
            parts = [
                jax.device_get(apply(variables, images[i : i + batch]))
                for i in range(0, len(images), batch)
            ]
            seconds.setdefault(name, []).append(round(time.perf_counter() - t0, 2))
            outputs[name] = {k: np.concatenate([p[k] for p in parts]) for k in (cut, final)}
        result[init] = {
            k: _stats(outputs["float32"][k], outputs["bfloat16"][k]) for k in (cut, final)
        }
    return {
        "backbone": info.name,
        "cut": cut,
        "final": final,
        "image_size": size,
        "n_images": len(items),
        "images": [os.path.basename(p) for p, _ in items],
        "layers": result["keras"],
        "layers_random_stats": result["random-stats"],
        # first pass compiles, the second (other variables, same shapes) does not
        "seconds": {k: {"first_pass": x[0], "second_pass": x[1]} for k, x in seconds.items()},
        "devices": common.accelerators_jax(),
    }


def randomized(variables: dict, seed: int) -> dict:
    """The parity tests' randomization (``ports.keras_port.randomize_keras_model``) applied to
    pneumojax variables: variance-preserving kernels, BatchNorm gammas and variances in
    [0.5, 1.5], betas, means and biases around 0; closer to trained statistics than Keras's
    1/0 initial ones."""
    import jax  # noqa: PLC0415

    rng = np.random.default_rng(seed + 1)

    def value(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        shape = np.shape(leaf)
        if key == "kernel":
            x = rng.normal(0.0, np.sqrt(1.0 / int(np.prod(shape[:-1]))), shape)
        elif key in ("scale", "var"):
            x = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            x = rng.normal(0.0, 0.1, shape)
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(value, variables)


def run_variant(job: dict) -> dict:
    """One complete ``train_run`` in the variant's precision and cache setting."""
    from pneumojax.data import Splits  # noqa: PLC0415
    from pneumojax.run import TrainConfig, train_run  # noqa: PLC0415

    _, precision, feature_cache, cache_dtype = VARIANTS[job["variant"]]
    out = Path(job["workdir"]) / f"run-{job['variant']}"
    cfg = TrainConfig(
        data=job["data"],
        backbone=job["backbone"],
        cut=job["cut"],
        weights="none",
        trainable="none",
        image_size=job["image_size"],
        epochs=job["epochs"],
        batch_size=job["batch_size"],
        patience=job["patience"],
        seed=job["seed"],
        target_recall=job["target_recall"],
        val_fraction=job["val_fraction"],
        test_fraction=job["test_fraction"],
        out=str(out),
        precision=precision,
        feature_cache=feature_cache,
        feature_cache_dtype=cache_dtype,
    )
    lines: list[str] = []

    def log(line: str):
        lines.append(line)
        print(line, flush=True)

    t0 = time.perf_counter()
    metrics = train_run(cfg, overwrite=True, log=log)
    total = time.perf_counter() - t0
    training = metrics.pop("training")
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    with open(out / "predictions" / "test.csv", newline="") as f:
        test_p = [float(row["p_pneumonia"]) for row in csv.DictReader(f)]
    splits = Splits.from_json((out / "splits.json").read_text())
    cache_line = next((x for x in lines if x.startswith("feature cache:")), None)
    best = training["best_epoch"]
    return {
        "variant": job["variant"],
        "precision": cfg.precision,
        "feature_cache": cfg.feature_cache_dtype if cache_line else None,
        "metrics": metrics,
        "history": history,
        "test_p": test_p,
        "epochs_run": training["epochs_run"],
        "best_epoch": best[0] if isinstance(best, (list, tuple)) else best,
        "seconds": {**training["seconds"], "total": round(total, 2)},
        "splits": splits.summary(),
        "config": dataclasses.asdict(cfg),
        "devices": common.accelerators_jax(),
    }


ROLES = {"activations": measure_activations, "run": run_variant}


if __name__ == "__main__":
    sys.exit(main())
