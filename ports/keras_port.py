"""keras.applications weights -> Flax variables, checked by parity, saved with orbax.

The intermediate form is a plain mapping ``{keras_layer_name: {keras_weight_name: array}}``,
read from a live Keras model or straight from a legacy ``.h5`` file. Mapping it onto the Flax
graph is strict: any missing, unused or mis-shaped weight stops the port with the layer named.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pneumojax.backbones import BackboneInfo, backbone_model, init_shapes, preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

KerasWeights = dict[str, dict[str, np.ndarray]]

# Keras weight name -> (Flax collection, Flax variable name), per layer kind.
_TO_FLAX = {
    "Conv2D": {"kernel": ("params", "kernel"), "bias": ("params", "bias")},
    "BatchNormalization": {
        "gamma": ("params", "scale"),
        "beta": ("params", "bias"),
        "moving_mean": ("batch_stats", "mean"),
        "moving_variance": ("batch_stats", "var"),
    },
}

# Parity tolerance: max |flax - keras| <= PARITY_RTOL * max |keras| at every checked layer.
# Both sides compute in float32 but sum in different orders (oneDNN vs XLA), and the error
# grows with depth: measured worst case ~2e-6 relative (see README), so 1e-4 leaves
# headroom while any real porting bug (wrong epsilon, padding, order) shows up as >1e-2.
PARITY_RTOL = 1e-4


class PortError(Exception):
    """A weight source does not fit the Flax graph, or parity failed."""


def _quiet_keras():
    import keras  # noqa: PLC0415  (TensorFlow is heavy: only porting pays for it)

    return keras


def build_keras_model(info: BackboneInfo, input_size: int, weights: str | None = None):
    """``keras.applications.<X>(include_top=False)`` in a fresh session, so auto-names match."""
    keras = _quiet_keras()
    keras.backend.clear_session()
    ctor = getattr(keras.applications, info.keras_constructor)
    return ctor(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))


def keras_preprocess(info: BackboneInfo, images: np.ndarray) -> np.ndarray:
    keras = _quiet_keras()
    module = getattr(keras.applications, info.keras_module)
    return np.asarray(module.preprocess_input(images.astype(np.float32).copy()))


def weights_of_keras_model(model) -> KerasWeights:
    """Every variable of a Keras model by layer name and Keras variable name."""
    return {
        layer.name: {
            v.name.split("/")[-1].split(":")[0]: np.asarray(v.numpy()) for v in layer.weights
        }
        for layer in model.layers
        if layer.weights
    }


def read_legacy_h5(path: str | Path) -> KerasWeights:
    """Reads a Keras 2 style ``.h5`` weight file (as keras.applications downloads) by name."""
    import h5py  # noqa: PLC0415

    def text(x):
        return x.decode() if isinstance(x, bytes) else str(x)

    out: KerasWeights = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise PortError(
                f"{path}: not a Keras .h5 weight file (no 'layer_names' attribute); "
                "for Keras 3 files use the .weights.h5 or .keras suffix"
            )
        for layer in map(text, root.attrs["layer_names"]):
            group = root[layer]
            names = [text(n) for n in group.attrs.get("weight_names", [])]
            if names:
                out[layer] = {n.split("/")[-1].split(":")[0]: np.asarray(group[n]) for n in names}
    return out


def set_keras_weights(model, weights: KerasWeights) -> None:
    """Loads ``weights`` into a Keras model by layer and variable name (the reverse of reading)."""
    for layer in model.layers:
        if layer.weights:
            src = weights[layer.name]
            layer.set_weights([src[v.name.split("/")[-1].split(":")[0]] for v in layer.weights])


def randomize_keras_model(model, seed: int = 0) -> None:
    """Gives every variable a random value, BatchNorm statistics and gammas included.

    Default initializers (gamma 1, mean 0, variance 1) would hide epsilon, scale and
    statistics mix-ups; kernels are variance-preserving so activations stay finite.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for v in layer.weights:
            name = v.name.split("/")[-1]
            shape = tuple(v.shape)
            if name == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                x = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
            elif name in ("gamma", "moving_variance"):
                x = rng.uniform(0.5, 1.5, shape)
            else:  # bias, beta, moving_mean
                x = rng.normal(0.0, 0.1, shape)
            values.append(x.astype(np.float32))
        if values:
            layer.set_weights(values)


def port_keras_weights(
    weights: Mapping[str, Mapping[str, np.ndarray]], info: BackboneInfo, input_size: int
) -> dict:
    """Maps Keras weights onto the Flax variables of ``info``; strict in every direction."""
    expected, _ = init_shapes(backbone_model(info), input_size)
    variables: dict = {"params": {}, "batch_stats": {}}
    problems: list[str] = []
    graph_layers = {s.name: s for s in info.layers}
    for spec in info.layers:
        names = spec.keras_weight_names
        if not names:
            continue
        src = weights.get(spec.name)
        if src is None:
            problems.append(f"layer {spec.name} ({spec.kind}): missing from the weight source")
            continue
        for wname in names:
            collection, fname = _TO_FLAX[spec.kind][wname]
            want = tuple(expected[collection][spec.name][fname].shape)
            if wname not in src:
                problems.append(f"layer {spec.name}: weight {wname!r} missing from the source")
                continue
            got = tuple(np.shape(src[wname]))
            if got != want:
                problems.append(
                    f"layer {spec.name}: weight {wname!r} has shape {got}, "
                    f"the {info.name} graph needs {want}"
                )
                continue
            variables[collection].setdefault(spec.name, {})[fname] = np.asarray(
                src[wname], np.float32
            )
        for wname in set(src) - set(names):
            problems.append(
                f"layer {spec.name}: source weight {wname!r} is not used by {info.name}"
            )
    for layer in set(weights) - set(graph_layers):
        if weights[layer]:
            problems.append(f"layer {layer}: in the weight source but not in {info.name}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PortError("refusing to port: " + "; ".join(sorted(problems)[:5]) + more)
    return variables


@dataclasses.dataclass
class ParityRow:
    layer: str
    max_abs_diff: float
    max_abs_ref: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_RTOL * max(self.max_abs_ref, 1e-6)

    def line(self) -> str:
        return (
            f"parity {self.layer} max_abs_diff={self.max_abs_diff:.3e} "
            f"max_abs_ref={self.max_abs_ref:.3e}"
        )


def parity_layers(info: BackboneInfo, n_inner: int = 3) -> list[str]:
    """The default cut, the last layer and a few evenly spaced inner layers."""
    outs = [s.name for s in info.layers if s.kind in ("Activation", "Add", "Concatenate")]
    inner = [outs[int(len(outs) * k / (n_inner + 1))] for k in range(1, n_inner + 1)]
    return list(dict.fromkeys(inner + [info.default_cut, info.layers[-1].name]))


def parity_batch(input_size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed batch of smooth random RGB images in [0, 255] (uint8)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 8, 8, 3))
    reps = -(-input_size // 8)
    x = np.kron(coarse, np.ones((1, reps, reps, 1)))[:, :input_size, :input_size]
    return np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)


def measure_parity(
    keras_model,
    variables: dict,
    info: BackboneInfo,
    input_size: int,
    layers: Iterable[str] | None = None,
    images: np.ndarray | None = None,
) -> list[ParityRow]:
    """Runs Keras and Flax on the same images and compares the named layers' outputs."""
    import jax  # noqa: PLC0415

    keras = _quiet_keras()
    layers = list(layers) if layers is not None else parity_layers(info)
    images = parity_batch(input_size) if images is None else images
    probe = keras.Model(keras_model.inputs, [keras_model.get_layer(n).output for n in layers])
    ref = probe([keras_preprocess(info, images)], training=False)
    ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    model = backbone_model(info, outputs=layers)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(variables, preprocess(images, info.preprocess_mode))
    return [
        ParityRow(n, float(np.max(np.abs(np.asarray(got[n]) - r))), float(np.max(np.abs(r))))
        for n, r in zip(layers, ref)
    ]


def weights_sha256(weights: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """A content hash of the weights, independent of the file format they came in."""
    h = hashlib.sha256()
    for layer in sorted(weights):
        for name in sorted(weights[layer]):
            a = np.ascontiguousarray(weights[layer][name], np.float32)
            h.update(f"{layer}/{name}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_imagenet_file(info: BackboneInfo) -> str | None:
    """The notop ImageNet file Keras keeps in ``~/.keras/models``, if it was downloaded."""
    base = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    prefix = info.keras_constructor.lower()
    hits = sorted(glob.glob(os.path.join(base, "models", f"{prefix}*_notop.h5")))
    return hits[0] if hits else None


def require_internet(host: str = "storage.googleapis.com", timeout: float = 5.0) -> None:
    """Fails fast, with what to do instead, when Keras could not download ImageNet weights."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise PortError(
            f"cannot reach {host} to download ImageNet weights ({e.__class__.__name__}: {e}). "
            "Port on a machine with internet (`pneumojax port --backbone NAME --weights imagenet`) "
            "and copy its checkpoints/NAME-imagenet/ folder here, or download the Keras "
            "'*_notop.h5' file and run `pneumojax port --backbone NAME --weights FILE.h5`."
        ) from None


def load_weight_source(
    info: BackboneInfo, weights: str, input_size: int, randomize_seed: int | None = None
):
    """Resolves ``imagenet | none | PATH`` to ``(keras_model, weights_dict, source_record)``.

    The Keras model carries the same weights and serves as the parity reference.
    """
    source: dict = {"weights": weights}
    if weights == "imagenet":
        cached = cached_imagenet_file(info)
        if cached is None:
            require_internet()
        model = build_keras_model(info, input_size, "imagenet")
        cached = cached_imagenet_file(info)
        if cached:
            source.update(file=cached, file_sha256=file_sha256(cached))
    elif weights == "none":
        model = build_keras_model(info, input_size, None)
    else:
        path = Path(weights)
        if not path.is_file():
            raise PortError(
                f"--weights {weights}: no such file (expected imagenet, none, or a "
                "Keras .h5 / .weights.h5 / .keras file)"
            )
        model = build_keras_model(info, input_size, None)
        if path.name.endswith(".weights.h5"):
            model.load_weights(path)
        elif path.suffix == ".keras":
            keras = _quiet_keras()
            saved = keras.models.load_model(path, compile=False)
            set_keras_weights(model, weights_of_keras_model(saved))
        elif path.suffix == ".h5":
            set_keras_weights(model, _checked(read_legacy_h5(path), info, input_size))
        else:
            raise PortError(
                f"--weights {weights}: unknown file type (use .h5, .weights.h5 or .keras)"
            )
        source.update(file=str(path.absolute()), file_sha256=file_sha256(path))
    if randomize_seed is not None:
        randomize_keras_model(model, randomize_seed)
        source["randomized_seed"] = randomize_seed
    return model, weights_of_keras_model(model), source


def _checked(weights: KerasWeights, info: BackboneInfo, input_size: int) -> KerasWeights:
    port_keras_weights(weights, info, input_size)  # raises naming the layer before Keras would
    return weights


def port_backbone(
    info: BackboneInfo,
    weights: str = "none",
    input_size: int = 256,
    out: str | Path | None = None,
    randomize_seed: int | None = None,
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Ports, checks parity, and saves an orbax checkpoint with its manifest; returns it."""
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from pneumojax.checkpoint import save_variables  # noqa: PLC0415

    if input_size < info.min_input_size:
        raise PortError(
            f"{info.name} needs --input-size >= {info.min_input_size}, got {input_size}"
        )
    model, keras_weights, source = load_weight_source(info, weights, input_size, randomize_seed)
    variables = port_keras_weights(keras_weights, info, input_size)
    rows = measure_parity(model, variables, info, input_size)
    for row in rows:
        echo(row.line())
    bad = [r.layer for r in rows if not r.ok]
    if bad:
        raise PortError(
            f"parity above tolerance ({PARITY_RTOL:g} x max|ref|) at {', '.join(bad)}; not saving"
        )
    label = weights if weights in ("imagenet", "none") else Path(weights).name.split(".")[0]
    out = Path(out) if out else Path("checkpoints") / f"{info.name}-{label}"
    manifest = {
        "backbone": info.name,
        "keras_constructor": info.keras_constructor,
        "input_size": input_size,
        "layer_count": len(info.layers),
        "source": source,
        "weights_sha256": weights_sha256(keras_weights),
        "parity": {"rtol": PARITY_RTOL, "layers": [dataclasses.asdict(r) for r in rows]},
        "versions": {
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
        },
    }
    path = save_variables(out, variables, manifest, overwrite=overwrite)
    echo(f"saved {path}")
    return manifest
