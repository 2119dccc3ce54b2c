"""Frozen-prefix activation cache: compute what the frozen part feeds the trainable part once.

A frozen prefix that sees no random augmentation gives the same activations every epoch, so
they are computed once per (weights, images, image size, cut, trainable layers), stored on disk
(memory-mapped) and the trainable suffix trains on them. Keras pays the whole backbone again in
every epoch.

Storage follows the compute precision by default, which makes training on the cache identical
to training the full model. ``storage="bfloat16"`` under float32 compute halves the cache
(tested to give the same metrics within their intervals, not identical ones).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from pneumojax.backbones import (
    BackboneInfo,
    KerasGraph,
    backbone_model,
    frozen_frontier,
    preprocess,
)
from pneumojax.intensity import normalize_intensity
from pneumojax.data import DataWarning
from pneumojax.io import (
    allocate,
    array_digest,
    check_space,
    remove_stale_staging,
    write_text_atomic,
)


class Prefix(nn.Module):
    """uint8 images -> the frozen activations at ``backbone.outputs`` (inference mode)."""

    backbone: KerasGraph
    preprocess_mode: str
    intensity: str = "none"

    def __call__(self, images):
        x = normalize_intensity(images, self.intensity)
        return self.backbone(preprocess(x, self.preprocess_mode, self.backbone.dtype))


def cacheable_frontier(info: BackboneInfo, cut: str, trainable: frozenset[str]) -> tuple[str, ...]:
    """The layers whose activations to cache, or () when nothing frozen precedes training."""
    frontier = frozen_frontier(info.layers, cut, trainable)
    return () if "input_layer" in frontier else frontier


def prefix_model(
    info: BackboneInfo, frontier: tuple[str, ...], dtype=None, intensity: str = "none"
) -> Prefix:
    kwargs = {} if dtype is None else {"dtype": dtype}
    return Prefix(backbone_model(info, outputs=frontier, **kwargs), info.preprocess_mode, intensity)


STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def storage_dtype(storage: str | None, compute) -> np.dtype:
    """``--feature-cache-dtype``: auto stores what the prefix computes (exact); bfloat16 halves
    a float32 cache."""
    if storage in (None, "auto"):
        return np.dtype(compute)
    if storage not in STORAGE:
        raise ValueError(
            f"unknown feature cache dtype {storage!r}; choose auto, float32 or bfloat16"
        )
    return STORAGE[storage]


DIGESTS = "sha256.json"  # beside a cache's arrays: the SHA-256 of each, written with it


def _whole(folder: Path, names, n: int, dtype: np.dtype) -> tuple[dict | None, str]:
    """A finished cache folder's activations, memory-mapped, if each file is whole: readable,
    ``n`` rows, and the SHA-256 of its bytes the one written with it (a truncated, zero-filled
    or overwritten file fails one of these). Else (None, why)."""
    try:
        digests = json.loads((folder / DIGESTS).read_text())
    except (OSError, ValueError):
        return None, "no checksum in it (written by an older pneumojax, or cut short)"
    arrays = {}
    for name in names:
        try:
            raw = np.load(folder / f"{name}.npy", mmap_mode="r")  # as stored (bfloat16: uint16)
        except (ValueError, OSError, EOFError) as error:
            return None, f"{name}.npy is unreadable: {error}"
        if len(raw) != n:
            return None, f"{name}.npy holds {len(raw)} rows, expected {n}"
        if array_digest(raw) != digests.get(name):
            return None, f"{name}.npy does not match the checksum written with it"
        arrays[name] = raw.view(dtype) if dtype == STORAGE["bfloat16"] else raw
    return arrays, ""


def _open(path: Path, dtype: np.dtype) -> np.ndarray:
    # .npy has no bfloat16: its bits are stored as uint16 and viewed back.
    a = np.load(path, mmap_mode="r")
    return a.view(dtype) if dtype == STORAGE["bfloat16"] else a


def variables_digest(variables: dict) -> str:
    """Content hash of the (backbone) variables, so cached activations follow the weights."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_activations(
    prefix: Prefix,
    variables: dict,
    images: np.ndarray,
    image_key: str,
    cache_dir: Path,
    batch_size: int,
    run_batches,
    storage: np.dtype | None = None,
) -> dict[str, np.ndarray]:
    """The prefix's activations for ``images``, from the cache or computed (and stored) once,
    as ``storage`` (default: the prefix's compute dtype).

    ``image_key`` identifies the images (file list and size); ``run_batches(fn, variables,
    inputs, batch_size, sink)`` runs ``fn`` over fixed-size batches and hands each result to
    ``sink(start, stop, outputs)``. With ``cache_dir`` None the activations are computed in
    memory, rounded to ``storage`` exactly as the cache stores them.
    """
    storage = np.dtype(prefix.backbone.dtype if storage is None else storage)
    backbone_vars = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
    prefix_vars = {
        "params": {"backbone": backbone_vars.get("params", {})},
        "batch_stats": {"backbone": backbone_vars.get("batch_stats", {})},
    }
    names, n = prefix.backbone.outputs, len(images)

    def compute(sink):
        run_batches(prefix.apply, prefix_vars, images, batch_size, sink)

    if cache_dir is None:
        return _in_memory(compute, names, n, storage)
    folder = Path(cache_dir) / _cache_key(prefix, image_key, storage, backbone_vars)
    if (folder / "done").exists():
        cached, problem = _whole(folder, names, n, storage)
        if cached is not None:
            return cached
        warnings.warn(
            f"activation cache {folder} is damaged ({problem}): computing the activations again",
            DataWarning,
            stacklevel=2,
        )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    _compute_into(tmp, compute, n, storage)
    _publish(tmp, folder, names, n, storage)
    return {name: _open(folder / f"{name}.npy", storage) for name in names}


def _in_memory(compute, names, n: int, storage: np.dtype) -> dict[str, np.ndarray]:
    """The activations computed into memory, rounded to ``storage`` as the cache would be."""
    arrays: dict[str, np.ndarray] = {}

    def keep(start, stop, outputs):
        for name, value in outputs.items():
            if name not in arrays:
                arrays[name] = np.empty((n,) + value.shape[1:], storage)
            arrays[name][start:stop] = np.asarray(value).astype(storage)

    compute(keep)
    return {name: arrays[name] for name in names}


def _cache_key(prefix: Prefix, image_key: str, storage: np.dtype, backbone_vars: dict) -> str:
    """The cache folder's name: a hash of everything the activations depend on."""
    return hashlib.sha256(
        json.dumps(
            {
                "images": image_key,
                "outputs": prefix.backbone.outputs,
                # (the key of a run without --intensity is what it was before the option)
                "preprocess": prefix.preprocess_mode
                + ("" if prefix.intensity == "none" else f"+{prefix.intensity}"),
                "dtype": str(np.dtype(prefix.backbone.dtype)),
                "storage": storage.name,
                "weights": variables_digest(backbone_vars),
                "version": 2,
            }
        ).encode()
    ).hexdigest()[:24]


def _compute_into(tmp: Path, compute, n: int, storage: np.dtype) -> None:
    """The activations computed into memory-mapped files in the staging folder ``tmp``, then
    their checksums and the ``done`` mark; on any failure the folder is removed."""
    on_disk = np.dtype(np.uint16) if storage == STORAGE["bfloat16"] else storage
    # any activations a killed process left half-written (its process gone): removed
    remove_stale_staging(tmp.parent, r"[0-9a-f]{24}\.tmp(?P<pid>\d+)")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}

    def sink(start, stop, outputs):
        if not arrays:  # the first batch: every output's shape is known, so the space needed
            _allocate(arrays, tmp, on_disk, {k: (n,) + v.shape[1:] for k, v in outputs.items()})
        for name, value in outputs.items():
            arrays[name][start:stop] = np.asarray(value).astype(storage).view(on_disk)

    try:
        compute(sink)
        for a in arrays.values():
            a.flush()
    except BaseException:
        arrays.clear()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digests = {name: array_digest(a) for name, a in arrays.items()}
    write_text_atomic(tmp / DIGESTS, json.dumps(digests, indent=1) + "\n")
    (tmp / "done").write_text("")


def _publish(tmp: Path, folder: Path, names, n: int, storage: np.dtype) -> None:
    """The finished staging folder ``tmp`` renamed to the cache ``folder``."""
    try:
        os.replace(tmp, folder)
    except OSError:  # the folder exists: another process (same cache) finished it first,
        if _whole(folder, names, n, storage)[0] is None:
            # or an unfinished or damaged copy
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        shutil.rmtree(tmp, ignore_errors=True)


def _allocate(arrays: dict, folder: Path, dtype: np.dtype, shapes: dict) -> None:
    """Memory-mapped ``.npy`` files in ``folder`` for activations of ``shapes``, their disk
    blocks allocated up front (:func:`pneumojax.io.allocate`): a full disk is a
    :class:`~pneumojax.io.NoSpaceError` here, not a SIGBUS while the prefix runs."""
    check_space(folder, sum(math.prod(s) for s in shapes.values()) * dtype.itemsize)
    for name, shape in shapes.items():
        path = folder / f"{name}.npy"
        arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        allocate(path)


def suffix_variables(full: dict, suffix_template: dict) -> dict:
    """The full model's variables restricted to what the suffix model holds."""

    def pick(tmpl, src):
        return {
            k: pick(v, src[k]) if isinstance(v, dict) else np.asarray(src[k])
            for k, v in tmpl.items()
        }

    return pick(suffix_template, full)


def merge_variables(full: dict, part: dict) -> dict:
    """``full`` with every leaf that ``part`` holds replaced by ``part``'s value."""

    def merge(a, b):
        return {
            k: (merge(a[k], b[k]) if isinstance(a[k], dict) else np.asarray(b[k]))
            if k in b
            else a[k]
            for k in a
        }

    return merge(full, part)
