#!/usr/bin/env python
"""Is a gap between pneumojax and the study's Keras pipeline run-to-run noise or the pipeline?

Two parts, on one data folder (Kaggle layout):

1. **Inputs.** Every image through pneumojax's decoder (``decode_image``: PIL decode, 8-bit
   L/RGB, grayscale replicated to RGB, resized, rounded to uint8) against the Keras pipeline's
   tensor (``tf.io.decode_image(channels=3)`` + ``tf.image.resize``, float32), at
   ``--image-size`` and at each ``--extra-sizes`` (a smaller side stands in for the large
   downscale factor of the official images, ~1000-2900 px down to 128). The difference is split
   into its causes: the JPEG decoder (PIL vs TensorFlow, full size), grayscale-to-RGB handling,
   the resize filter (``--resize antialias`` vs ``keras``) and rounding to uint8.
2. **Runs.** Per seed: the same patient-grouped splits and the same initial weights (Keras's own
   random init of the backbone, ported; the head as pneumojax draws it, copied into Keras) for
   pneumojax ``--resize antialias``, pneumojax ``--resize keras`` and, for ``--keras-seeds``,
   the study's Keras pipeline, exactly as ``benchmarks/recall.py`` runs them (its workers are
   used), with two Keras variants as yardsticks: another shuffle order (the noise that shuffling
   alone makes) and the last partial batch dropped (as pneumojax does); ``--other-tree`` adds
   pneumojax from another checkout. Test AUC, recall and specificity at 0.5 and at the
   validation-chosen threshold, mean and spread per setting, and paired differences per seed.

Usage: ``python benchmarks/pipeline_parity.py --data DIR [--seeds 0 1 2 3 4] [--keras-seeds 0 1 2]
[--image-size 128] [--epochs 3] [--out FILE.json]``.

One file on purpose, though longer than the library's modules: a benchmark is run as a script
and read top to bottom (parent, workers, tables), and nothing else imports it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import recall  # noqa: E402

SETTINGS = (
    "pneumojax-antialias",
    "pneumojax-keras",
    "keras-tf",
    "keras-tf-reshuffled",
    "keras-tf-drop-last",
)
KERAS_VARIANTS = {
    "keras-tf": {},
    "keras-tf-reshuffled": {"shuffle_seed": 1000},
    "keras-tf-drop-last": {"drop_remainder": True},
}
TITLES = {
    "pneumojax-antialias": "pneumojax --resize antialias",
    "pneumojax-keras": "pneumojax --resize keras",
    "keras-tf": "Keras-TF (study pipeline)",
    "keras-tf-reshuffled": "Keras-TF, another shuffle order",
    "keras-tf-drop-last": "Keras-TF, last partial batch dropped",
}
PAIRS = (
    ("pneumojax-keras", "pneumojax-antialias"),
    ("pneumojax-antialias", "pneumojax-antialias-other-tree"),
    ("keras-tf", "pneumojax-keras"),
    ("keras-tf", "pneumojax-antialias"),
    ("keras-tf-reshuffled", "keras-tf"),
    ("keras-tf-drop-last", "keras-tf"),
)
FIGURES = (
    ("auc", lambda r: r["metrics"]["auc"]),
    ("recall at 0.5", lambda r: r["metrics"]["at_0_5"]["recall"]),
    ("specificity at 0.5", lambda r: r["metrics"]["at_0_5"]["specificity"]),
    ("recall at val threshold", lambda r: r["metrics"]["recall"]),
    ("specificity at val threshold", lambda r: r["metrics"]["specificity"]),
    ("val threshold", lambda r: r["metrics"]["threshold"]),
)
# With --external: the same models on every image of another site's folder, at the threshold
# each chose on its own validation split.
EXTERNAL_FIGURES = (
    ("external auc", lambda r: r["external"]["auc"]),
    ("external recall at val threshold", lambda r: r["external"]["recall"]),
    ("external specificity at val threshold", lambda r: r["external"]["specificity"]),
)


def figures_of(seeds: list[dict]) -> tuple:
    """FIGURES, and the external ones when the runs were scored on an external folder."""
    scored = any("external" in r for e in seeds for r in e["results"].values())
    return FIGURES + (EXTERNAL_FIGURES if scored else ())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=None, help="Kaggle-layout data folder (required)")
    p.add_argument(
        "--external",
        default=None,
        help="also score every run on every image of this folder (another site; any layout), "
        "at its validation threshold",
    )
    p.add_argument(
        "--settings",
        nargs="*",
        default=None,
        choices=SETTINGS,
        help="run only these settings [default: all]",
    )
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument(
        "--extra-sizes",
        type=int,
        nargs="*",
        default=[32],
        help="input comparison only: further output sides (larger downscale factors)",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--keras-seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="seeds for which the Keras pipeline runs too (~1 min each on 2 cores), "
        "with its variants: another shuffle order (seed 1000; the noise that "
        "shuffling alone makes) and the last partial batch dropped",
    )
    p.add_argument(
        "--other-tree",
        type=Path,
        default=None,
        help="also run pneumojax --resize antialias with the pneumojax package of "
        "this checkout (e.g. `git archive COMMIT` unpacked: the code before a "
        "fix), same splits and initial weights",
    )
    p.add_argument("--other-tree-label", default=None, help="what --other-tree is, for the table")
    p.add_argument("--skip-inputs", action="store_true")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only write the markdown table again from an earlier output JSON",
    )
    p.add_argument("--skip-runs", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "pipeline-parity.json",
    )
    p.add_argument("--keep-workdir", type=Path, default=None)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --keep-workdir: reuse the results a previous (interrupted) "
        "invocation left there instead of running those workers again",
    )
    p.add_argument("--worker-timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.data is None and args.render is None:
        p.error("--data is required")
    return args


# --- part 1: inputs -------------------------------------------------------------------------------


def compare_inputs(data: str, sizes: list[int]) -> dict:
    """Per-pixel differences between pneumojax's decoded images and the Keras pipeline's
    tensors, by cause, for grayscale and RGB files."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415

    from pneumojax.data import (  # noqa: PLC0415
        decode_image,
        find_images,
        open_image,
        to_8bit_rgb_or_gray,
    )
    from pneumojax.data.resize import round_to_uint8, tf_bilinear  # noqa: PLC0415

    paths = [p for p, _ in find_images(data, check=False).items]
    rows: dict[str, list[dict]] = {"L": [], "RGB": []}
    for path in paths:
        with open_image(path) as image:
            full = to_8bit_rgb_or_gray(image)
            mode = full.mode
            pil = np.asarray(full)
        pil_rgb = np.repeat(pil[..., None], 3, -1) if pil.ndim == 2 else pil
        tf_full = tf.io.decode_image(
            tf.io.read_file(path), channels=3, expand_animations=False
        ).numpy()
        decoder = np.abs(pil_rgb.astype(np.int16) - tf_full.astype(np.int16))
        # TensorFlow's default IDCT is libjpeg's fast integer one; its accurate one is PIL's.
        accurate = tf.io.decode_jpeg(
            tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE"
        ).numpy()
        row = {
            "path": path,
            "shape": list(pil.shape[:2]),
            "tf_gray_replicated": bool(
                (tf_full[..., 0] == tf_full[..., 1]).all()
                and (tf_full[..., 1] == tf_full[..., 2]).all()
            ),
            "decoder_max": int(decoder.max()),
            "decoder_mean": float(decoder.mean()),
            "decoder_differing": float((decoder > 0).mean()),
            "decoder_accurate_max": int(
                np.abs(pil_rgb.astype(np.int16) - accurate.astype(np.int16)).max()
            ),
        }
        for size in sizes:
            keras = tf.image.resize(tf_full, (size, size)).numpy()  # the study's tensor, float32
            ours = {
                m: decode_image(path, size, m).astype(np.float32) for m in ("antialias", "keras")
            }
            same_decoder = tf_bilinear(tf_full, size, size)  # our resize on TensorFlow's decode
            pil_decoder = tf_bilinear(pil_rgb, size, size)  # our resize on PIL's decode
            row[size] = {
                "antialias": _stats(ours["antialias"] - keras),
                "keras": _stats(ours["keras"] - keras),
                "resize_only_max": float(np.abs(same_decoder - keras).max()),
                "decoder_only": _stats(pil_decoder - keras),
                "rounding_only": _stats(round_to_uint8(keras).astype(np.float32) - keras),
                "filters": _stats(ours["antialias"] - ours["keras"]),
                "downscale": float(min(pil.shape[:2]) / size),
            }
        rows[mode].append(row)
    return {
        "n": {m: len(r) for m, r in rows.items()},
        "sizes": sizes,
        "by_mode": {m: summarize_inputs(r, sizes) for m, r in rows.items() if r},
        "all": summarize_inputs(rows["L"] + rows["RGB"], sizes),
    }


def _stats(diff: np.ndarray) -> dict:
    a = np.abs(diff)
    return {"mean": float(a.mean()), "max": float(a.max())}


def summarize_inputs(rows: list[dict], sizes: list[int]) -> dict:
    """Means of per-image mean differences, maxima of per-image maxima."""
    out = {
        "images": len(rows),
        "tf_gray_replicated_all": all(r["tf_gray_replicated"] for r in rows),
        "decoder": {
            "mean": float(np.mean([r["decoder_mean"] for r in rows])),
            "max": max(r["decoder_max"] for r in rows),
            "pixels_differing": float(np.mean([r["decoder_differing"] for r in rows])),
            "images_identical": sum(r["decoder_max"] == 0 for r in rows),
            "max_vs_tf_integer_accurate": max(r["decoder_accurate_max"] for r in rows),
        },
    }
    for size in sizes:
        per = [r[size] for r in rows]
        entry = {
            "downscale_median": float(np.median([p["downscale"] for p in per])),
            "resize_only_max": max(p["resize_only_max"] for p in per),
        }
        for key in ("antialias", "keras", "decoder_only", "rounding_only", "filters"):
            entry[key] = {
                "mean": float(np.mean([p[key]["mean"] for p in per])),
                "max": max(p[key]["max"] for p in per),
            }
        out[str(size)] = entry
    return out


# --- part 2: runs ---------------------------------------------------------------------------------


def run_seeds(args, workdir: Path) -> list[dict]:
    """Per seed: prepare the shared initial weights, then each setting in its own process."""
    data = str(Path(args.data).resolve())
    out = []
    for seed in args.seeds:
        wd = workdir / f"seed{seed}"
        wd.mkdir(parents=True, exist_ok=True)
        ns = argparse.Namespace(
            backbone=args.backbone,
            cut=None,
            trainable="none",
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=32,
            learning_rate=1e-3,
            patience=5,
            seed=seed,
            target_recall=0.98,
            val_fraction=0.15,
            test_fraction=0.15,
            precision="float32",
            external=str(Path(args.external).resolve()) if args.external else None,
        )
        splits_file, summary = recall.make_shared_splits(ns, data, wd)
        recall.warm_file_cache(splits_file)
        job = {**recall.base_job(ns, data, wd, splits_file), "return_probabilities": True}
        t0 = time.perf_counter()
        prep = _worker(
            args, {**job, "name": "prepare", "role": "prepare"}, wd, {"KERAS_BACKEND": "tensorflow"}
        )
        if "error" in prep:
            raise SystemExit(
                f"seed {seed}: preparing weights failed: {prep['error']}\n{prep['log_tail']}"
            )
        entry = {
            "seed": seed,
            "splits": summary,
            "prepare_s": prep.get("process_wall_s"),
            "initial_weights": prep["initial_weights"],
            "results": {},
        }
        settings = [s for s in SETTINGS if s not in KERAS_VARIANTS or seed in args.keras_seeds]
        settings = [s for s in settings if args.settings is None or s in args.settings]
        if args.other_tree:
            settings.insert(1, "pneumojax-antialias-other-tree")
        for setting in settings:
            env = {"KERAS_BACKEND": "tensorflow", "PNEUMOJAX_CACHE": str(wd / f"cache-{setting}")}
            if setting in KERAS_VARIANTS:
                worker = {**job, "name": setting, "role": "keras-tf", **KERAS_VARIANTS[setting]}
            else:
                resize = "keras" if setting == "pneumojax-keras" else "antialias"
                worker = {
                    **job,
                    "name": setting,
                    "role": "pneumojax",
                    "resize": resize,
                    "run_name": f"run-{setting}",
                }
                if setting.endswith("other-tree"):  # its pneumojax (and ports) come first
                    env["PYTHONPATH"] = str(args.other_tree.resolve())
            result = _worker(args, worker, wd, env)
            if "error" in result:
                raise SystemExit(
                    f"seed {seed} {setting} failed: {result['error']}\n{result['log_tail']}"
                )
            result.pop("splits_json", None)
            entry["results"][setting] = {
                "metrics": {
                    k: result["metrics"][k]
                    for k in (
                        "auc",
                        "recall",
                        "specificity",
                        "accuracy",
                        "threshold",
                        "at_0_5",
                        "ci95",
                        "confusion_matrix",
                    )
                },
                "test_p": result["test_p"],
                **(
                    {
                        "external": {
                            k: result["external"]["metrics"][k]
                            for k in ("auc", "recall", "specificity", "threshold", "ci95", "n")
                        },
                        "external_p": result["external"]["p"],
                    }
                    if "external" in result
                    else {}
                ),
                "best_epoch": result["best_epoch"],
                "history": result["history"],
                "process_wall_s": result["process_wall_s"],
            }
            print(f"seed {seed} {setting}: {recall.one_line(result)}", flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out.append(entry)
    return out


def _worker(args, job: dict, wd: Path, env: dict) -> dict:
    done = wd / f"{job['name']}.result.json"
    if args.reuse and done.exists():
        result = json.loads(done.read_text())
        if result.get("resize") == job.get("resize") or job["role"] != "pneumojax":
            print(f"  reusing {done}", flush=True)
            return {**result, "process_wall_s": None, "reused": True}
    return common.run_worker(recall.SCRIPT, job, wd, env=env, timeout=args.worker_timeout)


def summarize_runs(seeds: list[dict]) -> dict:
    """Per setting: mean, sample standard deviation, min and max of each figure over seeds;
    paired differences (same seed: same splits, same initial weights) between settings."""
    per_setting = {}
    figures = figures_of(seeds)
    for s in SETTINGS[:1] + ("pneumojax-antialias-other-tree",) + SETTINGS[1:]:
        rs = [e["results"][s] for e in seeds if s in e["results"]]
        if rs:
            per_setting[s] = {
                "seeds": len(rs),
                **{name: _spread([get(r) for r in rs]) for name, get in figures},
            }
    pairs = {}
    for a, b in PAIRS:
        both = [e for e in seeds if a in e["results"] and b in e["results"]]
        if not both:
            continue
        pairs[f"{a} - {b}"] = {
            "seeds": len(both),
            **{
                name: _spread([get(e["results"][a]) - get(e["results"][b]) for e in both])
                for name, get in figures
            },
            "test_p_correlation": _spread(
                [
                    float(np.corrcoef(e["results"][a]["test_p"], e["results"][b]["test_p"])[0, 1])
                    for e in both
                ]
            ),
            "test_p_mean_abs_diff": _spread(
                [
                    float(
                        np.mean(
                            np.abs(
                                np.subtract(e["results"][a]["test_p"], e["results"][b]["test_p"])
                            )
                        )
                    )
                    for e in both
                ]
            ),
        }
    return {"per_setting": per_setting, "paired": pairs}


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, float)
    sd = float(v.std(ddof=1)) if len(v) > 1 else None
    return {
        "mean": float(v.mean()),
        "sd": sd,
        "min": float(v.min()),
        "max": float(v.max()),
        "ci95_mean": _t_interval(v) if sd is not None else None,
        "values": [float(x) for x in v],
    }


def _t_interval(v: np.ndarray) -> list[float]:
    """The 95% Student-t interval of the mean (seeds as the independent replicates)."""
    from scipy import stats  # noqa: PLC0415

    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


# --- the table ------------------------------------------------------------------------------------


def _mci(x: dict, digits: int = 3) -> str:
    ci = x.get("ci95_mean")
    if not ci:
        return _ms(x, digits)
    return f"{x['mean']:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]; sd {x['sd']:.{digits}f}"


def _ms(x: dict, digits: int = 3) -> str:
    sd = "" if x["sd"] is None else f" ± {x['sd']:.{digits}f}"
    return f"{x['mean']:.{digits}f}{sd} [{x['min']:.{digits}f}, {x['max']:.{digits}f}]"


def render_markdown(payload: dict) -> str:
    hw = payload["hardware"]
    load = hw["load_average_before"][0]
    lines = [
        "## Pipeline parity: pneumojax vs the study's Keras pipeline",
        "",
        f"Data: {payload['data']}. Date {payload['created']}. CPU: {hw['cpu']} "
        f"({hw['usable_cores']} usable cores); 1-minute load average before "
        f"{load:.2f}, after {payload['load_average_after'][0]:.2f}.",
        f"Command: `{payload['command']}`",
        "",
    ]
    if max(load, payload["load_average_after"][0]) > 1.0:
        lines += [
            f"**Warning:** the machine was busy (other jobs on its {hw['usable_cores']} "
            "cores): wall times are longer than on an idle machine; the figures are not "
            "affected (every run is seeded and deterministic given its inputs).",
            "",
        ]
    inputs = payload.get("inputs")
    if inputs:
        lines += input_tables(inputs)
    runs = payload.get("runs")
    if runs:
        lines += run_tables(runs, payload["settings"])
    lines += [f"Total wall time: {payload['wall_s']:.0f} s.", ""]
    if payload.get("conclusion"):  # written by hand into the JSON after reading the figures
        lines += ["### Conclusion", ""] + [p + "\n" for p in payload["conclusion"]]
    return "\n".join(lines).rstrip()


def input_tables(inputs: dict) -> list[str]:
    lines = [
        "### 1. Inputs: pneumojax's decoded image vs the Keras pipeline's tensor",
        "",
        f"Grey levels (0-255), per pixel, over {inputs['n']['L']} grayscale and "
        f"{inputs['n']['RGB']} RGB JPEGs; mean of per-image mean |difference|, max of "
        "per-image max. Keras tensor: `tf.image.resize(tf.io.decode_image(f, channels=3), "
        "(S, S))`, float32, not rounded.",
        "",
    ]
    by_mode = inputs["by_mode"]
    header = [
        "comparison",
        *[
            f"{m} S={s} (downscale ~{by_mode[m][str(s)]['downscale_median']:.1f}x)"
            for s in inputs["sizes"]
            for m in by_mode
        ],
    ]
    rows = []
    for key, label in (
        ("antialias", "pneumojax `--resize antialias` (default) vs Keras"),
        ("keras", "pneumojax `--resize keras` vs Keras"),
        ("filters", "the two filters against each other"),
        ("decoder_only", "decoder only: our bilinear on PIL's decode vs Keras"),
        ("rounding_only", "rounding only: Keras's tensor rounded to uint8"),
    ):
        rows.append(
            [
                label,
                *[
                    f"{inputs['by_mode'][m][str(s)][key]['mean']:.3f} / "
                    f"{inputs['by_mode'][m][str(s)][key]['max']:.2f}"
                    for s in inputs["sizes"]
                    for m in inputs["by_mode"]
                ],
            ]
        )
    rows.append(
        [
            "resize only: our bilinear on TensorFlow's decode vs Keras (max)",
            *[
                f"{inputs['by_mode'][m][str(s)]['resize_only_max']:.2g}"
                for s in inputs["sizes"]
                for m in inputs["by_mode"]
            ],
        ]
    )
    lines += ["mean / max:", "", common.markdown_table(header, rows), ""]
    dec_rows = [
        [
            m,
            str(d["images"]),
            str(d["decoder"]["images_identical"]),
            f"{d['decoder']['pixels_differing']:.4f}",
            f"{d['decoder']['mean']:.4f}",
            str(d["decoder"]["max"]),
            str(d["decoder"]["max_vs_tf_integer_accurate"]),
            "yes" if d["tf_gray_replicated_all"] else "NO",
        ]
        for m, d in inputs["by_mode"].items()
    ]
    lines += [
        "JPEG decoders at full size (PIL as pneumojax decodes, grayscale replicated, vs "
        "`tf.io.decode_image(channels=3)`):",
        "",
        common.markdown_table(
            [
                "stored mode",
                "images",
                "identical",
                "share of pixels differing",
                "mean |diff|",
                "max |diff|",
                "max |diff| vs TF's dct_method='INTEGER_ACCURATE'",
                "TF's 3 channels equal (gray replicated)",
            ],
            dec_rows,
        ),
        "",
    ]
    return lines


def run_tables(runs: dict, settings: dict) -> list[str]:
    per, pairs = runs["summary"]["per_setting"], runs["summary"]["paired"]
    seeds = runs["seeds"]
    s0 = seeds[0]["splits"]
    lines = [
        "### 2. Runs: same splits and initial weights per seed",
        "",
        f"DenseNet121 at Keras's random init (ported; identical for every setting of a "
        f"seed), head only, {settings['image_size']} px, {settings['epochs']} epochs, batch "
        "32, Adam 1e-3 with the study's compounding schedule, float32. Splits per seed "
        "(patient-grouped, the seed carves validation from train + the Kaggle val/): "
        + ", ".join(f"{k} {v['n']}" for k, v in s0.items())
        + "; test = the folder's test/. Figures on test; mean ± sd [min, max] over seeds.",
        "",
    ]
    figures = figures_of(seeds)
    header = ["figure (test)", *[f"{TITLES[s]} ({per[s]['seeds']} seeds)" for s in per]]
    rows = [[name, *[_ms(per[s][name]) for s in per]] for name, _ in figures]
    lines += [common.markdown_table(header, rows), ""]
    header = ["paired difference (same seed): mean [95% CI of the mean]; sd", *pairs]
    rows = [[name, *[_mci(pairs[p][name]) for p in pairs]] for name, _ in figures]
    rows.append(
        ["correlation of test probabilities", *[_ms(pairs[p]["test_p_correlation"]) for p in pairs]]
    )
    rows.append(
        [
            "mean abs difference of test probabilities",
            *[_ms(pairs[p]["test_p_mean_abs_diff"], 4) for p in pairs],
        ]
    )
    lines += [common.markdown_table(header, rows), ""]
    per_seed = []
    for e in seeds:
        for s, r in e["results"].items():
            m = r["metrics"]
            lo, hi = np.percentile(r["test_p"], [5, 95])
            per_seed.append(
                [
                    str(e["seed"]),
                    TITLES[s],
                    f"{m['auc']:.3f}",
                    f"[{m['ci95']['auc'][0]:.3f}, {m['ci95']['auc'][1]:.3f}]",
                    f"{lo:.3f}-{hi:.3f}",
                    f"{m['at_0_5']['recall']:.3f} / {m['at_0_5']['specificity']:.3f}",
                    f"{m['threshold']:.3f}: {m['recall']:.3f} / {m['specificity']:.3f}",
                    str(r["best_epoch"]),
                    "reused" if r["process_wall_s"] is None else f"{r['process_wall_s']:.0f}",
                ]
            )
    lines += [
        "Per run:",
        "",
        common.markdown_table(
            [
                "seed",
                "setting",
                "AUC",
                "AUC 95% CI",
                "test probabilities, 5-95th percentile",
                "recall / specificity at 0.5",
                "val threshold: recall / specificity",
                "best epoch",
                "process wall (s)",
            ],
            per_seed,
        ),
        "",
    ]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        label = payload["settings"].get("other_tree_label") or payload["settings"].get("other_tree")
        TITLES["pneumojax-antialias-other-tree"] = f"pneumojax --resize antialias, {label}"
        md = args.render.with_suffix(".md")
        md.write_text(render_markdown(payload) + "\n")
        print(f"wrote {md}")
        return 0
    if args.other_tree:
        TITLES["pneumojax-antialias-other-tree"] = "pneumojax --resize antialias, " + (
            args.other_tree_label or str(args.other_tree)
        )
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())
    payload = {
        "benchmark": "pipeline_parity",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "keep_workdir", "worker_timeout")
        },
        "data": str(args.data),
        "hardware": {**common.hardware(), "load_average_before": load_before},
        "versions": common.versions(),
    }
    if not args.skip_inputs:
        t = time.perf_counter()
        payload["inputs"] = compare_inputs(
            str(Path(args.data).resolve()), [args.image_size, *args.extra_sizes]
        )
        payload["inputs"]["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(payload["inputs"]["by_mode"], indent=1), flush=True)
    if not args.skip_runs:
        with common.workdir_of(args.keep_workdir, "pneumojax-parity-") as workdir:
            seeds = run_seeds(args, workdir)
        payload["runs"] = {"seeds": seeds, "summary": summarize_runs(seeds)}
    payload["load_average_after"] = list(os.getloadavg())
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    common.write_outputs(args.out, payload, "")  # the figures survive a failing table
    markdown = render_markdown(payload)
    md = common.write_outputs(args.out, payload, markdown)
    print(markdown)
    print(f"\nwrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
