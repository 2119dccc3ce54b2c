"""The classifier (backbone up to a cut + the study's head) and Keras-exact freezing.

Freezing follows Keras: the layers in the ``--trainable`` ranges train (their BatchNorm uses
batch statistics and updates its moving averages); every other backbone layer is frozen (its
BatchNorm runs in inference mode, its parameters get no update, and no gradient flows into
the part before the first trainable layer). The head always trains.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pneumojax.backbones import (
    BackboneInfo,
    KerasGraph,
    ancestors,
    backbone_model,
    init_shapes,
    preprocess,
)
from pneumojax.intensity import normalize_intensity

HEAD = ("dense", "dense_1")  # Keras's auto-names for the head's two Dense layers


class TrainableSpecError(ValueError):
    """A ``--trainable`` value that does not name a usable layer range."""


class Classifier(nn.Module):
    """uint8 images -> backbone up to the cut -> Flatten, Dense(128, relu), Dropout, Dense(2).

    Returns the two logits; the study's sigmoid is applied in the loss and in
    :func:`pneumonia_probability`. When the backbone has outputs beyond the cut (its first
    output), returns ``(logits, {layer name: activation})`` for those (big_vision's named
    intermediates; see :func:`build_classifier`).
    """

    backbone: KerasGraph
    preprocess_mode: str
    hidden: int = 128
    dropout: float = 0.1
    intensity: str = "none"  # pneumojax.intensity: per-image normalisation before preprocessing

    @nn.compact
    def __call__(self, images, train: bool = False, deltas=None):
        # With ``backbone.given``, ``images`` is the dict of cached frozen activations.
        # ``deltas`` (layer name -> array) are added to those backbone layers' outputs, with
        # gradients flowing from them (see KerasGraph).
        x = (
            images
            if self.backbone.given
            else preprocess(
                normalize_intensity(images, self.intensity),
                self.preprocess_mode,
                self.backbone.dtype,
            )
        )
        outputs = self.backbone(x, train=train, deltas=deltas)
        x = outputs[self.backbone.outputs[0]]
        x = x.reshape(x.shape[0], -1)
        init = nn.initializers.glorot_uniform()
        dtype = self.backbone.dtype
        x = nn.relu(nn.Dense(self.hidden, kernel_init=init, dtype=dtype, name=HEAD[0])(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Dense(2, kernel_init=init, dtype=dtype, name=HEAD[1])(x).astype(jnp.float32)
        if len(self.backbone.outputs) == 1:
            return logits
        return logits, {name: outputs[name] for name in self.backbone.outputs[1:]}


def pneumonia_probability(logits):
    """The study's Dense(2, sigmoid) output for the PNEUMONIA unit."""
    return jax.nn.sigmoid(logits[..., 1])


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Everything resolved about a model before any data is touched."""

    backbone: str
    cut: str
    input_size: int
    trainable_spec: str
    trainable_ranges: tuple[tuple[str, str], ...]  # (first, last) layer names, inclusive
    trainable_layers: frozenset[str]
    trainable_params: int
    frozen_params: int

    def lines(self) -> list[str]:
        ranges = ", ".join(f"{a} .. {b}" for a, b in self.trainable_ranges) or "none (head only)"
        return [
            f"backbone={self.backbone} cut={self.cut} input_size={self.input_size}",
            f"trainable layers: {ranges}",
            f"trainable_params={self.trainable_params}",
            f"frozen_params={self.frozen_params}",
        ]


_INT = re.compile(r"^-?\d+$")


def parse_trainable(
    spec: str | None, info: BackboneInfo, cut: str
) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """Resolves ``--trainable`` to inclusive (first, last) name pairs and the layer names.

    ``START:END`` follows Python slices over ``model.layers`` (start inclusive, end exclusive),
    by Keras name or index, open ends allowed; several ranges comma-separated; ``all``; a
    single name or index is that one layer; ``none`` or empty is head only. Only layers the
    cut needs count.
    """
    spec = (spec or "").strip()
    if spec.lower() in ("", "none"):
        return (), frozenset()
    names = [s.name for s in info.layers]
    needed = ancestors(info.layers, [cut])
    if spec.lower() == "all":
        parts = [":"]
    else:
        parts = [p.strip() for p in spec.split(",")]
    ranges, layers = [], set()
    for part in parts:
        if ":" in part:
            if part.count(":") != 1:
                raise TrainableSpecError(f"--trainable {part!r}: a range is START:END")
            a, b = (s.strip() for s in part.split(":"))
            start = _resolve(a, info, default=0)
            stop = _resolve(b, info, default=len(names))
        else:
            if not part:
                raise TrainableSpecError(f"--trainable {spec!r}: empty range between commas")
            start = _resolve(part, info, default=0)
            stop = start + 1
        if start >= stop:
            raise TrainableSpecError(
                f"--trainable {part!r} selects no layer: {names[min(start, len(names) - 1)]} "
                f"(index {start}) is not before index {stop} (ranges are START:END, end exclusive)"
            )
        chosen = [n for n in names[start:stop] if n in needed]
        if not chosen:
            raise TrainableSpecError(
                f"--trainable {part!r} lies after the cut layer {cut} (index "
                f"{info.layer_index[cut]}), so it would have no effect; choose layers before the "
                "cut or a later --cut"
            )
        ranges.append((chosen[0], chosen[-1]))
        layers.update(chosen)
    return tuple(ranges), frozenset(layers)


def _resolve(token: str, info: BackboneInfo, default: int) -> int:
    n = len(info.layers)
    if token == "":
        return default
    if _INT.match(token):
        i = int(token)
        if not -n <= i <= n:
            raise TrainableSpecError(
                f"--trainable: layer index {i} is out of range for "
                f"{info.name} ({n} layers, 0..{n - 1})"
            )
        return i + n if i < 0 else i
    if token not in info.layer_index:
        nearest = f"Nearest {info.name} layers"
        raise TrainableSpecError(f"--trainable: {info.no_layer(token, 0.0, nearest)}")
    return info.layer_index[token]


PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_precision(precision: str | None) -> str:
    """``--precision`` as a dtype name: ``auto`` (or None) is bfloat16 on GPU/TPU and float32
    on CPU, decided on the machine that calls this."""
    if precision is None or precision == "auto":
        precision = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}; choose float32 or bfloat16")
    return precision


def compute_dtype(precision: str | None):
    """``--precision``: float32, or bfloat16 compute with float32 parameters and optimizer
    state (mixed precision); see :func:`resolve_precision`."""
    return PRECISIONS[resolve_precision(precision)]


def build_classifier(
    info: BackboneInfo,
    cut: str,
    trainable: frozenset[str],
    dtype=jnp.float32,
    given: tuple[str, ...] = (),
    intermediates: tuple[str, ...] = (),
    intensity: str = "none",
) -> Classifier:
    """The classifier; with ``given`` layer names it starts from their cached activations;
    with ``intermediates`` (Keras layer names up to the cut) it also returns their
    activations; ``intensity`` (``--intensity``) normalises each image first."""
    outputs = [cut, *intermediates]  # the cut may be among them: it is then returned twice
    return Classifier(
        backbone_model(info, outputs=outputs, trainable=trainable, dtype=dtype, given=given),
        info.preprocess_mode,
        intensity=intensity,
    )


def make_plan(
    info: BackboneInfo, cut: str | None, trainable_spec: str | None, input_size: int
) -> ModelPlan:
    """Resolves cut and trainable ranges and counts parameters the way Keras's summary does."""
    cut = info.check_layer(cut or info.default_cut)
    if input_size < info.min_input_size:
        raise ValueError(
            f"{info.name} needs --image-size >= {info.min_input_size}, got {input_size}"
        )
    ranges, layers = parse_trainable(trainable_spec, info, cut)
    variables, _ = init_shapes(build_classifier(info, cut, layers), input_size)
    labels = trainable_labels(variables["params"], layers)
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    trainable = sum(
        size(p)
        for p, lab in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(labels))
        if lab == "train"
    )
    total = size(variables)
    return ModelPlan(
        info.name,
        cut,
        input_size,
        trainable_spec or "none",
        ranges,
        layers,
        trainable,
        total - trainable,
    )


def trainable_labels(params: dict, trainable: frozenset[str]) -> dict:
    """'train' / 'freeze' per parameter leaf: the head and the trainable layers train."""

    def label(path, _):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] != "backbone":
            return "train"
        return "train" if keys[1] in trainable else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def init_variables(
    model: Classifier, input_size: int, seed: int, backbone_variables: dict | None = None
) -> dict[str, Any]:
    """Keras's initial values (Glorot-uniform kernels, zero biases, BatchNorm 1/0 statistics),
    with the backbone replaced by ported variables if given.

    Values are drawn in numpy from the shapes alone: tracing ``model.init`` would compile the
    whole backbone (~30 s on CPU for DenseNet121) just to create arrays.
    """
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def value(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] == "kernel":
            rng = np.random.default_rng([seed] + list("/".join(keys).encode()))
            fan_in = int(np.prod(leaf.shape[:-1]))
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, leaf.shape).astype(leaf.dtype)
        fill = 1.0 if keys[-1] in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(value, shapes)
    if backbone_variables is not None:
        for collection in ("params", "batch_stats"):
            mine = variables.get(collection, {}).get("backbone", {})
            src = backbone_variables.get(collection, {})
            for layer, leaves in mine.items():
                if layer not in src:
                    raise ValueError(f"the backbone checkpoint has no variables for layer {layer}")
                for k, v in leaves.items():
                    if np.shape(src[layer][k]) != v.shape:
                        raise ValueError(
                            f"checkpoint layer {layer}/{k} has shape "
                            f"{np.shape(src[layer][k])}, the model needs {v.shape}"
                        )
                    leaves[k] = np.asarray(src[layer][k], v.dtype)
    return variables
