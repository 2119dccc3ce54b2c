"""``--intensity``: per-image grey-level normalisation inside the model."""

import json
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.backbones import get_backbone
from pneumojax.cli import main
from pneumojax.data import load_images, make_demo_dataset
from pneumojax.intensity import normalize_intensity
from pneumojax.model import build_classifier

from conftest import MINI_DATA, NIH_DATA, RESCORED_METRICS, TINY_CUT, tiny_train_args


def _grey_images(n=6, size=64, seed=0):
    real = sorted(MINI_DATA.glob("train/*/*.jpeg"))[:3] + sorted(NIH_DATA.glob("*/*.png"))[:3]
    if real:
        return load_images([str(p) for p in real], size)[..., 0]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def test_equalize_is_opencvs_equalize_hist():
    grey = _grey_images()
    out = np.asarray(normalize_intensity(np.repeat(grey[..., None], 3, -1), "equalize"))
    for g, o in zip(grey, out):
        np.testing.assert_array_equal(o[..., 0], cv2.equalizeHist(g))
        np.testing.assert_array_equal(o[..., 0], o[..., 2])
    constant = np.full((1, 8, 8, 3), 7, np.uint8)  # OpenCV keeps a constant image's level
    assert np.asarray(normalize_intensity(constant, "equalize")).max() == 7


@pytest.mark.parametrize("size", [64, 50, 128])
def test_clahe_is_opencvs_clahe(size):
    """Every pixel as cv2.createCLAHE(2.0, (g, g)).apply gives it, also where the size is not a
    whole number of tiles (OpenCV pads by reflection) and on a constant image."""
    from pneumojax.intensity import clahe_tiles  # noqa: PLC0415

    grey = _grey_images(size=size)
    constant = np.full((1, size, size), 90, np.uint8)
    ramp = np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))[None]
    grey = np.concatenate([grey, constant, ramp])
    out = np.asarray(normalize_intensity(np.repeat(grey[..., None], 3, -1), "clahe"))
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(clahe_tiles(size),) * 2)
    for g, o in zip(grey, out):
        np.testing.assert_array_equal(o[..., 0], clahe.apply(g))
        np.testing.assert_array_equal(o[..., 0], o[..., 1])
    assert clahe_tiles(64) == 4 and clahe_tiles(224) == 8 and clahe_tiles(16) == 1


def test_equalize_takes_out_exposure_and_contrast():
    # Any strictly increasing remapping of the grey levels (here darker and twice the
    # contrast) leaves the equalised image exactly as it was.
    grey = (_grey_images() // 2).astype(np.uint8)  # levels 0..127
    remapped = (2 * grey + 1).astype(np.uint8)
    a, b = (
        normalize_intensity(np.repeat(g[..., None], 3, -1), "equalize") for g in (grey, remapped)
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    none = normalize_intensity(np.repeat(grey[..., None], 3, -1), "none")
    assert not np.array_equal(np.asarray(none), np.asarray(a))


def test_standardize_gives_each_image_the_same_mean_and_spread():
    grey = _grey_images().astype(np.float32)
    out = np.asarray(normalize_intensity(np.repeat(grey[..., None], 3, -1), "standardize"))[..., 0]
    np.testing.assert_allclose(out.mean((1, 2)), 127.5, atol=1e-3)
    np.testing.assert_allclose(out.std((1, 2)), 42.5, rtol=1e-3)
    brighter = np.asarray(
        normalize_intensity(np.repeat(grey[..., None] * 0.5 + 60, 3, -1), "standardize")
    )[..., 0]
    np.testing.assert_allclose(brighter, out, atol=1e-3)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown intensity method"):
        normalize_intensity(np.zeros((1, 4, 4, 3), np.uint8), "clahe2")


def test_the_classifier_sees_normalised_images():
    info = get_backbone("densenet121")
    grey = (_grey_images(size=32) // 2).astype(np.uint8)
    x, remapped = (np.repeat(g[..., None], 3, -1) for g in (grey, 2 * grey + 1))
    logits = {}
    for method in ("none", "equalize"):
        model = build_classifier(info, TINY_CUT, frozenset(), intensity=method)
        variables = model.init(jax.random.key(0), x[:1])
        logits[method] = [np.asarray(model.apply(variables, im)) for im in (x, remapped)]
    np.testing.assert_array_equal(*logits["equalize"])
    assert not np.allclose(*logits["none"])


def test_a_run_with_intensity_rescores_exactly_and_caches_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "demo", n_per_class=24, image_size=40, seed=3)
    runs = {}
    for method in ("none", "equalize"):
        run = tmp_path / method
        r = CliRunner().invoke(main, tiny_train_args(data, run, "--intensity", method))
        assert r.exit_code == 0, r.output
        assert json.loads((run / "config.json").read_text())["intensity"] == method
        runs[method] = run
    # one activation cache entry per normalisation, per split: the runs did not share them
    features = [p for p in Path(tmp_path / "cache" / "features").iterdir() if p.is_dir()]
    assert len(features) == 6
    run = runs["equalize"]
    trained = json.loads((run / "metrics.json").read_text())
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in RESCORED_METRICS:
        assert again[key] == trained[key], key
