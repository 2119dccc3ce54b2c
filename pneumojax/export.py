"""``pneumojax export``: a finished run's whole scoring path as one self-contained model, in
TensorFlow SavedModel, ONNX or serialized StableHLO (``jax.export``).

One contract for every format: the input is uint8 images ``[N, S, S, 3]`` (S: the run's image
size; a grey image repeated over the three channels), which is what ``predict`` hands the
network after decoding and resizing; the output is float32 ``[N]``, P(pneumonia). Inside: the
run's intensity normalisation and Keras preprocessing, the frozen prefix with its activations
rounded to the feature cache's storage dtype exactly as :class:`~pneumojax.runmodel.RunModel`
does, the trainable suffix and head, and a seed ensemble's members averaged as ``predict``
averages them. The threshold and everything needed to label goes in ``pneumojax-export.json``.

Every export is checked before it is put in place: the written file, loaded in its own runtime,
scores the run's validation images (up to :data:`CHECK_IMAGES`) and is compared with
``predict``'s scoring path; the difference is recorded in the metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pneumojax.data import Splits
from pneumojax.scoring import (
    LoadedRun,
    combine_rule,
    combined_probability,
    load_run,
    run_precision,
    run_resize,
    scoring_tta,
)
from pneumojax.io import remove_stale_staging, replace_folder, write_text_atomic
from pneumojax.modelcard import write_model_card
from pneumojax.step import predict_members_step
from pneumojax.workspace import load_split_arrays

FORMATS = ("savedmodel", "onnx", "stablehlo")
METADATA = "pneumojax-export.json"
FILES = {"savedmodel": "savedmodel", "onnx": "model.onnx", "stablehlo": "model.stablehlo"}
INPUT_NAME, OUTPUT_NAME = "images", "p_pneumonia"
CHECK_IMAGES = 32  # validation images the written model is checked on at export
FLOAT32_TOLERANCE = 1e-5  # |exported - predict| allowed for a float32 run, else not written
ONNX_OPSET = 17
STABLEHLO_PLATFORMS = ("cpu", "cuda")  # lowered for both; the runtime picks its own
TF_STABLEHLO = "1.13.0"  # a StableHLO version TF 2.21's XlaCallModule reads
NEEDS = {  # module -> package, per format
    "savedmodel": {"tensorflow": "tensorflow-cpu"},
    "onnx": {"tensorflow": "tensorflow-cpu", "tf2onnx": "tf2onnx", "onnxruntime": "onnxruntime"},
    "stablehlo": {},
}


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message says what to do."""


class ConverterMissing(ExportError):
    """A converter or runtime the format needs is not installed."""


def check_converters(fmt: str) -> None:
    """Raises :class:`ConverterMissing` naming the install line when ``fmt`` lacks a module."""
    missing = [pkg for mod, pkg in NEEDS[fmt].items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConverterMissing(
            f"--format {fmt} needs {', '.join(missing)}, not installed: "
            "pip install 'pneumojax[export]'"
        )


def scoring_function(run: LoadedRun):
    """``(params, apply)``: ``apply(params, images)`` is the run's scoring path as one pure
    JAX function, uint8 ``[N, S, S, 3]`` -> float32 ``[N]`` P(pneumonia) (the members' mean);
    ``params`` holds every weight (the frozen prefix's and the members', stacked)."""
    model = run.model
    prefix, storage, suffix = model.prefix, model.storage, model.steps.model
    params = {"prefix": model.prefix_variables or {}, "members": model.variables}

    def apply(params, images):
        x = images
        if prefix is not None:  # what the feature cache holds: activations in their storage
            x = jax.tree.map(lambda a: a.astype(storage), prefix.apply(params["prefix"], images))
        logits = predict_members_step(suffix, params["members"], x).astype(jnp.float32)
        # (n, members), as member_logits -> pneumonia_probability; index_in_dim, not [..., 1]:
        # under a symbolic batch, indexing becomes a gather, which the ONNX path lacks
        p = jax.nn.sigmoid(jax.lax.index_in_dim(logits, 1, axis=2, keepdims=False))
        if p.shape[1] == 1:
            return jax.lax.index_in_dim(p, 0, axis=1, keepdims=False)
        return p.mean(axis=1)

    return params, apply


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False, log=print
) -> dict:
    """Exports ``run_dir``'s scoring path to folder ``out`` as ``fmt`` and returns the metadata
    written beside it. ``out`` appears only complete: the export is written and checked in a
    staging folder beside it, then renamed into place."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(Path(run_dir), out, overwrite)
    check_converters(fmt)
    own = load_run(run_dir, log=lambda m: None)
    if combine_rule(own.config) == "vote":
        raise ExportError(
            f"{run_dir} is a --balance ensemble run, labelled by a majority vote of its "
            "members at their own thresholds, which one probability output cannot carry; "
            "export is for single models and seed ensembles"
        )
    run = load_run(run_dir, precision="float32", log=lambda m: None)
    # a TTA run's exported model is its plain path: the thresholds predict --tta 0 uses
    _, thresholds, _ = scoring_tta(run, views=0, log=lambda m: None)
    params, apply = scoring_function(run)
    size = run.config["image_size"]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent, rf"\.{re.escape(out.name)}\.export(?P<pid>\d+)")
    staging = out.with_name(f".{out.name}.export{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        WRITERS[fmt](params, apply, size, staging / FILES[fmt])
        meta = export_metadata(run, own, fmt, thresholds)
        meta["check"] = check_export(staging, fmt, own, meta, log)
        write_text_atomic(staging / METADATA, json.dumps(meta, indent=1) + "\n")
        write_model_card(run_dir, staging, export=meta)  # what the model is, beside it
        replace_folder(staging, out)  # a previous export stays whole until this one is
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"exported {run_dir} as {fmt}: {out / FILES[fmt]} (metadata {out / METADATA}, model "
        f"card {out / 'MODEL_CARD.md'})"
    )
    return meta


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """``--out`` may be replaced only when asked, and only if it is a previous export (or an
    empty folder), never the run folder or a folder holding it."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise FileExistsError(f"--out {out} holds the run folder {run_dir}; choose another --out")
    if not out.is_dir() or (any(out.iterdir()) and not (out / METADATA).exists()):
        raise FileExistsError(
            f"{out} is not a pneumojax export (no {METADATA}); --overwrite replaces only a "
            "previous export: choose another --out"
        )


def export_metadata(run: LoadedRun, own: LoadedRun, fmt: str, thresholds: list[float]) -> dict:
    """What a user of the exported file needs beside it: the contract, the threshold (and
    the members'), the combination rule, and where the model came from."""
    config = run.config
    tta = own.tta
    return {
        "format": fmt,
        "file": FILES[fmt],
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", config["image_size"], config["image_size"], 3],
            "meaning": "images resized to image_size (resize method below), grey repeated "
            "over the three channels, values 0-255, as pneumojax predict decodes them",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N"]},
        "threshold": thresholds[0],
        "member_thresholds": list(thresholds),  # one: the members' mean is thresholded
        "label_rule": "PNEUMONIA if p_pneumonia >= threshold else NORMAL",
        "combine_rule": combine_rule(config),
        "members": int(jax.tree.leaves(run.model.variables)[0].shape[0]),
        "image_size": config["image_size"],
        "resize": run_resize(config),
        "intensity": config.get("intensity", "none"),
        "backbone": config["backbone"],
        "cut": config["cut"],
        "precision": {"trained": run_precision(config), "exported": "float32"},
        "feature_cache": bool(config.get("feature_cache")),
        "tta": {
            "run": tta.record() if tta else None,
            "exported": None,
            "note": "the exported model is the plain path: it equals pneumojax predict --tta 0"
            if tta
            else "the run uses no test-time augmentation",
        },
        "batch": "dynamic",
        "platforms": list(STABLEHLO_PLATFORMS) if fmt != "onnx" else None,
        "run": str(Path(run.run_dir).resolve()),
        "pneumojax_version": _version("pneumojax"),
        "exported_with": {m: _version(m) for m in ("jax", "tensorflow", "tf2onnx", "onnx")},
        "platform": platform.platform(),
    }


def _version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def check_export(folder: Path, fmt: str, own: LoadedRun, meta: dict, log) -> dict:
    """Scores up to :data:`CHECK_IMAGES` of the run's validation images with the written file
    in its own runtime and with ``predict``'s path (the run in its own precision, no TTA);
    refuses (ExportError) a float32 run whose two differ by more than
    :data:`FLOAT32_TOLERANCE`."""
    splits = Splits.from_json((Path(own.run_dir) / "splits.json").read_text())
    items = (splits.val or splits.test or splits.train)[:CHECK_IMAGES]
    images, _ = load_split_arrays(items, meta["image_size"], lambda m: None, meta["resize"])
    exported = LOADERS[fmt](folder / FILES[fmt])(images)
    reference = combined_probability(own.model.probabilities_of_images(images))
    diff = float(np.max(np.abs(exported - reference))) if len(images) else 0.0
    labels_equal = bool(
        np.array_equal(exported >= meta["threshold"], reference >= meta["threshold"])
    )
    check = {
        "images": len(images),
        "against": f"pneumojax predict --tta 0 (the run in its own {meta['precision']['trained']})",
        "max_abs_diff": diff,
        "labels_identical": labels_equal,
    }
    if meta["precision"]["trained"] == "float32" and diff > FLOAT32_TOLERANCE:
        raise ExportError(
            f"the exported {fmt} model differs from predict by {diff:.2e} on the run's "
            f"validation images (allowed {FLOAT32_TOLERANCE:.0e}); nothing written"
        )
    log(f"checked on {len(images)} validation images: max |exported - predict| = {diff:.2e}")
    return check


def read_metadata(folder: str | Path) -> dict:
    return json.loads((Path(folder) / METADATA).read_text())


def load_exported(folder: str | Path):
    """The exported model in ``folder`` loaded in its own runtime, as a function of uint8
    images ``[N, S, S, 3]`` (numpy) -> float32 ``[N]`` (numpy)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    return LOADERS[meta["format"]](folder / meta["file"])


# --- stablehlo (jax.export) -----------------------------------------------------------------


def _symbolic_images(size: int):
    (batch,) = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)


def write_stablehlo(params, apply, size: int, path: Path) -> None:
    exported = jax.export.export(
        jax.jit(lambda images: apply(params, images)), platforms=STABLEHLO_PLATFORMS
    )(_symbolic_images(size))
    path.write_bytes(exported.serialize())


def load_stablehlo(path: Path):
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda images: np.asarray(exported.call(jnp.asarray(images, jnp.uint8)))


# --- TensorFlow SavedModel (jax2tf) -----------------------------------------------------------


def _tf_variables(params):
    import tensorflow as tf  # noqa: PLC0415

    return jax.tree.map(lambda a: tf.Variable(np.asarray(a), trainable=False), params)


def write_savedmodel(params, apply, size: int, path: Path) -> None:
    """jax2tf's native serialization: the StableHLO inside one TF op (XlaCallModule), the
    weights as TF variables; signature ``serving_default``: images -> p_pneumonia."""
    import tensorflow as tf  # noqa: PLC0415
    from jax.experimental import jax2tf  # noqa: PLC0415

    converted = jax2tf.convert(
        apply,
        polymorphic_shapes=[None, f"(N, {size}, {size}, 3)"],
        with_gradient=False,
        native_serialization_platforms=STABLEHLO_PLATFORMS,
    )
    module = tf.Module()
    module.params = _tf_variables(params)

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)],
        autograph=False,
    )
    def serve(images):
        return {OUTPUT_NAME: converted(module.params, images)}

    module.serve = serve
    with _stablehlo_target(TF_STABLEHLO):
        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


@contextlib.contextmanager
def _stablehlo_target(version: str):
    """Serializes StableHLO for an older reader: jax 0.12 writes for readers at most four
    weeks older than itself (``vhlo.custom_call_v2`` for its shape assertions), which TF
    2.21's XlaCallModule (StableHLO 1.13.7) cannot read. jax has no public setting for the
    target, so its one serializer is replaced for the duration."""
    from jax._src import xla_bridge  # noqa: PLC0415
    from jax._src.export import _export  # noqa: PLC0415
    from jax._src.lib import _jax  # noqa: PLC0415

    original = _export._module_to_bytecode

    def to_bytecode(module):
        serialize_with_sdy = xla_bridge.get_backend().serialize_with_sdy
        return _jax.mlir.serialize_portable_artifact(module, version, serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def load_savedmodel(path: Path):
    import tensorflow as tf  # noqa: PLC0415

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda images: serve(**{INPUT_NAME: tf.constant(images, tf.uint8)})[OUTPUT_NAME].numpy()


# --- ONNX (tf2onnx from plain TF ops) ---------------------------------------------------------


def write_onnx(params, apply, size: int, path: Path) -> None:
    """tf2onnx cannot read jax2tf's XlaCallModule, so the function's jaxpr is first
    rewritten in plain TF ops (:mod:`pneumojax.jaxpr_tf`), which tf2onnx converts."""
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    from pneumojax.jaxpr_tf import UnsupportedPrimitive, tf_function_of  # noqa: PLC0415

    try:
        fn = tf_function_of(lambda images: apply(params, images), _symbolic_images(size))
    except UnsupportedPrimitive as e:
        raise ExportError(f"{e}; export this run as --format savedmodel or stablehlo") from None
    spec = [tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)]
    graph = tf.function(lambda images: tf.identity(fn(images), name=OUTPUT_NAME), autograph=False)
    model, _ = tf2onnx.convert.from_function(
        graph, input_signature=spec, opset=ONNX_OPSET, output_path=None
    )
    _rename_io(model)
    path.write_bytes(model.SerializeToString())


def _rename_io(model) -> None:
    """tf2onnx names the graph's ends after TF tensors (``images:0``); the contract's names."""
    renames = {model.graph.input[0].name: INPUT_NAME, model.graph.output[0].name: OUTPUT_NAME}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for end, name in ((model.graph.input[0], INPUT_NAME), (model.graph.output[0], OUTPUT_NAME)):
        end.name = name
        end.type.tensor_type.shape.dim[0].dim_param = "N"  # the dynamic batch


def load_onnx(path: Path):
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})[0]


WRITERS = {"savedmodel": write_savedmodel, "onnx": write_onnx, "stablehlo": write_stablehlo}
LOADERS = {"savedmodel": load_savedmodel, "onnx": load_onnx, "stablehlo": load_stablehlo}
