"""Test-time augmentation: P(pneumonia) averaged over N random views of each image.

A view is :func:`pneumojax.augment.augment` of the image with a key made from a fixed seed,
the view's number and the image's own content (a CRC-32 of its uint8 pixels), so view v of an
image is the same whatever batch, split or file list it is scored in: ``predict`` on one
image gives exactly what ``evaluate`` gave it among 624. The frozen prefix sees every view
(no activation cache: the views are new inputs), through the same scoring path as un-augmented
images (:meth:`pneumojax.runmodel.RunModel.inputs`), so TTA with the identity spec equals no
TTA exactly.

The views' **probabilities** are averaged (not their logits), per member, the same way the
members of an ensemble are averaged; the mean is taken in float64 and rounded to float32, so N
identical views give back exactly the one view's probability.

Imports nothing heavy at module level (the CLI resolves settings before JAX loads).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from pneumojax.augment import AugmentSpec, parse_augment

TTA_SEED = 0  # fixed: a run's views are a property of the run, not of the evaluation
DEFAULT_AUGMENT = "light"  # when the run has no --device-augment of its own


class TTAUsageError(ValueError):
    """``--tta``/``--tta-augment`` given in a combination that means nothing (a usage error)."""


@dataclasses.dataclass(frozen=True)
class TTA:
    """N views per image drawn as ``augment`` (canonical spec text) says, from ``seed``."""

    views: int
    augment: str
    seed: int = TTA_SEED

    @property
    def spec(self) -> AugmentSpec:
        return parse_augment(self.augment)

    def record(self) -> dict:
        """What config.json and metrics.json keep under ``"tta"``."""
        return {"views": self.views, "augment": self.augment, "seed": self.seed}

    def describe(self) -> str:
        return f"{self.views} views ({self.augment}), probabilities averaged"


def resolve_tta(views: int | None, augment: str | None, device_augment: str = "none") -> TTA | None:
    """The TTA setting of ``--tta N`` and ``--tta-augment SPEC``: None when ``views`` is 0
    (or None); the spec defaults to the run's own ``--device-augment`` if it has one, else
    ``light``. Raises :class:`TTAUsageError` for a spec without views (it would do nothing)."""
    if not views:
        if augment is not None:
            raise TTAUsageError("--tta-augment needs --tta N (the number of views, N >= 1)")
        return None
    if augment is None:
        own = parse_augment(device_augment or "none")
        augment = str(own) if not own.identity else DEFAULT_AUGMENT
    return TTA(int(views), str(parse_augment(augment)))


def run_tta(config: dict) -> TTA | None:
    """The TTA a run was trained and thresholded with (None: none, as before TTA existed)."""
    views = config.get("tta") or 0
    return TTA(int(views), config["tta_augment"]) if views else None


def image_ids(images) -> np.ndarray:
    """Per image a uint32 from its pixels (CRC-32): what a view's key is made from, so a view
    depends on the image alone, not on its place in a batch or a file list."""
    return np.array(
        [zlib.crc32(np.ascontiguousarray(im).tobytes()) for im in images], np.uint32
    ).reshape(len(images))


@functools.cache
def _view_fn(spec: AugmentSpec):
    """``fn(view_key_data, batch)`` for :meth:`pneumojax.step.Steps.map`: each image of the
    batch augmented with ``fold_in(view key, its id)``; one function (one compile) per spec."""
    import jax  # noqa: PLC0415

    from pneumojax.augment import augment  # noqa: PLC0415

    def fn(key_data, batch):
        view_key = jax.random.wrap_key_data(key_data)
        keys = jax.vmap(lambda i: jax.random.fold_in(view_key, i))(batch["id"])
        return jax.vmap(lambda k, im: augment(k, im[None], spec)[0])(keys, batch["image"])

    return fn


def view_key_data(tta: TTA, view: int) -> np.ndarray:
    import jax  # noqa: PLC0415

    return np.asarray(
        jax.random.key_data(jax.random.fold_in(jax.random.key(tta.seed), view)), np.uint32
    )


def view_images(steps, images, ids: np.ndarray, tta: TTA, view: int, batch_size: int):
    """View ``view`` of every image (uint8, same shape), computed on the devices in
    fixed-size batches (``steps``: a :class:`pneumojax.step.Steps`)."""
    out = np.empty(np.shape(images), np.uint8)

    def sink(start, stop, views):
        out[start:stop] = views

    steps.map(
        _view_fn(tta.spec),
        view_key_data(tta, view),
        {"image": np.asarray(images), "id": ids},
        batch_size,
        sink,
    )
    return out


def mean_over_views(view_p: list[np.ndarray]) -> np.ndarray:
    """The views' mean probability, (n, members): in float64, rounded once to float32 (so
    identical views give back the one view's value exactly)."""
    return np.mean(np.stack(view_p).astype(np.float64), axis=0).astype(np.float32)
