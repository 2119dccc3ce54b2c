#!/usr/bin/env python
"""One complete run per framework, data to evaluated model: pneumojax vs Keras 3 (TensorFlow).

Both frameworks get the same data folder and the same patient-grouped splits
(``pneumojax.data.make_splits``, fixed seed), the same initial weights (Keras's own random
init of the backbone, ported into pneumojax; the head as pneumojax draws it, copied into
Keras), the same hyperparameters (Adam 1e-3, the study's compounding
``LearningRateScheduler(lambda e, lr: lr * 0.85 ** e)``, EarlyStopping(patience=5,
restore_best_weights=True) on val_loss, batch 32), seed and epochs.

* pneumojax: ``pneumojax.run.train_run`` (the CLI's path: decoded-image cache, frozen-prefix
  activation cache, jitted step), with a fresh cache folder so nothing is reused from earlier.
* Keras: the study's pipeline: ``tf.io.decode_image`` + ``tf.image.resize`` +
  ``preprocess_input`` in a ``tf.data`` pipeline that decodes every epoch, ``model.fit`` with
  ``validation_data``.

Both choose the threshold on validation (``choose_threshold(target_recall=0.98)``) and report
test figures with ``evaluate_predictions`` (95% bootstrap intervals). The output says whether
the two frameworks' recall and AUC intervals overlap.

Usage: ``python benchmarks/recall.py --data DIR [--backbone densenet121] [--image-size 128]
[--epochs N] [--quick] [--out FILE.json]``.

One file on purpose, though longer than the library's modules: a benchmark is run as a script
and read top to bottom (parent, workers, tables), and nothing else imports it.
"""

from __future__ import annotations

import argparse
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
FRAMEWORKS = ("pneumojax", "keras-tf")
TITLES = {"pneumojax": "pneumojax", "keras-tf": "Keras-TF"}
FIGURES = ("accuracy", "recall", "precision", "specificity", "f1", "auc")
OVERLAP_FIGURES = ("recall", "auc")
QUICK = {"epochs": 2, "image_size": 64, "demo_per_class": 48}


# --- the parent ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default=None,
        help="data folder (Kaggle train/val/test or flat NORMAL/PNEUMONIA); with "
        "--quick and no --data, a small generated demo set",
    )
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--cut", default=None, help="cut layer (default: the backbone's)")
    p.add_argument(
        "--trainable",
        default="none",
        help="backbone layers to train (pneumojax --trainable syntax)",
    )
    p.add_argument("--image-size", type=int, default=None, help="default 128 (quick: 64)")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (quick: 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=5, help="early stopping; 0 = off")
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
        "--precision", default="float32", help="pneumojax compute precision (Keras runs float32)"
    )
    p.add_argument(
        "--resize",
        default="antialias",
        choices=("antialias", "keras"),
        help="pneumojax --resize (Keras always runs the study's tf.image.resize; "
        "keras removes that difference)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI size: {QUICK['epochs']} epochs, {QUICK['image_size']} px, generated "
        "demo data unless --data is given",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (the markdown table goes beside it, same stem, .md); "
        "default benchmarks/results/recall[-quick].json",
    )
    p.add_argument(
        "--keep-workdir",
        type=Path,
        default=None,
        help="keep run folders, logs and caches here instead of a temp folder",
    )
    p.add_argument("--worker-timeout", type=float, default=6 * 3600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args  # a worker reads everything from its job file
    if args.image_size is None:
        args.image_size = QUICK["image_size"] if args.quick else 128
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else 20
    if args.data is None and not args.quick:
        p.error("--data is required (or --quick for generated demo data)")
    if args.out is None:
        args.out = (
            SCRIPT.parent / "results" / ("recall-quick.json" if args.quick else "recall.json")
        )
    return args


def resolve_data(args, workdir: Path) -> tuple[str, str]:
    """The data folder and a description; --quick without --data generates a demo set."""
    if args.data is not None:
        return str(Path(args.data).resolve()), str(args.data)
    from pneumojax.data import make_demo_dataset  # noqa: PLC0415

    folder = make_demo_dataset(
        workdir / "demo", n_per_class=QUICK["demo_per_class"], image_size=128, seed=args.seed
    )
    return str(folder), (
        f"generated demo set ({2 * QUICK['demo_per_class']} synthetic images, not X-rays)"
    )


def make_shared_splits(args, data: str, workdir: Path) -> tuple[Path, dict]:
    """pneumojax's patient-grouped splits, written once for the Keras worker (pneumojax's
    ``train_run`` makes them itself with the same call, checked afterwards)."""
    from pneumojax.data import find_images, make_splits  # noqa: PLC0415

    splits = make_splits(find_images(data), args.val_fraction, args.test_fraction, seed=args.seed)
    path = workdir / "splits.json"
    path.write_text(splits.to_json())
    return path, splits.summary()


def warm_file_cache(splits_file: Path) -> None:
    """Reads every image once so neither framework pays the first disk read alone."""
    from pneumojax.data import Splits  # noqa: PLC0415

    splits = Splits.from_json(splits_file.read_text())
    for path, _ in splits.train + splits.val + splits.test:
        Path(path).read_bytes()


def base_job(args, data: str, workdir: Path, splits_file: Path) -> dict:
    return {
        "data": data,
        "backbone": args.backbone,
        "cut": args.cut,
        "trainable": args.trainable,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "patience": args.patience,
        "seed": args.seed,
        "target_recall": args.target_recall,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "precision": args.precision,
        "resize": getattr(args, "resize", "antialias"),
        "splits": str(splits_file),
        "external": getattr(args, "external", None),
        "backbone_weights": str(workdir / "init-backbone.npz"),
        "head_weights": str(workdir / "init-head.npz"),
        "workdir": str(workdir),
    }


def run_suite(args, workdir: Path) -> dict:
    """Prepares data, splits and initial weights, then runs pneumojax and Keras in turn."""
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())  # a busy machine lengthens every wall time
    data, data_label = resolve_data(args, workdir)
    splits_file, summary = make_shared_splits(args, data, workdir)
    warm_file_cache(splits_file)
    job = base_job(args, data, workdir, splits_file)
    print("preparing Keras's initial backbone weights ...", flush=True)
    prep = common.run_worker(
        SCRIPT,
        {**job, "name": "prepare", "role": "prepare"},
        workdir,
        env={"KERAS_BACKEND": "tensorflow"},
        timeout=args.worker_timeout,
    )
    if "error" in prep:
        raise SystemExit(f"preparing weights failed: {prep['error']}\n{prep['log_tail']}")
    results = {}
    # pneumojax first: it writes the head's initial values that Keras then starts from.
    for framework in FRAMEWORKS:
        print(f"{TITLES[framework]}: training and evaluating ...", flush=True)
        env = {
            "KERAS_BACKEND": "tensorflow",
            # A fresh cache: decoded images and frozen activations are computed in the run.
            "PNEUMOJAX_CACHE": str(workdir / f"cache-{framework}"),
        }
        results[framework] = common.run_worker(
            SCRIPT,
            {**job, "name": framework, "role": framework},
            workdir,
            env=env,
            timeout=args.worker_timeout,
        )
        print("  " + one_line(results[framework]), flush=True)
        if framework == "pneumojax" and "error" in results[framework]:
            break
    return assemble(
        args, data_label, summary, prep, results, splits_file, time.perf_counter() - t0, load_before
    )


def one_line(result: dict) -> str:
    """A worker's outcome for the progress log."""
    if "error" in result:
        return f"FAILED: {result['error']}\n{result.get('log_tail', '')}"
    m = result["metrics"]
    return (
        f"recall {m['recall']:.3f}, specificity {m['specificity']:.3f}, auc {m['auc']:.3f}, "
        f"threshold {m['threshold']:.3f}, run {result['seconds']['total']:.1f} s"
    )


def intervals_overlap(a: list | None, b: list | None) -> bool | None:
    """Whether two [low, high] intervals share a point (None if either is missing)."""
    if not a or not b or None in a or None in b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def same_splits(splits_file: Path, result: dict) -> bool | None:
    """pneumojax's own splits.json against the one handed to Keras (file lists and labels);
    takes the (long) copy out of the result."""
    if "splits_json" not in result:
        return None
    ours, theirs = json.loads(splits_file.read_text()), json.loads(result.pop("splits_json"))
    return all(ours[k] == theirs[k] for k in ("train", "val", "test"))


def assemble(args, data_label, summary, prep, results, splits_file, wall_s, load_before) -> dict:
    """The JSON payload: settings, data, machine, both results, interval overlaps."""
    ok = {fw: r for fw, r in results.items() if "metrics" in r}
    overlap = {}
    if len(ok) == 2:
        a, b = (ok[fw]["metrics"]["ci95"] for fw in FRAMEWORKS)
        overlap = {f: intervals_overlap(a.get(f), b.get(f)) for f in OVERLAP_FIGURES}
    versions = {fw: r.get("versions") for fw, r in results.items()}
    return {
        "benchmark": "recall",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "out", "keep_workdir", "worker_timeout")
        },
        "data": data_label,
        "splits": summary,
        "splits_identical": same_splits(splits_file, results.get("pneumojax", {})),
        "initial_weights": prep.get("initial_weights"),
        "hardware": {
            **common.hardware(),
            "load_average_before": load_before,
            "accelerators": results.get("pneumojax", {}).get("devices", []),
        },
        "versions": versions,
        "results": results,
        "intervals_overlap": overlap,
        "wall_s": round(wall_s, 1),
    }


# --- the table -------------------------------------------------------------------------------------


def _figure(m: dict, name: str) -> str:
    value = m.get(name)
    if value is None:
        return "n/a"
    lo, hi = m.get("ci95", {}).get(name) or (None, None)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{value:.3f}"


def _seconds(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def _yes_no(x) -> str:
    return {True: "yes", False: "NO", None: "–"}[x]


def _intro(payload: dict) -> list[str]:
    """Title, data and splits, model and hyperparameters, machine and versions."""
    s, hw = payload["settings"], payload["hardware"]
    acc = ", ".join(a for a in hw["accelerators"] if not a.startswith("cpu")) or "none"
    versions = {k: v for r in payload["versions"].values() if r for k, v in r.items()}
    load = hw["load_average_before"][0]
    lines = [
        f"## Recall: pneumojax vs Keras 3 (TensorFlow), one complete run each"
        f"{' (QUICK)' if s['quick'] else ''}",
        "",
        f"Data: {payload['data']}; patient-grouped splits (seed {s['seed']}): "
        + ", ".join(
            f"{k} {v['n']} ({v['normal']} NORMAL / {v['pneumonia']} PNEUMONIA)"
            for k, v in payload["splits"].items()
        )
        + f"; identical for both: {_yes_no(payload['splits_identical'])}.",
        f"Model: {s['backbone']} cut {s['cut'] or '(default)'}, trainable {s['trainable']}, "
        f"{s['image_size']} px, float32 (pneumojax precision {s['precision']}, resize "
        f"{s.get('resize', 'antialias')}; Keras: tf.image.resize), same initial "
        f"weights. Adam {s['learning_rate']:g}, LR × 0.85**epoch compounding, "
        f"EarlyStopping(patience={s['patience']}, restore best) on val_loss, batch "
        f"{s['batch_size']}, up to {s['epochs']} epochs, seed {s['seed']}.",
        f"Threshold chosen on validation for recall ≥ {s['target_recall']}; figures on test "
        "with 95% bootstrap intervals.",
        f"CPU: {hw['cpu']} ({hw['usable_cores']} usable cores, {hw['memory_gb']} GB); "
        f"accelerators: {acc}; 1-minute load average before {load:.2f}. Versions: "
        + ", ".join(
            f"{k} {versions[k]}" for k in ("jax", "flax", "keras", "tensorflow") if k in versions
        )
        + ".",
    ]
    if load > 0.5:
        lines.append(
            f"**Warning:** the machine was busy before the benchmark (load {load:.2f}): "
            "the wall times are too long for both frameworks."
        )
    return lines + [""]


def _figures_table(payload: dict, ok: list[str]) -> str:
    """Test figures with intervals per framework, and whether recall/AUC intervals overlap."""
    res = payload["results"]
    both = len(ok) == 2
    header = ["figure (test)", *[TITLES[fw] for fw in ok]] + (
        ["95% intervals overlap"] if both else []
    )
    rows = []
    for f in FIGURES:
        overlap = _yes_no(payload["intervals_overlap"].get(f)) if f in OVERLAP_FIGURES else ""
        rows.append(
            [f, *[_figure(res[fw]["metrics"], f) for fw in ok]] + ([overlap] if both else [])
        )
    for label, get in (
        ("threshold (from validation)", lambda r: f"{r['metrics']['threshold']:.4f}"),
        (
            "confusion tn / fp / fn / tp",
            lambda r: " / ".join(str(c) for pair in r["metrics"]["confusion_matrix"] for c in pair),
        ),
        ("epochs run (best epoch)", lambda r: f"{r['epochs_run']} ({r['best_epoch']})"),
    ):
        rows.append([label, *[get(res[fw]) for fw in ok]] + ([""] if both else []))
    return common.markdown_table(header, rows)


TIME_PARTS = (
    (
        "data (pneumojax: decode, resize, cache once; Keras: build the tf.data "
        "pipeline, which decodes inside every epoch)",
        "data",
    ),
    ("model: build and load initial weights", "model"),
    ("frozen activations, computed once (feature cache)", "frozen_activations"),
    ("first epoch (includes tracing/compiling)", "first_epoch"),
    ("later epochs, mean per epoch", "later_epoch_mean"),
    ("all epochs", "epochs"),
    ("evaluation: threshold on val, figures on test", "evaluation"),
    ("run total, in process", "total"),
)


def _time_table(payload: dict, ok: list[str]) -> str:
    """Where each framework's wall time went."""
    res = payload["results"]
    rows = [
        [label, *[_seconds(res[fw]["seconds"].get(key)) for fw in ok]] for label, key in TIME_PARTS
    ]
    rows.append(
        ["process wall, with imports", *[_seconds(res[fw].get("process_wall_s")) for fw in ok]]
    )
    rows.append(
        [
            "start of the command to metrics written (process wall less the benchmark's "
            "own porting of the shared initial weights)",
            *[_seconds(command_seconds(res[fw])) for fw in ok],
        ]
    )
    return common.markdown_table(["part", *[TITLES[fw] for fw in ok]], rows)


def command_seconds(result: dict) -> float | None:
    """What ``pneumojax train`` (or the Keras script) would take from its start: the worker's
    process wall without the set-up only this benchmark does (porting Keras's initial weights
    into a pneumojax checkpoint so both frameworks start alike)."""
    wall = result.get("process_wall_s")
    return None if wall is None else wall - result.get("setup_not_counted_s", 0.0)


def render_markdown(payload: dict) -> str:
    """Figures with intervals side by side, then where the wall time went."""
    res = payload["results"]
    ok = [fw for fw in FRAMEWORKS if "metrics" in res.get(fw, {})]
    lines = _intro(payload)
    lines += [
        "### Test figures",
        "",
        _figures_table(payload, ok),
        "",
        "### Wall time (s)",
        "",
        _time_table(payload, ok),
        "",
    ]
    lines += [f"{TITLES[fw]} FAILED: {r['error']}" for fw, r in res.items() if "error" in r]
    if len(ok) == 2:
        pj, keras = (res[fw] for fw in ok)
        in_process = keras["seconds"]["total"] / pj["seconds"]["total"]
        command = command_seconds(keras) / command_seconds(pj)
        lines += [
            f"pneumojax is **{in_process:.1f}x** faster in process and **{command:.1f}x** "
            "from the start of the command to metrics written.",
            "",
        ]
    resize = payload["settings"].get("resize", "antialias")
    lines += [
        "Keras decodes and resizes every image in every epoch (tf.data, as the study "
        f"did); pneumojax decodes once (PIL, --resize {resize}) and, with the backbone "
        "frozen up to the trainable part, computes the frozen activations once.",
        f"Total wall time of the benchmark: {payload['wall_s']:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    with common.workdir_of(args.keep_workdir, "pneumojax-recall-") as workdir:
        payload = run_suite(args, workdir)
    markdown = render_markdown(payload)
    md = common.write_outputs(args.out, payload, markdown)
    print(markdown)
    print(f"\nwrote {args.out} and {md}")
    failed = [fw for fw, r in payload["results"].items() if "error" in r]
    return 1 if failed or len(payload["results"]) < len(FRAMEWORKS) else 0


# --- the workers -------------------------------------------------------------------------------


def worker_main(job_path: str) -> int:
    job = common.read_job(job_path)
    run = {"prepare": prepare_weights, "pneumojax": run_pneumojax, "keras-tf": run_keras}
    common.write_result(job, run[job["role"]](job))
    return 0


def _plan(job: dict):
    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.model import make_plan  # noqa: PLC0415

    info = get_backbone(job["backbone"])
    return info, make_plan(info, job["cut"], job["trainable"], job["image_size"])


def prepare_weights(job: dict) -> dict:
    """Keras's own random init of the backbone (``weights=None``), seeded, saved for both."""
    import keras  # noqa: PLC0415

    from ports.keras_port import weights_of_keras_model, weights_sha256  # noqa: PLC0415

    info, plan = _plan(job)
    keras.utils.set_random_seed(job["seed"])
    base, _ = common.build_keras_classifier(
        info, plan.cut, plan.trainable_layers, job["image_size"]
    )
    weights = weights_of_keras_model(base)
    common.save_weights(Path(job["backbone_weights"]), {"backbone": weights})
    return {
        "initial_weights": {
            "backbone": f"keras.applications.{info.keras_constructor}"
            f"(weights=None), keras seed {job['seed']}",
            "backbone_sha256": weights_sha256(weights),
            "head": "pneumojax init_variables (Glorot uniform, zero bias), "
            f"seed {job['seed']}, copied into Keras",
        }
    }


def run_pneumojax(job: dict) -> dict:
    """Ports the initial backbone into a checkpoint, then ``train_run`` from it."""
    from pneumojax.checkpoint import save_variables  # noqa: PLC0415
    from pneumojax.model import build_classifier, init_variables  # noqa: PLC0415
    from pneumojax.run import TrainConfig, train_run  # noqa: PLC0415
    from ports.keras_port import port_keras_weights, weights_sha256  # noqa: PLC0415

    workdir = Path(job["workdir"])
    t_setup = time.perf_counter()
    info, plan = _plan(job)
    source = common.load_weights(job["backbone_weights"])["backbone"]
    variables = port_keras_weights(source, info, job["image_size"])
    checkpoint = save_variables(
        workdir / "pneumojax-initial-backbone",
        variables,
        {
            "backbone": info.name,
            "input_size": job["image_size"],
            "source": {"weights": "none", "keras_seed": job["seed"]},
            "weights_sha256": weights_sha256(source),
        },
        overwrite=True,
    )
    # The head as train_run will draw it (same call, same seed): Keras starts from it too.
    initial = init_variables(
        build_classifier(info, plan.cut, plan.trainable_layers),
        job["image_size"],
        job["seed"],
        variables,
    )
    common.save_weights(
        Path(job["head_weights"]),
        {
            "head": {
                layer: {k: np.asarray(v) for k, v in initial["params"][layer].items()}
                for layer in common.HEAD_LAYERS
            }
        },
    )
    setup_s = time.perf_counter() - t_setup

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = dict(
        data=job["data"],
        backbone=info.name,
        cut=job["cut"],
        weights=str(checkpoint),
        trainable=job["trainable"],
        image_size=job["image_size"],
        epochs=job["epochs"],
        batch_size=job["batch_size"],
        learning_rate=job["learning_rate"],
        lr_schedule="keras-seed",
        patience=job["patience"],
        seed=job["seed"],
        target_recall=job["target_recall"],
        val_fraction=job["val_fraction"],
        test_fraction=job["test_fraction"],
        out=str(workdir / job.get("run_name", "pneumojax-run")),
        precision=job["precision"],
        resize=job.get("resize", "antialias"),
    )
    cfg = TrainConfig(**{k: v for k, v in options.items() if k in fields})
    stamps: list[tuple[float, str]] = []

    def log(line: str):
        stamps.append((time.perf_counter(), line))
        print(line, flush=True)

    t0 = time.perf_counter()
    metrics = train_run(cfg, overwrite=True, log=log)
    total = time.perf_counter() - t0
    run_dir = Path(cfg.out)
    training = metrics.pop("training")
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    extra = {}
    if job.get("return_probabilities"):  # per test image, in splits.test order
        rows = (run_dir / "predictions" / "test.csv").read_text().splitlines()[1:]
        extra["test_p"] = [float(row.rsplit(",", 1)[1]) for row in rows]
    if job.get("external"):  # every image of another folder, at the validation threshold
        from pneumojax.inference import evaluate_run  # noqa: PLC0415
        from pneumojax.predictions import read_predictions  # noqa: PLC0415

        folder = run_dir / "eval-external"
        ext = evaluate_run(run_dir, job["external"], "all", folder / "metrics.json", log=log)
        paths, _, p = read_predictions(folder / "predictions.csv")
        extra["external"] = {"metrics": ext, "paths": paths, "p": p.mean(1).tolist()}
    return {
        "framework": "pneumojax",
        "metrics": metrics,
        "history": history,
        **extra,
        "epochs_run": training["epochs_run"],
        "best_epoch": _first(training["best_epoch"]),
        "stopped_early": training["stopped_early"],
        "seconds": pneumojax_seconds(stamps, t0, total, training["seconds"]),
        "setup_not_counted_s": setup_s,
        "devices": common.accelerators_jax(),
        "splits_json": (run_dir / "splits.json").read_text(),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
    }


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def pneumojax_seconds(stamps, t0: float, total: float, inside: dict) -> dict:
    """Splits train_run's wall time by the times its log lines appeared."""

    def when(prefix: str) -> float | None:
        hits = [t - t0 for t, line in stamps if line.startswith(prefix)]
        return hits[0] if hits else None

    epochs = [t - t0 for t, line in stamps if line.startswith("epoch ") and "/" in line[:12]]
    devices, cache = when("devices:"), when("feature cache:")
    start = cache if cache is not None else devices
    out = {
        "data": inside["data"],
        "model": (devices - inside["data"]) if devices else None,
        "frozen_activations": (cache - devices) if cache is not None and devices else None,
        "total": total,
    }
    out.update(epoch_parts([b - a for a, b in zip([start] + epochs, epochs)]))
    out["evaluation"] = total - epochs[-1] if epochs else None
    return out


def epoch_parts(durations: list[float]) -> dict:
    """First epoch (compiles), the mean of the others, and their sum."""
    return {
        "epoch_s": durations,
        "first_epoch": durations[0] if durations else None,
        "later_epoch_mean": float(np.mean(durations[1:])) if len(durations) > 1 else None,
        "epochs": float(np.sum(durations)) if durations else None,
    }


def keras_dataset(
    items,
    size: int,
    batch_size: int,
    preprocess_input,
    shuffle_seed=None,
    drop_remainder: bool = False,
):
    """The study's input pipeline: read, decode (3 channels), resize, preprocess, batch; it
    runs again every epoch. ``drop_remainder`` (not the study's) drops the last partial batch
    as pneumojax does."""
    import tensorflow as tf  # noqa: PLC0415

    paths = [p for p, _ in items]
    labels = np.eye(2, dtype=np.float32)[[label for _, label in items]]

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.image.resize(image, (size, size))
        return preprocess_input(image), label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    return (
        ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=drop_remainder)
        .prefetch(tf.data.AUTOTUNE)
    )


def keras_callbacks(keras, patience: int, epochs: int, times: list[float]) -> list:
    """The study's callbacks, plus one that records when each epoch ends."""

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter())

    return [
        keras.callbacks.LearningRateScheduler(lambda e, lr: lr * 0.85**e),
        # patience 0 means "off" in pneumojax: never stop, still restore the best epoch.
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience or epochs + 1, restore_best_weights=True
        ),
        EpochTimes(),
    ]


def run_keras(job: dict) -> dict:
    """The study's Keras run on the TensorFlow backend."""
    import keras  # noqa: PLC0415

    from pneumojax.data import Splits  # noqa: PLC0415
    from pneumojax.metrics import choose_threshold, evaluate_predictions  # noqa: PLC0415
    from ports.keras_port import set_keras_weights  # noqa: PLC0415

    info, plan = _plan(job)  # pneumojax's reading of --trainable: not Keras's cost
    t0 = time.perf_counter()
    keras.utils.set_random_seed(job["seed"])
    splits = Splits.from_json(Path(job["splits"]).read_text())
    preprocess = getattr(keras.applications, info.keras_module).preprocess_input
    size, batch = job["image_size"], job["batch_size"]
    # Variants for benchmarks/pipeline_parity.py: another shuffle order, pneumojax's dropping of
    # the last partial batch. The defaults are the study's pipeline.
    train_ds = keras_dataset(
        splits.train,
        size,
        batch,
        preprocess,
        shuffle_seed=job.get("shuffle_seed", job["seed"]),
        drop_remainder=job.get("drop_remainder", False),
    )
    val_ds = keras_dataset(splits.val, size, batch, preprocess)
    test_ds = keras_dataset(splits.test, size, batch, preprocess)
    t_data = time.perf_counter()
    _, model = common.build_keras_classifier(info, plan.cut, plan.trainable_layers, size)
    set_keras_weights(
        model,
        {
            **common.load_weights(job["backbone_weights"])["backbone"],
            **common.load_weights(job["head_weights"])["head"],
        },
    )
    common.compile_keras(model, job["learning_rate"])
    t_model = time.perf_counter()
    ends: list[float] = []
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=job["epochs"],
        verbose=2,
        callbacks=keras_callbacks(keras, job["patience"], job["epochs"], ends),
    )
    t_fit = time.perf_counter()
    val_y = np.array([label for _, label in splits.val])
    test_y = np.array([label for _, label in splits.test])
    threshold = choose_threshold(
        val_y, model.predict(val_ds, verbose=0)[:, 1], job["target_recall"]
    )
    test_p = model.predict(test_ds, verbose=0)[:, 1]
    metrics = evaluate_predictions(test_y, test_p, threshold)
    metrics.update(split="test", threshold_source="validation", target_recall=job["target_recall"])
    t_end = time.perf_counter()
    external = {}
    if job.get("external"):  # the same images, in the same order, as pneumojax scores them
        from pneumojax.data import find_images  # noqa: PLC0415

        items = find_images(job["external"], one_class=True).items
        ext_p = model.predict(keras_dataset(items, size, batch, preprocess), verbose=0)[:, 1]
        ext_y = np.array([label for _, label in items])
        external["external"] = {
            "metrics": evaluate_predictions(ext_y, ext_p, threshold),
            "paths": [p for p, _ in items],
            "p": [float(x) for x in ext_p],
        }
    val_losses = history.history["val_loss"]
    seconds = {
        "data": t_data - t0,
        "model": t_model - t_data,
        "frozen_activations": None,
        **epoch_parts([b - a for a, b in zip([t_model] + ends, ends)]),
        "evaluation": t_end - t_fit,
        "total": t_end - t0,
    }
    return {
        "framework": "keras-tf",
        "metrics": metrics,
        "history": [
            {k: float(v[i]) for k, v in history.history.items()} for i in range(len(val_losses))
        ],
        "epochs_run": len(val_losses),
        "best_epoch": int(np.argmin(val_losses)) + 1,
        "stopped_early": len(val_losses) < job["epochs"],
        "seconds": seconds,
        "jit_compile": model.jit_compile,
        **({"test_p": [float(x) for x in test_p]} if job.get("return_probabilities") else {}),
        **external,
    }


if __name__ == "__main__":
    sys.exit(main())
