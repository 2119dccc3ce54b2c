"""``pneumojax export``: each format, loaded in its own runtime (TF SavedModel, ONNX Runtime,
``jax.export``), gives ``pneumojax predict``'s probabilities within 1e-5 and its labels at the
run's threshold, on real images from two sites, for every training mode (head-only on cached
activations, a trainable range, a seed ensemble, no feature cache, bfloat16 exported in
float32) and a non-DenseNet backbone; bad input is refused in one line, leaving nothing in
``--out``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import data as pj_data
from pneumojax import export as pj_export
from pneumojax.cli import main
from pneumojax.inference import predict_paths
from pneumojax.scoring import run_resize

from conftest import MINI_DATA, NIH_DATA, TINY_MID, tiny_train_args

pytestmark = pytest.mark.tensorflow

MODES = {  # name -> extra train arguments
    "head": [],
    "range": ["--trainable", TINY_MID],
    "seeds": ["--seed-ensemble", "2"],
    "nocache": ["--no-feature-cache"],
    "bf16": ["--precision", "bfloat16"],
}
FORMATS = pj_export.FORMATS
METADATA = pj_export.METADATA
BF16_TOLERANCE = 2e-2  # measured: see docs/export.md
PER_SITE = 24  # real images per site scored by both sides


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = pj_data.make_demo_dataset(root / "demo", n_per_class=24, image_size=40, seed=3)
        yield root, data


_RUNS: dict = {}
_EXPORTS: dict = {}
_PREDICTED: dict = {}


def _run(workdir, mode):
    if mode not in _RUNS:
        root, data = workdir
        out = root / f"run-{mode}"
        if mode == "inception":
            args = tiny_train_args(
                data, out, "--backbone", "inception_v3", cut="mixed0", image_size=75, epochs=1
            )
        else:
            args = tiny_train_args(data, out, *MODES[mode], epochs=1)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        _RUNS[mode] = out
    return _RUNS[mode]


def _export(workdir, mode, fmt):
    if (mode, fmt) not in _EXPORTS:
        run = _run(workdir, mode)
        out = workdir[0] / f"export-{mode}-{fmt}"
        r = CliRunner().invoke(main, ["export", "--run", str(run), "--format", fmt, "--out", out])
        assert r.exit_code == 0, r.output
        _EXPORTS[mode, fmt] = out
    return _EXPORTS[mode, fmt]


def _predicted(workdir, mode, files):
    """``predict``'s rows for ``files``, once per run."""
    if mode not in _PREDICTED:
        _PREDICTED[mode] = predict_paths(_run(workdir, mode), files, log=lambda m: None)
    return _PREDICTED[mode]


def real_images() -> list[str]:
    if not MINI_DATA.is_dir() or not NIH_DATA.is_dir():
        pytest.skip("needs shared/data/chest_xray_mini and shared/data/nih_external")
    files = []
    for root in (MINI_DATA / "test", NIH_DATA):
        for cls in ("NORMAL", "PNEUMONIA"):
            found = sorted(p for p in (root / cls).iterdir() if p.is_file())
            files += [str(p) for p in found[: PER_SITE // 2]]
    return files


def run_in_own_runtime(fmt: str, folder, images: np.ndarray) -> np.ndarray:
    """The exported file loaded by its runtime's own loader (not pneumojax's)."""
    meta = json.loads((folder / "pneumojax-export.json").read_text())
    path = folder / meta["file"]
    if fmt == "savedmodel":
        import tensorflow as tf  # noqa: PLC0415

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return serve(images=tf.constant(images))["p_pneumonia"].numpy()
    if fmt == "onnx":
        import onnxruntime as ort  # noqa: PLC0415

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        assert [o.name for o in session.get_outputs()] == ["p_pneumonia"]
        return session.run(None, {"images": images})[0]
    import jax  # noqa: PLC0415

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exported.call(images))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", list(MODES))
def test_exported_model_scores_real_images_as_predict_does(workdir, mode, fmt):
    files = real_images()
    run = _run(workdir, mode)
    folder = _export(workdir, mode, fmt)
    meta = json.loads((folder / "pneumojax-export.json").read_text())
    config = json.loads((run / "config.json").read_text())
    rows = _predicted(workdir, mode, files)
    assert [r["path"] for r in rows] == files  # every image readable: one row each
    images = pj_data.load_images(files, config["image_size"], resize=run_resize(config))
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    got = run_in_own_runtime(fmt, folder, images)
    want = np.array([r["p_pneumonia"] for r in rows], np.float32)
    assert got.dtype == np.float32 and got.shape == (len(files),)
    diff = float(np.max(np.abs(got - want)))
    print(f"parity {mode} {fmt}: max |exported - predict| = {diff:.3g} on {len(files)} images")
    threshold = meta["threshold"]
    assert threshold == rows[0]["threshold"]
    labels = np.where(got >= threshold, "PNEUMONIA", "NORMAL")
    if mode == "bf16":
        assert meta["precision"] == {"trained": "bfloat16", "exported": "float32"}
        assert diff <= BF16_TOLERANCE, diff
        clear = np.abs(want - threshold) > BF16_TOLERANCE  # labels agree away from the edge
        assert [r["label"] for r, c in zip(rows, clear) if c] == list(labels[clear])
    else:
        assert diff <= 1e-5, diff
        assert [r["label"] for r in rows] == list(labels)
    assert meta["check"]["images"] > 0 and meta["check"]["max_abs_diff"] <= (
        BF16_TOLERANCE if mode == "bf16" else 1e-5
    )
    # the batch is dynamic: one image alone scores as in the batch
    np.testing.assert_allclose(run_in_own_runtime(fmt, folder, images[:1]), got[:1], atol=1e-6)


def test_metadata_names_what_labelling_needs(workdir):
    folder = _export(workdir, "seeds", "stablehlo")
    meta = json.loads((folder / "pneumojax-export.json").read_text())
    card = json.loads((folder / "MODEL_CARD.json").read_text())  # the card travels with it
    assert card["export"] == meta and card["threshold"]["value"] == meta["threshold"]
    assert "## This export" in (folder / "MODEL_CARD.md").read_text()
    assert meta["members"] == 2 and meta["combine_rule"] == "mean"
    assert meta["input"]["shape"] == ["N", 32, 32, 3] and meta["input"]["dtype"] == "uint8"
    assert meta["output"] == {"name": "p_pneumonia", "dtype": "float32", "shape": ["N"]}
    assert meta["backbone"] == "densenet121" and meta["image_size"] == 32
    assert meta["pneumojax_version"] and meta["member_thresholds"] == [meta["threshold"]]


def test_a_non_densenet_backbone_exports_through_onnx(workdir):
    """InceptionV3's stem and mixed0 (average pooling with 'same' padding that excludes the
    padded cells) through the TF-ops rewrite and ONNX Runtime."""
    files = real_images()[:8]
    run = _run(workdir, "inception")
    folder = _export(workdir, "inception", "onnx")
    rows = predict_paths(run, files, log=lambda m: None)
    images = pj_data.load_images(files, 75)
    got = run_in_own_runtime("onnx", folder, images)
    np.testing.assert_allclose(got, [r["p_pneumonia"] for r in rows], atol=1e-5)


# --- bad input ---------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _one_error_line(r, code):
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def _no_staging(parent):
    assert not [p.name for p in parent.iterdir() if ".export" in p.name]


def test_an_unfinished_run_is_refused(workdir, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    shutil.copy(_run(workdir, "head") / "config.json", run)
    out = tmp_path / "out"
    line = _one_error_line(_invoke("--run", run, "--format", "stablehlo", "--out", out), 1)
    assert "did not finish" in line and "--resume" in line
    assert not out.exists()
    _no_staging(tmp_path)


def test_an_unknown_format_is_a_usage_error(workdir, tmp_path):
    r = _invoke("--run", _run(workdir, "head"), "--format", "tflite", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "tflite" in r.output
    assert not (tmp_path / "o").exists()


def test_an_existing_out_is_refused_unless_overwrite(workdir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = _run(workdir, "head")
    line = _one_error_line(_invoke("--run", run, "--format", "stablehlo", "--out", out), 2)
    assert "--overwrite" in line and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a previous export only: not a folder of other files, not the run
    r = _invoke("--run", run, "--format", "stablehlo", "--out", out, "--overwrite")
    assert "not a pneumojax export" in _one_error_line(r, 2)
    assert (out / "keep.txt").read_text() == "mine"
    r = _invoke("--run", run, "--format", "stablehlo", "--out", run.parent, "--overwrite")
    assert "holds the run folder" in _one_error_line(r, 2) and (run / "config.json").exists()
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the empty folder, then over that export
        r = _invoke("--run", run, "--format", "stablehlo", "--out", out, "--overwrite")
        assert r.exit_code == 0, r.output
        names = sorted(p.name for p in out.iterdir())
        assert names == ["MODEL_CARD.json", "MODEL_CARD.md", "model.stablehlo", METADATA]
    _no_staging(tmp_path)


@pytest.mark.parametrize("missing", ["tf2onnx", "onnxruntime"])
def test_a_missing_converter_names_the_install_line(workdir, tmp_path, monkeypatch, missing):
    real = pj_export.importlib.util.find_spec
    monkeypatch.setattr(
        pj_export.importlib.util, "find_spec", lambda m, *a: None if m == missing else real(m)
    )
    out = tmp_path / "out"
    r = _invoke("--run", _run(workdir, "head"), "--format", "onnx", "--out", out)
    line = _one_error_line(r, 1)
    assert missing in line and "pip install 'pneumojax[export]'" in line
    assert not out.exists()


def test_a_failure_mid_write_leaves_nothing(workdir, tmp_path, monkeypatch):
    def broken(params, apply, size, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setitem(pj_export.WRITERS, "stablehlo", broken)
    out = tmp_path / "out"
    line = _one_error_line(
        _invoke("--run", _run(workdir, "head"), "--format", "stablehlo", "--out", out), 1
    )
    assert "disk full" in line
    assert not out.exists()
    _no_staging(tmp_path)


def test_a_balance_ensemble_run_is_refused(workdir, tmp_path):
    run = tmp_path / "vote"
    shutil.copytree(_run(workdir, "head"), run)
    config = json.loads((run / "config.json").read_text())
    config["balance"] = "ensemble"
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = _one_error_line(_invoke("--run", run, "--format", "stablehlo", "--out", out), 1)
    assert "majority vote" in line and not out.exists()


def test_a_model_onnx_cannot_express_is_refused_naming_the_other_formats(workdir, tmp_path):
    run = tmp_path / "equalize"
    shutil.copytree(_run(workdir, "nocache"), run)
    config = json.loads((run / "config.json").read_text())
    config["intensity"] = "equalize"  # scatter-add and cumsum: not in the TF-ops rewrite
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = _one_error_line(_invoke("--run", run, "--format", "onnx", "--out", out), 1)
    assert "savedmodel" in line and "stablehlo" in line and not out.exists()
    _no_staging(tmp_path)


def test_a_tta_run_exports_its_plain_path_which_is_predict_with_tta_0(workdir, tmp_path):
    files = real_images()[:8]
    run = tmp_path / "tta"
    shutil.copytree(_run(workdir, "head"), run)
    config = json.loads((run / "config.json").read_text())
    config.update(tta=2, tta_augment="light")
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    r = _invoke("--run", run, "--format", "stablehlo", "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "pneumojax-export.json").read_text())
    assert meta["tta"]["run"]["views"] == 2 and meta["tta"]["exported"] is None
    assert "--tta 0" in meta["tta"]["note"]
    rows = predict_paths(run, files, tta=0, log=lambda m: None)
    got = run_in_own_runtime("stablehlo", out, pj_data.load_images(files, 32))
    np.testing.assert_allclose(got, [r["p_pneumonia"] for r in rows], atol=1e-5)
    assert meta["threshold"] == rows[0]["threshold"]


def test_the_commands_format_choice_is_the_exporters():
    from pneumojax.cli.scoring import export as command  # noqa: PLC0415
    from pneumojax.export import FORMATS  # noqa: PLC0415

    (option,) = [p for p in command.params if p.name == "fmt" or "--format" in p.opts]
    assert tuple(option.type.choices) == FORMATS
