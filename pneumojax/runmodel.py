"""A run's classifier as it was trained, for training and for every scoring: images ->
(frozen prefix -> activations, rounded to their storage dtype) -> trainable suffix -> member
probabilities (:class:`RunModel`), with the activation cache and test-time augmentation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pneumojax.features import (
    cached_activations,
    prefix_model,
    storage_dtype,
    suffix_variables,
)
from pneumojax.predictions import read_predictions, write_predictions  # noqa: F401 (read_: re-exported)
from pneumojax.model import (
    build_classifier,
    compute_dtype,
    pneumonia_probability,
)
from pneumojax.step import Steps, member_logits
from pneumojax.tta import TTA, image_ids, mean_over_views, view_images
from pneumojax.workspace import cache_dir


@dataclasses.dataclass
class RunModel:
    """A run's classifier as it was trained: images -> (frozen prefix -> activations, rounded to
    their storage dtype) -> trainable suffix -> member logits; or the full classifier when the
    run trained without the feature cache. Training, ``evaluate`` and ``predict`` all score
    through this one path, so a saved run re-scores exactly to its own metrics.json.

    ``variables`` holds the suffix's variables of K members stacked on a leading axis (set once
    trained); ``prefix_variables`` the shared frozen prefix's.
    """

    steps: Steps
    prefix: object | None
    prefix_variables: dict | None
    storage: np.dtype | None
    batch_size: int
    variables: dict | None = None

    @classmethod
    def build(
        cls,
        info,
        cut: str,
        trainable: frozenset[str],
        precision: str,
        frontier: tuple[str, ...],
        cache_dtype: str,
        image_size: int,
        backbone_source: dict,
        batch_size: int,
        mesh,
        optimizer=None,
        learning_rate: float = 0.0,
        intensity: str = "none",
    ) -> "RunModel":
        """``backbone_source``: full classifier variables whose backbone is the run's frozen
        one; ``optimizer(params, trainable, lr)`` makes the training optimizer (None: the
        model only scores); ``intensity``: the run's ``--intensity``."""
        dtype = compute_dtype(precision)
        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
        prefix = prefix_vars = storage = None
        example = images
        if frontier:
            prefix = prefix_model(info, frontier, dtype, intensity)
            storage = storage_dtype(cache_dtype, dtype)
            prefix_vars = suffix_variables(
                backbone_source, jax.eval_shape(prefix.init, jax.random.key(0), images)
            )
            example = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, storage),
                jax.eval_shape(prefix.apply, prefix_vars, images),
            )
        model = build_classifier(info, cut, trainable, dtype, given=frontier, intensity=intensity)
        template = jax.eval_shape(model.init, jax.random.key(0), example)
        tx = optax.identity()
        if optimizer is not None:
            tx = optimizer(
                suffix_variables(backbone_source, template)["params"], trainable, learning_rate
            )
        self = cls(Steps(model, tx, mesh), prefix, prefix_vars, storage, batch_size)
        self._template = template
        return self

    def own_variables(self, full: dict) -> dict:
        """Full classifier variables restricted to what this model's suffix holds."""
        return suffix_variables(full, self._template)

    def inputs(self, images, image_key: str | None = None, desc: str | None = None):
        """What the suffix takes for ``images``: the images themselves, or the prefix's
        activations (from the activation cache when ``image_key`` identifies the images)."""
        if self.prefix is None:
            return images
        return cached_activations(
            self.prefix,
            self.prefix_variables,
            images,
            image_key,
            cache_dir() / "features" if image_key else None,
            self.batch_size,
            lambda *a: self.steps.map(*a, desc=desc),
            self.storage,
        )

    def member_probabilities(self, inputs, desc: str | None = None) -> np.ndarray:
        """P(pneumonia) per input and member, (n, members), for inputs from :meth:`inputs`."""
        return np.asarray(
            pneumonia_probability(
                member_logits(self.steps, self.variables, inputs, self.batch_size, desc)
            )
        )

    def probabilities_of_images(
        self, images, chunk: int = 512, tta: TTA | None = None, desc: str | None = None
    ) -> np.ndarray:
        """:meth:`member_probabilities` of raw images, a chunk at a time (bounded memory).
        With ``tta``: each member's probability averaged over the views
        (:mod:`pneumojax.tta`), every view through the frozen prefix (no activation cache)."""
        chunk = max(self.batch_size, chunk // self.batch_size * self.batch_size)
        parts = []
        for i in range(0, len(images), chunk):
            part = np.asarray(images[i : i + chunk])
            if tta is None:
                parts.append(self.member_probabilities(self.inputs(part)))
                continue
            ids = image_ids(part)
            views = [
                self.member_probabilities(
                    self.inputs(view_images(self.steps, part, ids, tta, v, self.batch_size)),
                    desc=desc and f"{desc}, view {v + 1}/{tta.views}",
                )
                for v in range(tta.views)
            ]
            parts.append(mean_over_views(views))
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def split_probabilities(
    model: RunModel, images, image_key: str | None, tta: TTA | None, desc: str
) -> np.ndarray:
    """P(pneumonia) per image and member of one split: through the activation cache
    (``image_key``) without TTA, each view through the whole model with it."""
    if tta is None:
        return model.member_probabilities(
            model.inputs(images, image_key, desc=f"frozen activations ({desc})"),
            desc=f"predict {desc}",
        )
    return model.probabilities_of_images(images, tta=tta, desc=f"predict {desc} (TTA)")


def stack_members(member_variables: list[dict]) -> dict:
    """K members' variables stacked on a leading axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *member_variables)
