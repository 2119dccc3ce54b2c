"""``--resize keras`` is exactly the study's ``tf.image.resize`` (bilinear, no antialiasing), the
default stays PIL's antialiased bilinear, and a run resizes at evaluate/predict as it trained."""

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumojax import data
from pneumojax.cli import main
from pneumojax.data import make_demo_dataset
from pneumojax.data.resize import resize_image, tf_bilinear

from conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]
MINI = Path(os.environ.get("PNEUMOJAX_MINI_DATA", REPO.parent / "shared/data/chest_xray_mini"))
# (in H, in W, channels or None, out H, out W): downscales by odd factors, upscales, 1-pixel
# images, an unchanged size and a very wide strip.
SHAPES = [
    (256, 316, None, 128, 128),
    (300, 256, 3, 128, 128),
    (7, 5, 3, 16, 9),
    (1000, 1200, None, 224, 224),
    (64, 64, 3, 64, 64),
    (1, 1, None, 4, 4),
    (3, 900, None, 128, 64),
    (2, 2, 3, 1, 1),
]


@pytest.mark.tensorflow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(d) for d in s if d))
def test_keras_resize_is_tf_image_resize_on_random_images(shape):
    import tensorflow as tf

    h, w, c, oh, ow = shape
    a = np.random.default_rng(sum(shape[:2])).integers(
        0, 256, (h, w) + ((c,) if c else ()), dtype=np.uint8
    )
    ref = tf.image.resize(a if c else a[..., None], (oh, ow)).numpy()
    ours = tf_bilinear(a, oh, ow)
    assert ours.dtype == np.float32 and ours.shape == ((oh, ow, c) if c else (oh, ow))
    np.testing.assert_allclose(ours, ref if c else ref[..., 0], rtol=0, atol=1e-3)


def _real_files(count: int) -> list[Path]:
    files = sorted(MINI.glob("*/*/*.jpeg")) if MINI.is_dir() else []
    if not files:
        pytest.skip(f"no real images at {MINI} (set PNEUMOJAX_MINI_DATA)")
    gray = [f for f in files if Image.open(f).mode == "L"][:count]
    rgb = [f for f in files if Image.open(f).mode == "RGB"][:count]
    return gray + rgb


@pytest.mark.tensorflow
def test_keras_resize_equals_the_study_pipeline_on_real_images(tmp_path):
    """decode_image(..., 'keras') is tf.image.resize of the decoded image, rounded: within half
    a grey level before rounding, so identical after it except ties. TensorFlow decodes JPEG
    with libjpeg's fast integer IDCT by default; its accurate one is the one PIL uses, so the
    reference decodes with it (pipeline_parity.py measures the default's small difference)."""
    import tensorflow as tf

    files = _real_files(3)
    # A lossless PNG too: no IDCT at all, the decoders must agree exactly.
    png = tmp_path / "gray.png"
    Image.open(files[0]).save(png)
    for path in [*files, png]:
        raw = tf.io.read_file(str(path))
        full = (
            tf.io.decode_png(raw, channels=3)
            if path.suffix == ".png"
            else tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE")
        )
        for size in (128, 37):
            ref = tf.image.resize(full, (size, size)).numpy()
            ours = data.decode_image(path, size, "keras")
            assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
            assert np.abs(ours - ref).max() <= 0.5 + 1e-3, (path.name, size)
            assert (ours == np.clip(np.rint(ref), 0, 255)).mean() > 0.999


def test_the_two_methods_differ_only_when_downscaling():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80), dtype=np.uint8))
    same = {m: resize_image(gray.resize((32, 32)), 32, m) for m in ("antialias", "keras")}
    np.testing.assert_array_equal(same["antialias"], same["keras"])  # no resampling at all
    np.testing.assert_array_equal(same["keras"], np.asarray(gray.resize((32, 32))))
    down = {m: resize_image(gray, 20, m).astype(int) for m in ("antialias", "keras")}
    # Antialiasing averages the noise away; sampling 2 x 2 pixels keeps much more of it.
    assert down["antialias"].std() < 0.7 * down["keras"].std()
    with pytest.raises(ValueError, match="expected one of antialias, keras"):
        resize_image(gray, 20, "bicubic")


def test_the_decoded_image_cache_is_kept_per_method(tmp_path):
    demo = make_demo_dataset(tmp_path / "demo", n_per_class=3, image_size=48, seed=0)
    items = data.find_images(demo).items
    paths = [p for p, _ in items]
    cache = tmp_path / "cache"
    a = data.load_images(items, 20, cache_dir=cache, progress=False)
    k = data.load_images(items, 20, cache_dir=cache, progress=False, resize="keras")
    assert len(list(cache.glob("images-20px-antialias-*.npy"))) == 1
    assert len(list(cache.glob("images-20px-keras-*.npy"))) == 1
    assert not np.array_equal(a, k)
    np.testing.assert_array_equal(k, data.load_images(items, 20, progress=False, resize="keras"))
    assert data.image_set_key(paths, 20) == data.image_set_key(paths, 20, "antialias")
    assert data.image_set_key(paths, 20, "keras") != data.image_set_key(paths, 20)
    with pytest.raises(ValueError, match="resize 'area'"):
        data.load_images(items, 20, progress=False, resize="area")


def test_a_keras_resize_run_stores_it_and_rescores_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    demo = make_demo_dataset(tmp_path / "demo", n_per_class=24, image_size=48, seed=1)
    run = tmp_path / "run"
    r = CliRunner().invoke(main, tiny_train_args(demo, run, "--resize", "keras", epochs=1))
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["resize"] == "keras"
    images = tmp_path / "cache" / "images"
    assert list(images.glob("images-32px-keras-*.npy"))
    assert not list(images.glob("images-32px-antialias-*.npy"))
    trained = json.loads((run / "metrics.json").read_text())

    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in ("threshold", "confusion_matrix", "auc", "at_0_5", "ci95"):
        assert again[key] == trained[key], key
    assert not list(images.glob("images-32px-antialias-*.npy"))  # evaluate resized as trained

    stored = list(csv.DictReader(io.StringIO((run / "predictions" / "test.csv").read_text())))
    r = CliRunner().invoke(main, ["predict", "--run", str(run)] + [row["path"] for row in stored])
    assert r.exit_code == 0, r.output
    predicted = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [float(row["p_pneumonia"]) for row in predicted] == [
        float(row["p_pneumonia"]) for row in stored
    ]
