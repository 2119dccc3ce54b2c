"""Where a run finds its inputs and keeps what it makes between runs: the cache and checkpoint
folders, data folders, ported weights, decoded splits, and the small JSON files of a run folder."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from pneumojax import data
from pneumojax.data.sample import SAMPLE_DIR
from pneumojax.checkpoint import load_variables
from pneumojax.io import write_text_atomic


def cache_dir() -> Path:
    """Where decoded images and generated data live between runs."""
    return Path(os.environ.get("PNEUMOJAX_CACHE", Path.home() / ".cache" / "pneumojax"))


def checkpoints_dir() -> Path:
    return Path(os.environ.get("PNEUMOJAX_CHECKPOINTS", "checkpoints"))


def warn_via(log: Callable[[str], None]) -> Callable[[str], None]:
    """A ``warn`` callback that logs ``warning: ...`` lines."""
    return lambda message: log(f"warning: {message}")


def resolve_data(
    spec: str, log: Callable[[str], None] = print, strict: bool = False, one_class: bool = False
) -> data.DataSource:
    """``demo`` makes (once) and uses the synthetic set; ``sample`` is the real X-ray sample
    shipped inside pneumojax (:mod:`pneumojax.data.sample`); anything else is a data folder.

    Unreadable images are skipped with one warning (or stop the run with ``strict``);
    ``one_class`` accepts a flat folder of one class (scoring only)."""
    kwargs = dict(strict=strict, warn=warn_via(log), cache_dir=cache_dir() / "images")
    if one_class:
        kwargs["one_class"] = True
    if spec == "demo":
        folder = data.make_demo_dataset(cache_dir() / "demo")
        log(
            f"data: SYNTHETIC demo images ({folder}), not real X-rays: for trying the pipeline only"
        )
        return data.find_images(folder, **kwargs)
    if spec == "sample":
        log(
            f"data: the real chest X-ray sample shipped with pneumojax ({SAMPLE_DIR}: 400 Kermany "
            "images at 128 px, CC BY 4.0, see its ATTRIBUTION.md): for trying pneumojax only"
        )
        return data.find_images(SAMPLE_DIR, **kwargs)
    return data.find_images(spec, **kwargs)


def resolve_weights(weights: str, backbone: str) -> tuple[dict | None, dict]:
    """``none`` | ``imagenet`` (the ported checkpoint) | a checkpoint folder."""
    if weights == "none":
        return None, {"weights": "none"}
    folder = checkpoints_dir() / f"{backbone}-imagenet" if weights == "imagenet" else Path(weights)
    if weights == "imagenet" and not folder.exists():
        raise FileNotFoundError(
            f"no ported ImageNet checkpoint at {folder}. Make it with `pneumojax port --backbone "
            f"{backbone} --weights imagenet` (needs internet once), or train from Keras's random "
            "init with --weights none"
        )
    variables, manifest = load_variables(folder)
    if manifest.get("backbone") != backbone:
        raise ValueError(
            f"checkpoint {folder} holds {manifest.get('backbone')} weights, not {backbone}"
        )
    return variables, {"weights": str(folder), "weights_sha256": manifest.get("weights_sha256")}


def load_split_arrays(
    items, image_size: int, log=print, resize: str = "antialias"
) -> tuple[np.ndarray, np.ndarray]:
    images = data.load_images(items, image_size, cache_dir=cache_dir() / "images", resize=resize)
    labels = np.array([label for _, label in items], np.int32)
    return images, labels


def environment() -> dict:
    """The software and devices a run ran on (for config.json)."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        # how glibc allocates (pneumojax.hugepages: the command sets glibc.malloc.hugetlb=1)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, payload: dict):
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
