#!/usr/bin/env python
"""Training and inference throughput: pneumojax vs Keras 3 on TensorFlow vs Keras 3 on JAX.

For each of the study's six configurations (see ``../shared/DESIGN.md``), and a seventh, the
no-ImageNet recipe's model (DenseNet121 with every layer trained, at its recipe's 64 px and
batch 32 where the others take the suite's --image-size and --batch-size, 256 and 32 by
default), every framework runs the same model (the ``keras.applications`` backbone cut at the
study's layer + Flatten, Dense(128, relu), Dropout(0.1), Dense(2, sigmoid); the backbone frozen
except the configuration's trainable range) with the same randomized weights (made once with
``randomize_keras_model`` and ported into pneumojax with ``port_keras_weights``), the same
batch, image size and float32. Each framework is measured in its own subprocess; this parent
only collects their JSON.

Measured per framework and configuration:

* training images/s of the real, uncached train step (frozen part forward, trainable part
  forward and backward, Adam update): pneumojax's jitted ``Steps.train`` on the full
  classifier with a device-resident batch, Keras's ``train_on_batch`` on device-resident
  tensors (it returns numpy logs, so it blocks);
* inference images/s: one batch of host images per call (pneumojax ``predict_logits`` on
  uint8, Keras ``predict_on_batch`` on preprocessed float32);
* the first call of each (trace + compile + one run), peak RSS of the subprocess, peak device
  memory on GPUs, and cores used (process CPU time / wall time over the timed calls);
* the FLOP/s each framework achieved: XLA's count of the FLOPs in pneumojax's compiled train
  step and predict step (the same model and batch for every framework) times steps per second,
  beside the machine's matrix-product peak (``jnp.dot`` of two 2048 x 2048 matrices, float32
  and bfloat16, timed in a worker of its own before the others).

Usage: ``python benchmarks/throughput.py [--quick] [--out FILE.json] [--configs 1 2 ...]``.

One file on purpose, though longer than the library's modules: a benchmark is run as a script
and read top to bottom (parent, workers, tables), and nothing else imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
FRAMEWORKS = ("pneumojax", "keras-tf", "keras-jax")
TITLES = {"pneumojax": "pneumojax", "keras-tf": "Keras-TF", "keras-jax": "Keras-JAX"}
PHASES = ("train", "inference", "explain")
# Grad-CAM maps kept for the frameworks' comparison: at most this many pixels a side.
PROBE_SIDE = 16
KERAS_BACKENDS = {"keras-tf": "tensorflow", "keras-jax": "jax"}
LEARNING_RATE = 1e-3
# Images per class in the official train split: the study's class weights come from these.
STUDY_CLASS_COUNTS = (1341, 3875)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One of the study's six experiments, as far as its train step is concerned."""

    number: int
    backbone: str
    cut: str
    label: str
    trainable: str = "none"
    class_weights: bool = False
    same_step_as: int | None = None  # its train step is that configuration's, byte for byte
    # Its own image size and batch (None: the suite's --image-size / --batch-size).
    image_size: int | None = None
    batch_size: int | None = None


CONFIGS = {
    c.number: c
    for c in (
        StudyConfig(1, "resnet152", "conv5_block3_1_relu", "ResNet152, head only"),
        StudyConfig(2, "densenet121", "conv5_block15_1_relu", "DenseNet121, head only"),
        StudyConfig(3, "inception_v3", "conv2d_86", "InceptionV3, head only"),
        StudyConfig(
            4,
            "inception_v3",
            "conv2d_86",
            "InceptionV3 + conv2d_44:average_pooling2d_4",
            trainable="conv2d_44:average_pooling2d_4",
        ),
        # Oversampling changes which images fill a batch, not the step: 4's figures stand for it.
        StudyConfig(
            5,
            "inception_v3",
            "conv2d_86",
            "as 4, on an oversampled train set",
            trainable="conv2d_44:average_pooling2d_4",
            same_step_as=4,
        ),
        StudyConfig(6, "resnet50v2", "post_relu", "ResNet50V2 + class weights", class_weights=True),
        # Not the study's: the no-ImageNet recipe's model (configs/no_imagenet.toml), at the
        # recipe's own size and batch (64 px, 32), not the suite's.
        StudyConfig(
            7,
            "densenet121",
            "conv5_block15_1_relu",
            "DenseNet121, every layer trained (no-ImageNet recipe)",
            trainable="all",
            image_size=64,
            batch_size=32,
        ),
    )
}
STUDY_CONFIGS = [1, 2, 3, 4, 5, 6]
DEFAULT_CONFIGS = [*STUDY_CONFIGS, 7]

QUICK = {
    "image_size": 96,
    "batch_size": 8,
    "steps": 3,
    "warmup": 1,
    # One configuration with a trainable range and class weights: every framework's worker, all
    # three phases and the cross-framework checks, in a third of the time of three configurations
    # (the reuse of configuration 4's step by 5 is tested without running a worker).
    "configs": [6],
    "peak_size": 512,
}
FULL = {
    "image_size": 256,
    "batch_size": 32,
    "steps": 10,
    "warmup": 2,
    "configs": DEFAULT_CONFIGS,
    "peak_size": 2048,
}
# The matrix-product peak: calls timed after untimed warm-up calls.
PEAK_CALLS, PEAK_WARMUP = 10, 3


def study_class_weights() -> list[float]:
    """The study's w_c = (1 / count_c) * total / 2 for NORMAL, PNEUMONIA."""
    total = sum(STUDY_CLASS_COUNTS)
    return [total / (2 * c) for c in STUDY_CLASS_COUNTS]


# --- the parent ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI size: {QUICK['image_size']} px, batch {QUICK['batch_size']}, "
        f"{QUICK['steps']} steps, configuration {QUICK['configs']}",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (the markdown table goes beside it, same stem, .md); "
        "default benchmarks/results/throughput[-quick].json",
    )
    p.add_argument(
        "--configs",
        type=int,
        nargs="+",
        choices=sorted(CONFIGS),
        default=None,
        help="configurations to measure (default all: the study's six, 1-6, and 7, the "
        "no-ImageNet recipe's model; 5 reuses 4's step)",
    )
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    add_size_options(p)
    p.add_argument("--steps", type=int, default=None, help="timed calls after warm-up")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds; workers that would start after it are skipped and marked so (0 = no budget)",
    )
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=3600,
        help="seconds one framework may take on one configuration",
    )
    p.add_argument(
        "--keep-workdir",
        type=Path,
        default=None,
        help="keep the shared weights and the workers' jobs, results and logs here",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args  # a worker reads everything from its job file
    # Sizes given on the command line (or --quick's) apply to every configuration.
    args.given = {k for k in ("image_size", "batch_size") if getattr(args, k) is not None}
    if args.quick:
        args.given = {"image_size", "batch_size"}
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = (
            SCRIPT.parent
            / "results"
            / ("throughput-quick.json" if args.quick else "throughput.json")
        )
    return args


def add_size_options(p: argparse.ArgumentParser) -> None:
    """--batch-size, --image-size (each configuration's own unless given) and --peak-size."""
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per step (default {FULL['batch_size']}; configuration 7 its recipe's "
        f"{CONFIGS[7].batch_size}); given here, it applies to every configuration",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"pixels a side (default {FULL['image_size']}; configuration 7 its recipe's "
        f"{CONFIGS[7].image_size}); given here, it applies to every configuration",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="side of the square matrices of the matrix-product peak (default "
        f"{FULL['peak_size']}, {QUICK['peak_size']} with --quick)",
    )


def timed_configs(selected: list[StudyConfig]) -> list[int]:
    """The configurations whose step is measured: a reused step is measured once."""
    return sorted({c.same_step_as or c.number for c in selected})


def size_and_batch(args, cfg: StudyConfig) -> tuple[int, int]:
    """(image size, batch size) ``cfg`` is measured at: its own where it has them, unless the
    command line (or --quick) set them for every configuration."""
    given = getattr(args, "given", {"image_size", "batch_size"})
    size = args.image_size if "image_size" in given else cfg.image_size or args.image_size
    batch = args.batch_size if "batch_size" in given else cfg.batch_size or args.batch_size
    return size, batch


def plan_record(args, cfg: StudyConfig) -> dict:
    """The pneumojax plan: trainable layer names (Keras gets the same set) and counts, at the
    configuration's size (the head's first Dense layer grows with it)."""
    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.model import make_plan  # noqa: PLC0415

    size, batch = size_and_batch(args, cfg)
    plan = make_plan(get_backbone(cfg.backbone), cfg.cut, cfg.trainable, size)
    return {
        "trainable_layers": sorted(plan.trainable_layers),
        "trainable_params": plan.trainable_params,
        "frozen_params": plan.frozen_params,
        "image_size": size,
        "batch_size": batch,
    }


def make_job(args, cfg: StudyConfig, plan: dict, framework: str, weights: Path) -> dict:
    return {
        "name": f"config{cfg.number}-{framework}",
        "role": "measure",
        "framework": framework,
        "config": cfg.number,
        "backbone": cfg.backbone,
        "cut": cfg.cut,
        "trainable": cfg.trainable,
        "trainable_layers": plan["trainable_layers"],
        "class_weights": study_class_weights() if cfg.class_weights else None,
        "weights": str(weights),
        "batch_size": plan["batch_size"],
        "image_size": plan["image_size"],
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
    }


def framework_env(framework: str) -> dict[str, str]:
    """Keras's backend, and GPU memory left to the framework being measured: Keras-TF also
    imports JAX (which would otherwise claim most of a GPU) and TensorFlow must not grab a
    GPU in a JAX worker."""
    # Each framework runs as its users run it. Keras: without the XLA options pneumojax sets
    # for itself (pneumojax/xla_flags.py), which importing pneumojax's porting code would
    # otherwise set. pneumojax: with the glibc setting its command starts with
    # (pneumojax/hugepages.py), which a worker started by this script would otherwise lack.
    own = {}
    if framework.startswith("keras"):
        from pneumojax import xla_flags  # noqa: PLC0415

        ours = {f"{name}={value}" for name, value in xla_flags.CPU_FLAGS.items()}
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in ours)
        own = {xla_flags.OPT_OUT: "0", "XLA_FLAGS": flags}
    elif framework == "pneumojax":
        from pneumojax import hugepages  # noqa: PLC0415

        tunables = hugepages.tunables()
        own = {"GLIBC_TUNABLES": tunables} if tunables else {}
    if framework == "keras-tf":
        return {"KERAS_BACKEND": "tensorflow", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **own}
    return {
        "KERAS_BACKEND": KERAS_BACKENDS.get(framework, "jax"),
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        **own,
    }


def run_suite(args) -> dict:
    """Prepares the shared weights, runs every (configuration, framework) worker, collects."""
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())  # a busy machine makes every figure smaller
    selected = [CONFIGS[n] for n in args.configs]
    numbers = timed_configs(selected)
    plans = {n: plan_record(args, CONFIGS[n]) for n in numbers}
    results: dict[int, dict[str, dict]] = {n: {} for n in numbers}
    with common.workdir_of(args.keep_workdir, "pneumojax-throughput-") as workdir:
        peak = run_peak(args, workdir)
        weights = {n: workdir / f"weights-config{n}.npz" for n in numbers}
        print(f"preparing shared weights for configurations {numbers} ...", flush=True)
        prep = common.run_worker(
            SCRIPT,
            {
                "name": "prepare",
                "role": "prepare",
                "seed": args.seed,
                "configs": [
                    {
                        "number": n,
                        "image_size": plans[n]["image_size"],
                        "backbone": CONFIGS[n].backbone,
                        "cut": CONFIGS[n].cut,
                        "trainable_layers": plans[n]["trainable_layers"],
                        "weights": str(weights[n]),
                    }
                    for n in numbers
                ],
            },
            workdir,
            env=framework_env("keras-tf"),
            timeout=min(args.worker_timeout, args.time_budget or args.worker_timeout),
        )
        if "error" in prep:
            raise SystemExit(f"preparing weights failed: {prep['error']}\n{prep['log_tail']}")
        for n in numbers:
            for framework in args.frameworks:
                elapsed = time.perf_counter() - t0
                if args.time_budget and elapsed > args.time_budget:
                    results[n][framework] = {
                        "skipped": f"time budget of {args.time_budget:.0f} s "
                        "spent before this worker started"
                    }
                    continue
                timeout = args.worker_timeout
                if args.time_budget:  # a hard limit: a worker still running then is stopped
                    timeout = min(timeout, max(args.time_budget - elapsed, 1.0))
                print(f"config {n} ({CONFIGS[n].label}): {TITLES[framework]} ...", flush=True)
                result = common.run_worker(
                    SCRIPT,
                    make_job(args, CONFIGS[n], plans[n], framework, weights[n]),
                    workdir,
                    env=framework_env(framework),
                    timeout=timeout,
                )
                print("  " + one_line(result), flush=True)
                results[n][framework] = result
    wall_s = time.perf_counter() - t0
    return assemble(args, selected, plans, results, wall_s, load_before, peak)


def run_peak(args, workdir: Path) -> dict:
    """The machine's matrix-product peak, measured by a worker of its own before the others
    (plain JAX, none of pneumojax's settings): float32 and bfloat16 GFLOP/s, or the error."""
    print(f"matrix-product peak ({args.peak_size}x{args.peak_size}) ...", flush=True)
    job = {"name": "peak", "role": "peak", "n": args.peak_size}
    job.update(calls=PEAK_CALLS, warmup=PEAK_WARMUP)
    result = common.run_worker(SCRIPT, job, workdir, timeout=min(args.worker_timeout, 600))
    if "error" in result:
        print(f"  FAILED: {result['error']}\n{result.get('log_tail', '')}", flush=True)
        return {"n": args.peak_size, "error": result["error"]}
    print(
        f"  float32 {result['float32_gflops']:.1f} GFLOP/s, "
        f"bfloat16 {result['bfloat16_gflops']:.1f} GFLOP/s",
        flush=True,
    )
    return {k: v for k, v in result.items() if k not in ("versions", "process_wall_s")}


def one_line(result: dict) -> str:
    """A worker's outcome for the progress log."""
    if "skipped" in result:
        return f"SKIPPED: {result['skipped']}"
    if "error" in result:
        return f"FAILED: {result['error']}\n{result.get('log_tail', '')}"
    return (
        f"train {result['train']['images_per_s']:.2f} img/s, "
        f"inference {result['inference']['images_per_s']:.2f} img/s, "
        f"Grad-CAM {result['explain']['images_per_s']:.2f} img/s, "
        f"first step {result['train']['first_call_s']:.1f} s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )


def ratio(results: dict, phase: str, a: str, b: str) -> float | None:
    """Images/s of ``a`` over ``b`` in ``phase`` (one of PHASES), when both ran."""
    try:
        return results[a][phase]["images_per_s"] / results[b][phase]["images_per_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def checks(results: dict, plan: dict) -> dict:
    """Same model on every side: trainable parameter counts and the first batch's outputs."""
    ok = {fw: r for fw, r in results.items() if "train" in r}
    counts = {fw: r["trainable_params"] for fw, r in ok.items()}
    out = {
        "trainable_params": counts,
        "trainable_params_equal": len(set(counts.values()) | {plan["trainable_params"]}) == 1,
    }
    if "pneumojax" in ok:
        # Logits, not probabilities: a randomized ResNet152 saturates the sigmoid, where equal
        # probabilities would prove nothing. Relative to the logits' scale (1e5 there).
        ref = np.asarray(ok["pneumojax"]["probe_logits"])
        scale = max(float(np.max(np.abs(ref))), 1e-6)
        out["logit_diff_vs_pneumojax"] = {
            fw: float(np.max(np.abs(np.asarray(r["probe_logits"]) - ref))) / scale
            for fw, r in ok.items()
            if fw != "pneumojax"
        }
        # Grad-CAM maps, each image's map divided by its maximum: a map's scale is the
        # gradient's, so only where it points is compared.
        maps = normalized_maps(ok["pneumojax"]["probe_maps"])
        out["map_diff_vs_pneumojax"] = {
            fw: float(np.max(np.abs(normalized_maps(r["probe_maps"]) - maps)))
            for fw, r in ok.items()
            if fw != "pneumojax"
        }
    return out


def map_probe(maps: np.ndarray) -> list:
    """The first batch's maps as the result keeps them: every k-th pixel, at most PROBE_SIDE a
    side (the same pixels for every framework; full maps would make the JSON gigabytes)."""
    step = -(-maps.shape[1] // PROBE_SIDE)
    return np.asarray(maps, np.float32)[:, ::step, ::step].tolist()


def normalized_maps(maps) -> np.ndarray:
    maps = np.asarray(maps, np.float64)
    return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-30)


def flop_rates(results: dict, batch_size: int, peak: dict) -> dict:
    """Per phase (train, inference) and framework: the GFLOP/s achieved and its share of the
    float32 matrix-product peak (%). The work of a step is XLA's count of pneumojax's program,
    used for every framework: the same model on the same batch."""
    ours = results.get("pneumojax", {})
    out = {"achieved_gflops": {}, "percent_of_float32_peak": {}}
    for phase, key in (("train", "train_flops_per_step"), ("inference", "predict_flops_per_step")):
        flops = ours.get(key)
        rates = {
            fw: flops * r[phase]["images_per_s"] / batch_size / 1e9
            for fw, r in results.items()
            if flops and phase in r
        }
        out["achieved_gflops"][phase] = rates
        if peak.get("float32_gflops"):
            out["percent_of_float32_peak"][phase] = {
                fw: 100 * x / peak["float32_gflops"] for fw, x in rates.items()
            }
    return out


def assemble(
    args, selected, plans, results, wall_s: float, load_before: list[float], peak: dict
) -> dict:
    """The JSON payload: settings, machine, versions, and one entry per configuration."""
    configs = []
    for cfg in selected:
        n = cfg.same_step_as or cfg.number
        ours = results[n].get("pneumojax", {})
        entry = {
            **dataclasses.asdict(cfg),
            **plans[n],
            "measured_as": n,
            "results": results[n],
            "train_flops_per_step": ours.get("train_flops_per_step"),
            "predict_flops_per_step": ours.get("predict_flops_per_step"),
            **flop_rates(results[n], plans[n]["batch_size"], peak),
            "ratios": {
                f"pneumojax/{other}": {
                    phase: ratio(results[n], phase, "pneumojax", other) for phase in PHASES
                }
                for other in ("keras-tf", "keras-jax")
            },
            "checks": checks(results[n], plans[n]),
        }
        if cfg.same_step_as:
            entry["note"] = (
                f"train step identical to configuration {n} (oversampling only "
                "changes which images fill a batch): its measurement is reused, "
                "not repeated"
            )
        configs.append(entry)
    accelerators = next(
        (
            r["devices"]
            for rs in results.values()
            for fw, r in rs.items()
            if fw == "pneumojax" and "devices" in r
        ),
        [],
    )
    return {
        "benchmark": "throughput",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "quick": args.quick,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": "float32",
            "learning_rate": LEARNING_RATE,
            "seed": args.seed,
            "frameworks": args.frameworks,
            "configs": args.configs,
            "time_budget_s": args.time_budget or None,
        },
        "peak": peak,
        "hardware": {
            **common.hardware(),
            "load_average_before": load_before,
            "accelerators": accelerators,
        },
        "versions": {
            fw: r["versions"] for rs in results.values() for fw, r in rs.items() if "versions" in r
        },
        "wall_s": round(wall_s, 1),
        "configs": configs,
    }


# --- the table -------------------------------------------------------------------------------------


def _rate(result: dict, phase: str) -> str:
    if "error" in result:
        return "failed"
    if "skipped" in result:
        return "skipped"
    lo, hi = result[phase]["images_per_s_range"]
    return f"{result[phase]['images_per_s']:.2f} [{lo:.2f}–{hi:.2f}]"


def _ratio_cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _per_framework(entry: dict, frameworks, fmt) -> str:
    cells = []
    for fw in frameworks:
        r = entry["results"].get(fw, {})
        cells.append(fmt(r) if ("train" in r) else "–")
    return " / ".join(cells)


def _first_results(payload: dict) -> dict[str, dict]:
    """Each framework's first successful result (devices and settings are per process)."""
    out: dict[str, dict] = {}
    for e in payload["configs"]:
        for fw, r in e["results"].items():
            if "devices" in r:
                out.setdefault(fw, r)
    return out


def _size_cell(entry: dict, settings: dict) -> str:
    """A configuration's image size and batch, as "px / batch"."""
    size = entry.get("image_size", settings["image_size"])
    return f"{size} / {entry.get('batch_size', settings['batch_size'])}"


def _setting(payload: dict) -> str:
    """The suite's size and batch for the title, and any configuration's own."""
    s = payload["settings"]
    text = f"batch {s['batch_size']}, {s['image_size']}×{s['image_size']} px"
    own = [
        f"configuration {e['number']} at {e['image_size']} px, batch {e['batch_size']}"
        for e in payload["configs"]
        if (e.get("image_size", s["image_size"]), e.get("batch_size", s["batch_size"]))
        != (s["image_size"], s["batch_size"])
    ]
    return "; ".join([text, *own])


def _intro(payload: dict) -> list[str]:
    """Title, machine, versions and how to read the figures."""
    s, hw = payload["settings"], payload["hardware"]
    acc = ", ".join(a for a in hw["accelerators"] if not a.startswith("cpu")) or "none"
    versions = {k: v for r in payload["versions"].values() for k, v in r.items()}
    load_before, load_after = hw["load_average_before"][0], hw["load_average"][0]
    lines = [
        f"## Throughput: pneumojax vs Keras 3 (float32, {_setting(payload)}"
        f"{', QUICK' if s['quick'] else ''})",
        "",
        f"CPU: {hw['cpu']} ({hw['usable_cores']} usable cores of {hw['cpu_count']}, "
        f"{hw['memory_gb']} GB); accelerators: {acc}; 1-minute load average before the suite "
        f"{load_before:.2f}, after {load_after:.2f}.",
        "Versions: "
        + ", ".join(
            f"{k} {versions[k]}"
            for k in ("python", "jax", "jaxlib", "flax", "optax", "keras", "tensorflow")
            if k in versions
        )
        + ".",
        "Devices each framework used: "
        + "; ".join(
            f"{TITLES[fw]}: {', '.join(r['devices'])}"
            + (f" (Keras jit_compile={r['jit_compile']})" if "jit_compile" in r else "")
            for fw, r in _first_results(payload).items()
        )
        + ".",
        f"Figures: median images/s over {s['steps']} timed calls after {s['warmup']} warm-up "
        "call(s) (and the first, compiling, call), [slowest–fastest call] in brackets. "
        "Each framework ran alone in its own process. Ratios above 1 mean pneumojax is faster.",
        _peak_line(payload.get("peak") or {}),
    ]
    if load_before > 0.5:
        lines.append(
            f"**Warning:** the machine was busy before the suite started (load "
            f"{load_before:.2f}): other processes shared the cores, so these figures "
            "understate every framework and their ratios are noisy."
        )
    return lines + [""]


def _peak_line(peak: dict) -> str:
    """The matrix-product peak the FLOP/s table is measured against."""
    if "float32_gflops" not in peak:
        return f"Matrix-product peak: not measured ({peak.get('error', 'not run')})."
    n = peak["n"]
    return (
        f"Matrix-product peak of this machine, measured in this run: float32 "
        f"{peak['float32_gflops']:.1f} GFLOP/s, bfloat16 inputs with float32 results "
        f"{peak['bfloat16_gflops']:.1f} GFLOP/s (`jnp.dot` of two {n}×{n} matrices, 2n³ FLOPs, "
        f"median of {peak['calls']} calls after {peak['warmup']} warm-up calls, in a process "
        "of its own)."
    )


def _rate_table(payload: dict, phase: str) -> str:
    """Images/s per framework and pneumojax's ratios, one row per configuration."""
    fws = payload["settings"]["frameworks"]
    others = [o for o in ("keras-tf", "keras-jax") if o in fws and "pneumojax" in fws]
    header = [
        "config",
        "model",
        "px / batch",
        *[TITLES[f] for f in fws],
        *[f"pneumojax / {TITLES[o]}" for o in others],
    ]
    rows = []
    for e in payload["configs"]:
        label = e["label"]
        if e["same_step_as"]:
            label += f" (= config {e['same_step_as']}'s step, not re-measured)"
        rows.append(
            [
                str(e["number"]),
                label,
                _size_cell(e, payload["settings"]),
                *[_rate(e["results"].get(f, {"skipped": True}), phase) for f in fws],
                *[_ratio_cell(e["ratios"][f"pneumojax/{o}"][phase]) for o in others],
            ]
        )
    return common.markdown_table(header, rows)


def _flops_table(payload: dict) -> str:
    """Work per step (XLA's count) and the FLOP/s each framework achieved, beside the peak."""
    fws = payload["settings"]["frameworks"]
    order = " / ".join(TITLES[f] for f in fws)

    def cells(e, key, phase, fmt):
        values = e.get(key, {}).get(phase, {})
        return " / ".join(fmt(values[f]) if f in values else "–" for f in fws)

    def gflop(flops):
        return "–" if not flops else f"{flops / 1e9:.2f}"

    header = [
        "config",
        "px / batch",
        "GFLOP per train step",
        f"achieved GFLOP/s training ({order})",
        f"% of float32 matmul peak ({order})",
        "GFLOP per predict batch",
        f"achieved GFLOP/s inference ({order})",
    ]
    rows = [
        [
            str(e["number"]),
            _size_cell(e, payload["settings"]),
            gflop(e.get("train_flops_per_step")),
            cells(e, "achieved_gflops", "train", lambda x: f"{x:.1f}"),
            cells(e, "percent_of_float32_peak", "train", lambda x: f"{x:.1f}%"),
            gflop(e.get("predict_flops_per_step")),
            cells(e, "achieved_gflops", "inference", lambda x: f"{x:.1f}"),
        ]
        for e in payload["configs"]
    ]
    return common.markdown_table(header, rows)


def _resource_table(payload: dict) -> str:
    """Set-up, compile, memory and core use, and the checks that the models are the same."""
    fws = payload["settings"]["frameworks"]
    order = " / ".join(TITLES[f] for f in fws)
    header = [
        "config",
        f"model setup s ({order})",
        f"first train step s ({order})",
        f"first predict s ({order})",
        f"first Grad-CAM s ({order})",
        f"peak RSS MB ({order})",
        f"cores used training ({order})",
        "trainable params",
        "first-batch logits: max abs diff vs pneumojax / max abs logit",
        "Grad-CAM maps (each over its maximum): max abs diff vs pneumojax",
    ]
    rows = []
    for e in payload["configs"]:
        counts = e["checks"]["trainable_params"]
        params = (
            f"{e['trainable_params']:,}"
            if e["checks"]["trainable_params_equal"]
            else "DIFFER: " + ", ".join(f"{TITLES[fw]} {n:,}" for fw, n in counts.items())
        )
        diffs = e["checks"].get("logit_diff_vs_pneumojax", {})
        map_diffs = e["checks"].get("map_diff_vs_pneumojax", {})
        rows.append(
            [
                str(e["number"]),
                _per_framework(e, fws, lambda r: f"{r['setup_s']:.1f}"),
                _per_framework(e, fws, lambda r: f"{r['train']['first_call_s']:.1f}"),
                _per_framework(e, fws, lambda r: f"{r['inference']['first_call_s']:.1f}"),
                _per_framework(e, fws, lambda r: f"{r['explain']['first_call_s']:.1f}"),
                _per_framework(e, fws, lambda r: f"{r['peak_rss_mb']:.0f}"),
                _per_framework(e, fws, lambda r: f"{r['train']['cores_used']:.2f}"),
                params,
                ", ".join(f"{TITLES[fw]} {d:.1e}" for fw, d in diffs.items()) or "–",
                ", ".join(f"{TITLES[fw]} {d:.1e}" for fw, d in map_diffs.items()) or "–",
            ]
        )
    return common.markdown_table(header, rows)


def _device_memory_table(payload: dict) -> str | None:
    """Peak accelerator memory, when any worker ran on one."""
    fws = payload["settings"]["frameworks"]
    entries = [
        e for e in payload["configs"] if any(r.get("peak_device_mb") for r in e["results"].values())
    ]
    if not entries:
        return None
    rows = [
        [
            str(e["number"]),
            _per_framework(
                e, fws, lambda r: f"{r['peak_device_mb']:.0f}" if r.get("peak_device_mb") else "?"
            ),
        ]
        for e in entries
    ]
    return common.markdown_table(["config", f"MB ({' / '.join(TITLES[f] for f in fws)})"], rows)


def render_markdown(payload: dict) -> str:
    """The tables a reader looks at: training, inference, then set-up/memory/cores."""
    lines = _intro(payload)
    lines += [
        "### Training: real train step, no feature cache (images/s)",
        "",
        _rate_table(payload, "train"),
        "",
        "### Inference: predict on one batch of host images (images/s)",
        "",
        _rate_table(payload, "inference"),
        "",
        "### Heat maps: Grad-CAM of one batch of host images (images/s)",
        "",
        "At the backbone's default layer (pneumojax.heatmaps.default_layer), the gradient of "
        "the PNEUMONIA logit, maps upsampled to the input size: pneumojax's `Explainer` "
        "(`pneumojax explain`), and for Keras the keras.io recipe (a model that also returns "
        "the layer's output, `tf.GradientTape` in a `tf.function`) or, on JAX, the same model "
        "split at the layer, `stateless_call` under `jax.grad` and `jax.jit`.",
        "",
        _rate_table(payload, "explain"),
        "",
        "### Work done: FLOP/s achieved, beside the matrix-product peak",
        "",
        "FLOPs per step as XLA's cost analysis counts them in pneumojax's compiled program "
        "(training: `Steps.train`; inference: the predict step, preprocessing included), used "
        "for every framework: each runs the same model on the same batch, so the figure is "
        "the rate at which it gets that work done. Achieved GFLOP/s = FLOPs per step × "
        "images/s / batch. The peak is the float32 matrix product above; inference also "
        "copies host images to the device, which counts no FLOPs.",
        "",
        _flops_table(payload),
        "",
        "### Set-up, compile, memory, core use",
        "",
        _resource_table(payload),
        "",
    ]
    device = _device_memory_table(payload)
    if device:
        lines += ["### Peak device memory", "", device, ""]
    lines += [f"Config {e['number']}: {e['note']}." for e in payload["configs"] if e.get("note")]
    failed = [
        f"config {e['number']} {TITLES[fw]}: {r.get('error') or r.get('skipped')}"
        for e in payload["configs"]
        for fw, r in e["results"].items()
        if "error" in r or "skipped" in r
    ]
    lines += [f"Not measured: {f}." for f in dict.fromkeys(failed)]
    lines.append(f"Total wall time of the suite: {payload['wall_s']:.0f} s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    payload = run_suite(args)
    markdown = render_markdown(payload)
    md = common.write_outputs(args.out, payload, markdown)
    print(markdown)
    print(f"\nwrote {args.out} and {md}")
    failed = [
        f"config {e['number']} {fw}"
        for e in payload["configs"]
        for fw, r in e["results"].items()
        if "error" in r
    ]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


# --- the workers -------------------------------------------------------------------------------


def worker_main(job_path: str) -> int:
    job = common.read_job(job_path)
    if job["role"] == "prepare":
        result = prepare_weights(job)
    elif job["role"] == "peak":
        result = measure_peak(job)
    elif job["framework"] == "pneumojax":
        result = measure_pneumojax(job)
    else:
        result = measure_keras(job)
    common.write_result(job, result)
    return 0


def prepare_weights(job: dict) -> dict:
    """Builds each configuration's Keras model, randomizes every backbone variable (BatchNorm
    statistics included) and saves backbone + head weights for all three frameworks."""
    import keras  # noqa: PLC0415

    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from ports.keras_port import randomize_keras_model, weights_of_keras_model  # noqa: PLC0415

    for cfg in job["configs"]:
        keras.utils.set_random_seed(job["seed"])  # the head's Glorot draws
        base, model = common.build_keras_classifier(
            get_backbone(cfg["backbone"]), cfg["cut"], cfg["trainable_layers"], cfg["image_size"]
        )
        randomize_keras_model(base, job["seed"])
        everything = weights_of_keras_model(model)
        common.save_weights(
            Path(cfg["weights"]),
            {
                "backbone": weights_of_keras_model(base),
                "head": {k: everything[k] for k in common.HEAD_LAYERS},
            },
        )
    return {"prepared": [c["number"] for c in job["configs"]]}


def measure_peak(job: dict) -> dict:
    """GFLOP/s of ``jnp.dot`` of two n x n matrices (2 n^3 FLOPs a product) in float32 and in
    bfloat16 with float32 results, at JAX's default precision: the median of ``calls`` timed
    calls after ``warmup`` untimed ones, inputs already on the device."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    n = job["n"]
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    out = {"n": n, "calls": job["calls"], "warmup": job["warmup"]}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
        for _ in range(1 + job["warmup"]):  # the first call compiles
            jax.block_until_ready(dot(a, b))
        times = []
        for _ in range(job["calls"]):
            t = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            times.append(time.perf_counter() - t)
        median = float(np.median(times))
        out[f"{name}_median_s"] = median
        out[f"{name}_gflops"] = 2 * n**3 / median / 1e9
    out["devices"] = common.accelerators_jax()
    return out


def fixed_batch(job: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one batch every framework sees: smooth random uint8 images, labels about 1:3
    NORMAL:PNEUMONIA as in the data set, per-sample weights (class weights or ones)."""
    from ports.keras_port import parity_batch  # noqa: PLC0415

    n = job["batch_size"]
    images = parity_batch(job["image_size"], n=n, seed=job["seed"])
    labels = np.resize(np.array([0, 1, 1, 1], np.int32), n)
    weights = (
        np.asarray(job["class_weights"], np.float32)[labels]
        if job["class_weights"]
        else np.ones(n, np.float32)
    )
    return images, labels, weights


def pneumojax_step(
    backbone: str,
    cut: str,
    trainable: str,
    image_size: int,
    seed: int,
    weights: dict | None = None,
    dtype=None,
):
    """(plan, ``Steps``, variables) of the pneumojax classifier the suite measures: the
    backbone and head from ``weights`` (as ``prepare_weights`` saves them) or, without them,
    Keras-style random ones (a step's speed does not depend on the values); computing in
    ``dtype`` (float32 when None) with float32 parameters, as ``--precision`` does."""
    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.model import build_classifier, init_variables, make_plan
    from pneumojax.optim import make_optimizer
    from pneumojax.step import Steps, make_mesh  # noqa: PLC0415
    from ports.keras_port import port_keras_weights  # noqa: PLC0415

    info = get_backbone(backbone)
    plan = make_plan(info, cut, trainable, image_size)
    model = build_classifier(info, plan.cut, plan.trainable_layers, *([dtype] if dtype else []))
    ported = None if weights is None else port_keras_weights(weights["backbone"], info, image_size)
    variables = init_variables(model, image_size, seed, ported)
    if weights is not None:
        for layer in common.HEAD_LAYERS:  # the Keras head's values, not pneumojax's own draws
            variables["params"][layer] = {
                k: np.asarray(v) for k, v in weights["head"][layer].items()
            }
    steps = Steps(
        model,
        make_optimizer(variables["params"], plan.trainable_layers, LEARNING_RATE),
        make_mesh(),
    )
    return plan, steps, variables


def measure_pneumojax(job: dict) -> dict:
    """pneumojax: ``Steps.train`` on the full classifier (no feature cache), ``predict_logits``."""
    import jax  # noqa: PLC0415

    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.heatmaps import Explainer, default_layer  # noqa: PLC0415
    from pneumojax.step import predict_logits  # noqa: PLC0415

    rss_after_import = common.peak_rss_mb()
    images, labels, weights = fixed_batch(job)
    size, batch_size = job["image_size"], job["batch_size"]
    t0 = time.perf_counter()
    plan, steps, variables = pneumojax_step(
        job["backbone"],
        job["cut"],
        job["trainable"],
        size,
        job["seed"],
        common.load_weights(job["weights"]),
    )
    predict_variables = jax.device_put(variables, steps.replicated)
    # pneumojax explain's maps: the classifier's variables as a one-member run holds them.
    explainer = Explainer(
        job["backbone"],
        plan.cut,
        jax.tree.map(lambda v: np.asarray(v)[None], variables),
        "gradcam",
        default_layer(get_backbone(job["backbone"]), plan.cut),
        batch_size,
    )
    # Training runs K=1 member: state and batch carry a leading member axis.
    holder = {"state": steps.init_state([variables]), "losses": []}
    batch = steps.shard(
        {"image": images[None], "label": labels[None], "weight": weights[None]}, members=True
    )
    keys = jax.random.key(job["seed"])[None]
    jax.block_until_ready((holder["state"], batch, predict_variables))
    setup_s = time.perf_counter() - t0

    probes, probe_maps = [], []

    def predict():
        logits = predict_logits(steps, predict_variables, images, batch_size)  # numpy: blocks
        if not probes:
            probes.append(logits)

    def explain():
        maps = explainer.maps(images)  # numpy: blocks
        if not probe_maps:
            probe_maps.append(maps)

    def train():
        holder["state"], metrics = steps.train(holder["state"], batch, keys)
        jax.block_until_ready((holder["state"], metrics))
        holder["losses"].append(float(metrics["loss"][0]))

    inference = common.time_calls(predict, job["steps"], job["warmup"], batch_size)
    explaining = common.time_calls(explain, job["steps"], job["warmup"], batch_size)
    training = common.time_calls(train, job["steps"], job["warmup"], batch_size)
    return {
        "framework": "pneumojax",
        "config": job["config"],
        **pneumojax_flops(steps, (holder["state"], batch, keys), (predict_variables, images)),
        "setup_s": setup_s,
        "rss_after_import_mb": rss_after_import,
        "devices": common.accelerators_jax(),
        "peak_device_mb": common.peak_device_mb_jax(),
        "train": training,
        "inference": inference,
        "explain": explaining,
        "trainable_params": plan.trainable_params,
        "first_loss": holder["losses"][0],
        "last_loss": holder["losses"][-1],
        "probe_logits": probes[0].tolist(),
        "probe_maps": map_probe(probe_maps[0]),
        "step": "Steps.train (jit, batch sharded over a 'data' mesh axis, 1 member)",
    }


def pneumojax_flops(steps, train_args: tuple, predict_args: tuple) -> dict:
    """The work of one train step and one predict batch, for FLOP/s: the programs just timed
    (``predict_logits`` jits ``steps.predict`` once, in ``steps._jitted``), whose compiled
    form JAX serves from its cache."""
    train_flops, source = step_flops(steps.train, *train_args)
    predict = steps._jitted.get(steps.predict)
    predict_flops, _ = step_flops(predict, *predict_args) if predict else (None, None)
    return {
        "train_flops_per_step": train_flops,
        "predict_flops_per_step": predict_flops,
        "flops_counted_by": source,
    }


def step_flops(jitted, *args) -> tuple[float | None, str | None]:
    """FLOPs of one call of ``jitted`` on ``args`` as XLA's cost analysis counts them, and
    which program was counted: the compiled one, or where the backend counts nothing there,
    the program before XLA's optimisations. (None, None) when neither has a count."""
    lowered = jitted.lower(*args)
    for source, analysis in (
        ("compiled program", lambda: lowered.compile().cost_analysis()),
        ("program before optimisation", lowered.cost_analysis),
    ):
        try:
            costs = analysis() or {}
            # A dict, or in some JAX versions a list with one dict per program.
            flops = sum(
                c.get("flops", 0.0) for c in ([costs] if isinstance(costs, dict) else costs)
            )
        except Exception:  # noqa: BLE001 (a backend without a cost model: try the next)
            continue
        if flops > 0:
            return float(flops), source
    return None, None


def device_tensor(keras, x: np.ndarray):
    """``x`` placed on the backend's first accelerator (or CPU), so steps do not copy it."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        gpus = tf.config.list_logical_devices("GPU")
        with tf.device(gpus[0].name if gpus else "/CPU:0"):
            return tf.identity(tf.convert_to_tensor(x))
    return keras.ops.convert_to_tensor(x)


def keras_logits(keras, model, x: np.ndarray) -> np.ndarray:
    """The pre-sigmoid outputs of the last Dense layer (Keras's model ends in the sigmoid)."""
    last = model.get_layer(common.HEAD_LAYERS[1])
    hidden = keras.Model(model.inputs, last.input).predict_on_batch(x)
    kernel, bias = (np.asarray(w) for w in last.get_weights())
    return np.asarray(hidden, np.float64) @ kernel + bias


def keras_gradcam(keras, model, layer: str, image_size: int):
    """Grad-CAM as a Keras user writes it, compiled as each backend compiles: a function of a
    batch of preprocessed host images returning (n, S, S) maps, the ReLU of the layer's
    activations weighted by the spatial mean of the PNEUMONIA logit's gradient, upsampled
    bilinearly. On TensorFlow the keras.io recipe (a model that also returns the layer's
    output, ``tf.GradientTape``) in a ``tf.function``; on JAX the model split at the layer,
    ``stateless_call`` under ``jax.grad`` and ``jax.jit``."""
    last = model.get_layer(common.HEAD_LAYERS[1])
    kernel, bias = (np.asarray(w)[..., 1] for w in last.get_weights())  # the logit, not sigmoid
    activation = model.get_layer(layer).output
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        grad_model = keras.Model(model.inputs, [activation, last.input])

        @tf.function
        def maps(x):
            with tf.GradientTape() as tape:
                a, hidden = grad_model(x, training=False)
                score = tf.reduce_sum(tf.linalg.matvec(hidden, kernel) + bias)
            weights = tf.reduce_mean(tape.gradient(score, a), axis=(1, 2))
            cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", a, weights))
            return tf.image.resize(cam[..., None], (image_size, image_size), "bilinear")[..., 0]

        return lambda x: maps(x).numpy()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    below = keras.Model(model.inputs, activation)
    above = keras.Model(activation, last.input)

    def values():  # the variables as they are now (Keras's own steps replace their arrays)
        return [
            ([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])
            for m in (below, above)
        ]

    @jax.jit
    def maps(values, x):
        (tb, nb), (ta, na) = values
        a, _ = below.stateless_call(tb, nb, x, training=False)

        def score(a):
            hidden, _ = above.stateless_call(ta, na, a, training=False)
            return (hidden @ kernel + bias).sum()

        weights = jax.grad(score)(a).mean(axis=(1, 2))
        cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", a, weights))
        return jax.image.resize(cam, (cam.shape[0], image_size, image_size), "bilinear")

    return lambda x: np.asarray(maps(values(), x))


def keras_devices(keras) -> tuple[list[str], float | None]:
    """The backend's devices and the peak memory used on its first GPU (None on CPU)."""
    if keras.backend.backend() == "jax":
        return common.accelerators_jax(), common.peak_device_mb_jax()
    import tensorflow as tf  # noqa: PLC0415

    gpus = tf.config.list_physical_devices("GPU")
    devices = [f"{d.device_type.lower()}: {d.name}" for d in tf.config.list_physical_devices()]
    if gpus:  # the GPU's name, as JAX's device_kind gives it
        details = tf.config.experimental.get_device_details(gpus[0])
        devices[devices.index(f"gpu: {gpus[0].name}")] += f" ({details.get('device_name', '?')})"
    try:
        peak = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
    except (ValueError, RuntimeError):  # no GPU
        peak = None
    return devices, peak


def measure_keras(job: dict) -> dict:
    """Keras 3 on the backend in KERAS_BACKEND: ``train_on_batch``, ``predict_on_batch``."""
    import keras  # noqa: PLC0415

    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.heatmaps import default_layer  # noqa: PLC0415
    from ports.keras_port import keras_preprocess, set_keras_weights  # noqa: PLC0415

    rss_after_import = common.peak_rss_mb()
    images, labels, weights = fixed_batch(job)
    batch_size = job["batch_size"]
    t0 = time.perf_counter()
    # No keras.utils.set_random_seed: it imports TensorFlow even on the JAX backend, which
    # would inflate Keras-JAX's memory; dropout masks need not be reproducible here.
    info = get_backbone(job["backbone"])
    _, model = common.build_keras_classifier(
        info, job["cut"], job["trainable_layers"], job["image_size"]
    )
    source = common.load_weights(job["weights"])
    set_keras_weights(model, {**source["backbone"], **source["head"]})
    common.compile_keras(model, LEARNING_RATE)
    x_host = keras_preprocess(info, images)  # the study's preprocess_input, on the host
    x = device_tensor(keras, x_host)
    y = device_tensor(keras, np.eye(2, dtype=np.float32)[labels])
    sample_weight = device_tensor(keras, weights) if job["class_weights"] else None
    setup_s = time.perf_counter() - t0

    losses = []

    def predict():
        model.predict_on_batch(x_host)  # returns numpy: blocks

    def train():
        logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
        losses.append(float(logs["loss"]))  # numpy logs: the step has finished

    gradcam = keras_gradcam(keras, model, default_layer(info, job["cut"]), job["image_size"])
    probe_maps = []

    def explain():
        maps = gradcam(x_host)  # numpy: blocks
        if not probe_maps:
            probe_maps.append(maps)

    # Before any training step: the same weights pneumojax's probe saw.
    probe = keras_logits(keras, model, x_host)
    inference = common.time_calls(predict, job["steps"], job["warmup"], batch_size)
    explaining = common.time_calls(explain, job["steps"], job["warmup"], batch_size)
    training = common.time_calls(train, job["steps"], job["warmup"], batch_size)
    devices, peak_device = keras_devices(keras)
    return {
        "framework": job["framework"],
        "config": job["config"],
        "setup_s": setup_s,
        "rss_after_import_mb": rss_after_import,
        "devices": devices,
        "peak_device_mb": peak_device,
        "train": training,
        "inference": inference,
        "explain": explaining,
        "trainable_params": common.keras_trainable_params(model),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "probe_logits": probe.tolist(),
        "probe_maps": map_probe(probe_maps[0]),
        "keras_backend": keras.backend.backend(),
        "jit_compile": model.jit_compile,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "step": "model.train_on_batch (Keras's compiled train function)",
    }


if __name__ == "__main__":
    sys.exit(main())
