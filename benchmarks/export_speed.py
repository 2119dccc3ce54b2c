#!/usr/bin/env python
"""Images/s of an exported model in each runtime against ``pneumojax predict``'s scoring path.

One run folder is trained (DenseNet121 to its default cut, 128 px, ``--weights none``: the
weights do not change the speed; 1 epoch on a small synthetic set), exported as SavedModel,
ONNX and StableHLO, and each is timed in its own subprocess at batch 1 and batch 32 on the same
uint8 images: ONNX Runtime, TF SavedModel (``tf.saved_model.load``), ``jax.export``
(``deserialize(...).call``) and predict's path (``RunModel.probabilities_of_images`` on
decoded images, which runs fixed batches of the run's ``--batch-size``, 32, so a single image
costs a padded batch). Decoding and resizing are outside every timing. The same images' scores
are compared across the four (max |difference|). A second run trained in bfloat16 is exported
(float32) and compared with predict on real images, the tolerance ``docs/export.md`` states.

Usage: ``python benchmarks/export_speed.py [--out benchmarks/results/export-speed-cpu.json]``
(``--quick``: a tiny model, for tests). Timings only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
RUNTIMES = ("predict", "onnx", "savedmodel", "stablehlo")
TITLES = {
    "predict": "pneumojax predict (JAX, RunModel)",
    "onnx": "ONNX Runtime",
    "savedmodel": "TF SavedModel",
    "stablehlo": "jax.export (StableHLO)",
}
BATCHES = (1, 32)
FULL = {"image_size": 128, "cut": None, "steps": {1: 30, 32: 6}, "images": 32, "per_class": 32}
QUICK = {
    "image_size": 32,
    "cut": "conv2_block3_concat",
    "steps": {1: 3, 32: 2},
    "images": 8,
    "per_class": 32,
}
MINI = common.REPO.parent / "shared" / "data" / "chest_xray_mini"
NIH = common.REPO.parent / "shared" / "data" / "nih_external"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=SCRIPT.parent / "results" / "export-speed-cpu.json")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (tests)")
    p.add_argument("--keep-workdir", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- workers ---------------------------------------------------------------------------------


def prepare(job: dict) -> dict:
    """Trains the run(s) and exports them; returns where they are and the bf16 parity."""
    from click.testing import CliRunner  # noqa: PLC0415

    from pneumojax import data as pj_data  # noqa: PLC0415
    from pneumojax.cli import main  # noqa: PLC0415
    from pneumojax.export import FORMATS, export_run  # noqa: PLC0415

    work = Path(job["workdir"])
    demo = pj_data.make_demo_dataset(work / "demo", job["per_class"], job["image_size"], seed=1)
    runs = {}
    for name, extra in (("float32", []), ("bfloat16", ["--precision", "bfloat16"])):
        args = ["train", "--data", str(demo), "--weights", "none", "--epochs", "1"]
        args += ["--image-size", str(job["image_size"]), "--batch-size", "32"]
        args += (["--cut", job["cut"]] if job["cut"] else []) + extra
        r = CliRunner().invoke(main, [*args, "--out", str(work / f"run-{name}")])
        if r.exit_code != 0:
            raise RuntimeError(r.output[-3000:])
        runs[name] = str(work / f"run-{name}")
    exports = {}
    for fmt in FORMATS:
        exports[fmt] = str(work / f"export-{fmt}")
        export_run(runs["float32"], fmt, exports[fmt], log=lambda m: None)
    bf16 = work / "export-bf16-stablehlo"
    export_run(runs["bfloat16"], "stablehlo", bf16, log=lambda m: None)
    cut = json.loads((Path(runs["float32"]) / "config.json").read_text())["cut"]
    parity = bf16_parity(runs["bfloat16"], bf16)
    return {"runs": runs, "exports": exports, "cut": cut, "bf16_parity": parity}


def bf16_parity(run: str, folder: Path) -> dict:
    """The bfloat16 run's predict against its float32 export on real images of two sites."""
    from pneumojax.export import load_exported, read_metadata  # noqa: PLC0415
    from pneumojax.inference import predict_paths  # noqa: PLC0415
    from pneumojax import data as pj_data  # noqa: PLC0415

    files = [
        str(p)
        for root in (MINI / "test", NIH)
        for cls in ("NORMAL", "PNEUMONIA")
        if (root / cls).is_dir()
        for p in sorted((root / cls).iterdir())[:16]
    ]
    if not files:
        return {"skipped": "no real images (shared/data)"}
    meta = read_metadata(folder)
    rows = predict_paths(run, files, log=lambda m: None)
    images = pj_data.load_images(files, meta["image_size"], resize=meta["resize"])
    got = load_exported(folder)(images)
    want = np.array([r["p_pneumonia"] for r in rows], np.float32)
    labels = np.array([r["label"] == "PNEUMONIA" for r in rows])
    return {
        "images": len(files),
        "max_abs_diff": float(np.max(np.abs(got - want))),
        "mean_abs_diff": float(np.mean(np.abs(got - want))),
        "labels_differing": int(np.sum((got >= meta["threshold"]) != labels)),
    }


def time_runtime(job: dict) -> dict:
    """Times one runtime at each batch size on the same images; returns rates and scores."""
    images = np.random.default_rng(0).integers(
        0, 256, (max(BATCHES), job["image_size"], job["image_size"], 3), np.uint8
    )
    score = scorer(job)
    out = {"versions": None, "batches": {}}
    for batch in BATCHES:
        x = images[:batch]
        out["batches"][str(batch)] = common.time_calls(
            lambda: score(x), job["steps"][str(batch)], warmup=1, batch_size=batch
        )
    out["scores"] = np.asarray(score(images), np.float64).tolist()
    out["versions"] = common.versions()
    out["peak_rss_mb"] = common.peak_rss_mb()
    return out


def scorer(job: dict):
    if job["runtime"] == "predict":
        from pneumojax.scoring import combined_probability, load_run  # noqa: PLC0415

        model = load_run(job["run"], log=lambda m: None).model
        return lambda x: combined_probability(model.probabilities_of_images(x))
    from pneumojax.export import load_exported  # noqa: PLC0415

    return load_exported(job["export"])


def worker(path: str) -> None:
    job = common.read_job(path)
    result = prepare(job) if job["name"] == "prepare" else time_runtime(job)
    common.write_result(job, result)


# --- the parent ------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    setting = QUICK if args.quick else FULL
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": common.hardware(),
        "setting": {**setting, "backbone": "densenet121", "cut": setting["cut"] or "default"},
        "results": {},
    }
    with common.workdir_of(args.keep_workdir, "pneumojax-export-speed-") as work:
        env = {"PNEUMOJAX_CACHE": str(work / "cache")}
        job = {"name": "prepare", "workdir": str(work), **setting}
        prepared = common.run_worker(SCRIPT, job, work, env)
        if "error" in prepared:
            print(prepared["log_tail"], file=sys.stderr)
            raise SystemExit(f"preparing the runs failed: {prepared['error']}")
        payload["bf16_parity"] = prepared["bf16_parity"]
        payload["setting"]["cut"] = prepared["cut"]
        for runtime in RUNTIMES:
            job = {
                "name": runtime,
                "runtime": runtime,
                "run": prepared["runs"]["float32"],
                "export": prepared["exports"].get(runtime),
                "image_size": setting["image_size"],
                "steps": {str(b): s for b, s in setting["steps"].items()},
            }
            payload["results"][runtime] = common.run_worker(SCRIPT, job, work, env)
            print(f"{runtime}: {_rates(payload['results'][runtime])}", flush=True)
    payload["score_max_abs_diff_vs_predict"] = score_differences(payload["results"])
    payload["load_average_at_end"] = list(os.getloadavg())
    md = common.write_outputs(args.out, payload, markdown(payload))
    print(md.read_text())
    return 0


def _rates(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error']}\n{result.get('log_tail', '')}"
    return ", ".join(
        f"batch {b}: {r['images_per_s']:.1f} images/s" for b, r in result["batches"].items()
    )


def score_differences(results: dict) -> dict:
    ref = results["predict"].get("scores")
    return {
        name: float(np.max(np.abs(np.array(r["scores"]) - np.array(ref))))
        for name, r in results.items()
        if ref is not None and "scores" in r and name != "predict"
    }


def markdown(payload: dict) -> str:
    hw, s = payload["hardware"], payload["setting"]
    ref = payload["results"]["predict"]
    rows = []
    for name in RUNTIMES:
        r = payload["results"][name]
        if "error" in r:
            rows.append([TITLES[name], "error", "", "", "", ""])
            continue
        cells = [TITLES[name]]
        for b in BATCHES:
            rate = r["batches"][str(b)]["images_per_s"]
            base = ref.get("batches", {}).get(str(b), {}).get("images_per_s")
            cells += [f"{rate:.1f}", f"{rate / base:.2f}x" if base else ""]
        cells.append(f"{r['batches']['32']['first_call_s']:.1f}")
        cells.append(f"{payload['score_max_abs_diff_vs_predict'].get(name, 0.0):.1e}")
        rows.append(cells)
    header = ["runtime", "batch 1 images/s", "vs predict", "batch 32 images/s", "vs predict"]
    header += ["first call s", "max diff vs predict"]
    bf = payload["bf16_parity"]
    bf_line = (
        f"A bfloat16 run of the same model exported in float32, against `predict` in bfloat16 "
        f"on {bf['images']} real images (chest_xray_mini test + nih_external): max "
        f"|difference| {bf['max_abs_diff']:.2e}, mean {bf['mean_abs_diff']:.2e}, "
        f"{bf['labels_differing']} labels differing at the run's threshold."
        if "images" in bf
        else f"bfloat16 parity: {bf.get('skipped')}"
    )
    return "\n".join(
        [
            f"# Exported model speed ({payload['date']})",
            "",
            f"DenseNet121 to its cut `{s['cut']}`, {s['image_size']} px, random init, "
            f"float32, uint8 images in, P(pneumonia) out; decoding outside the timing. "
            f"CPU: {hw['cpu']}, {hw['usable_cores']} usable cores "
            f"(load average {hw['load_average'][0]:.1f} at the start, "
            f"{payload['load_average_at_end'][0]:.1f} at the end: other work shared the "
            "cores, so read the ratios rather than the rates). Median of "
            f"{s['steps'][1]} calls at batch 1 and {s['steps'][32]} at batch 32 after one "
            "warm-up; `predict` runs fixed batches of the run's batch size (32), so batch 1 "
            "pays for a padded batch of 32.",
            "",
            common.markdown_table(header, rows),
            "",
            bf_line,
            "",
            "Produced by `python benchmarks/export_speed.py`.",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
