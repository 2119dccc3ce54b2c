"""What the benchmark scripts share: worker subprocesses, timing, the Keras model, tables.

Every framework is measured in its own subprocess (a worker) so that none shares threads,
allocators or memory with another; the parent hands each a JSON job and reads a JSON result.
This module imports neither JAX nor TensorFlow at the top, so each worker pays only for the
framework it measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEAD_LAYERS = ("dense", "dense_1")  # the head's Dense layers, named as pneumojax names them


# --- workers -----------------------------------------------------------------------------------


def run_worker(
    script: Path,
    job: dict,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict:
    """Runs ``script --worker JOB.json`` in a fresh interpreter; returns its JSON result.

    A failed or timed-out worker gives ``{"error": ..., "log_tail": ...}`` instead of raising,
    so one broken framework does not lose the others' figures.
    """
    name = job["name"]
    job_file, result_file, log_file = (
        workdir / f"{name}.{ext}" for ext in ("job.json", "result.json", "log")
    )
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=1))
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.perf_counter()
    try:
        with open(log_file, "w") as log:
            proc = subprocess.run(
                [sys.executable, str(script), "--worker", str(job_file)],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=REPO,
            )
        failure = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    if failure is None and result_file.exists():
        result = json.loads(result_file.read_text())
        result["process_wall_s"] = round(wall, 2)
        return result
    return {
        "error": failure or "no result written",
        "process_wall_s": round(wall, 2),
        "log_tail": tail(log_file),
    }


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file (for error reports)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_job(path: str) -> dict:
    return json.loads(Path(path).read_text())


def write_result(job: dict, result: dict) -> None:
    """The worker's answer, plus the memory and versions every result carries."""
    result = {**result, "peak_rss_mb": peak_rss_mb(), "versions": versions()}
    Path(job["result"]).write_text(json.dumps(result, indent=1, default=_plain))


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# --- measuring ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(seconds: list[float], batch_size: int) -> dict:
    """Median and spread of per-call times, and the images/s they mean."""
    s = np.asarray(seconds, np.float64)
    q1, median, q3 = np.percentile(s, [25, 50, 75])
    return {
        "n": int(s.size),
        "median_s": float(median),
        "min_s": float(s.min()),
        "max_s": float(s.max()),
        "iqr_s": [float(q1), float(q3)],
        "images_per_s": batch_size / float(median),
        # Fastest and slowest calls bound the rate; IQR is the typical spread.
        "images_per_s_range": [batch_size / float(s.max()), batch_size / float(s.min())],
        "images_per_s_iqr": [batch_size / float(q3), batch_size / float(q1)],
    }


def time_calls(call: Callable[[], object], steps: int, warmup: int, batch_size: int) -> dict:
    """Times ``call`` (which must block until its results exist): the first call (trace and
    compile), ``warmup`` untimed calls, then ``steps`` timed calls with the CPU time they used.
    """
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    times = []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall0
    return {
        "first_call_s": first,
        "warmup": warmup,
        **summarize(times, batch_size),
        # Cores kept busy on average: CPU seconds per wall second over the timed calls.
        "cores_used": (cpu_seconds() - cpu0) / wall,
    }


# --- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def hardware() -> dict:
    """What the figures were measured on (accelerators come from the workers' device lists)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": memory_gb(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def versions() -> dict:
    """Versions of the numerical packages this process has imported."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("jax", "jaxlib", "flax", "optax", "keras", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def accelerators_jax() -> list[str]:
    """JAX's devices as 'platform: kind' (CPU included)."""
    import jax  # noqa: PLC0415

    return [f"{d.platform}: {d.device_kind}" for d in jax.devices()]


def peak_device_mb_jax() -> float | None:
    """Peak memory in use on JAX's first device, where the backend reports it (GPUs do)."""
    import jax  # noqa: PLC0415

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**20, 1) if peak is not None else None


# --- Keras side ----------------------------------------------------------------------------------


def build_keras_classifier(
    info, cut: str, trainable_layers, input_size: int, weights: str | None = None
):
    """The study's Keras model: ``keras.applications`` backbone up to ``cut``, then Flatten,
    Dense(128, relu), Dropout(0.1), Dense(2, sigmoid); backbone frozen except
    ``trainable_layers``. Returns ``(backbone, classifier)``; the backbone is the whole
    ``include_top=False`` model, whose variables include layers after the cut.
    """
    import keras  # noqa: PLC0415

    from ports.keras_port import build_keras_model  # noqa: PLC0415

    base = build_keras_model(info, input_size, weights)
    trainable_layers = set(trainable_layers)
    for layer in base.layers:
        layer.trainable = layer.name in trainable_layers
    x = keras.layers.Flatten(name="flatten")(base.get_layer(cut).output)
    x = keras.layers.Dense(128, activation="relu", name=HEAD_LAYERS[0])(x)
    x = keras.layers.Dropout(0.1, name="dropout")(x)
    out = keras.layers.Dense(2, activation="sigmoid", name=HEAD_LAYERS[1])(x)
    return base, keras.Model(base.inputs, out, name=f"{info.name}_classifier")


def compile_keras(model, learning_rate: float = 1e-3) -> None:
    """As the study: Adam, binary cross-entropy on one-hot labels, accuracy."""
    import keras  # noqa: PLC0415

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )


def keras_trainable_params(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


# --- weights shared between frameworks -------------------------------------------------------


def save_weights(path: Path, groups: dict[str, dict[str, dict[str, np.ndarray]]]) -> None:
    """``{group: {layer: {weight: array}}}`` into one .npz (keys ``group/layer/weight``)."""
    flat = {
        f"{g}/{layer}/{w}": a
        for g, layers in groups.items()
        for layer, ws in layers.items()
        for w, a in ws.items()
    }
    np.savez(path, **flat)


def load_weights(path: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """The inverse of :func:`save_weights`."""
    out: dict = {}
    with np.load(path) as npz:
        for key in npz.files:
            group, layer, weight = key.split("/")
            out.setdefault(group, {}).setdefault(layer, {})[weight] = npz[key]
    return out


# --- tables ----------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, payload: dict, markdown: str) -> Path:
    """``out`` (JSON) and the table beside it (same stem, ``.md``); returns the .md path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=_plain) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown + "\n")
    return md


@contextlib.contextmanager
def workdir_of(keep: Path | None, prefix: str = "pneumojax-benchmark-"):
    """``keep`` (created) if given (``--keep-workdir``), else a temporary folder removed
    afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
