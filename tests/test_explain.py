"""Heat maps (``pneumojax explain``, ``evaluate --explain``): they point at what the synthetic
generator drew, they depend on the trained weights, they are computed in inference mode, a
batch gives what single images give, and the formulas match a network computed by hand."""

import csv
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.stats import spearmanr

from pneumojax import heatmaps, overlays
from pneumojax.backbones import REGISTRY, get_backbone
from pneumojax.cli import main
from pneumojax.data import demo_opacity_masks, load_images, make_demo_dataset
from pneumojax.scoring import load_run
from pneumojax.inference import predict_paths
from pneumojax.predictions import read_predictions

from conftest import MINI_DATA as MINI, TINY_CUT, TINY_MID, tiny_train_args


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo set (150 images a class, 128 px) and a tiny model trained on it at
    64 px (Grad-CAM at conv2_block3_concat is a 16x16 map)."""
    root = tmp_path_factory.mktemp("explain")
    data = make_demo_dataset(root / "demo")
    run = root / "run"
    _train(tiny_train_args(data, run, image_size=64, epochs=10, batch_size=None))
    return data, run


def _test_images(run, label):
    splits = json.loads((run / "splits.json").read_text())
    return [str(Path(splits["root"]) / p) for p, y in splits["test"] if y == label]


def test_pointing_game_on_the_demo_set(demo, tmp_path, capsys):
    """The map's peak lies inside an opacity the generator drew, for >= 80% of PNEUMONIA test
    images (measured: 22 of 22 with Grad-CAM and Grad-CAM++, 21 of 22 with saliency); the
    opacity regions cover 12% of an image on average."""
    data, run = demo
    files = _test_images(run, 1)
    masks = demo_opacity_masks(data)
    for method in ("gradcam", "gradcam++", "saliency"):
        out = tmp_path / method
        r = CliRunner().invoke(
            main, ["explain", "--run", str(run), *files, "--out", str(out), "--method", method]
        )
        assert r.exit_code == 0, r.output
        rows = _read_csv(out / "explain.csv")
        assert [row["path"] for row in rows] == files
        hits = [
            masks["PNEUMONIA/" + Path(row["path"]).name][
                int(float(row["peak_y"])), int(float(row["peak_x"]))
            ]
            for row in rows
        ]
        with capsys.disabled():
            print(f"\npointing game ({method}): {sum(hits)}/{len(hits)} = {np.mean(hits):.2f}")
        assert np.mean(hits) >= 0.8, (method, np.mean(hits))


def test_explain_reports_what_predict_does(demo, tmp_path):
    """explain.csv's probability and label are predict's, exactly; one overlay per image, at
    the image's own size above a caption bar."""
    _, run = demo
    files = _test_images(run, 0)[:3] + _test_images(run, 1)[:3]
    r = CliRunner().invoke(main, ["explain", "--run", str(run), *files, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "Grad-CAM at conv2_block3_concat (default: the last block output" in r.output
    rows = _read_csv(tmp_path / "explain.csv")
    predicted = predict_paths(run, files, log=lambda m: None)
    assert [float(r["p_pneumonia"]) for r in rows] == [p["p_pneumonia"] for p in predicted]
    assert [r["label"] for r in rows] == [p["label"] for p in predicted]
    for row in rows:
        with Image.open(row["path"]) as source, Image.open(tmp_path / row["overlay"]) as overlay:
            assert overlay.width == source.width and overlay.height > source.height
            assert row["overlay"] == Path(row["path"]).stem + ".gradcam.png"


def test_maps_depend_on_the_trained_weights(demo):
    """Model-randomisation check (Adebayo et al. 2018): with the head re-initialised, the maps
    change; their rank correlation with the trained model's is weak (measured: mean Spearman
    about 0.1 over the PNEUMONIA test images)."""
    _, run = demo
    loaded = load_run(run, log=lambda m: None)
    images = load_images(_test_images(run, 1), 64, progress=False)
    trained = heatmaps.Explainer.of_run(loaded, "gradcam", TINY_CUT).maps(images)
    params = loaded.full_variables["params"]
    rng = np.random.default_rng(0)
    for layer in ("dense", "dense_1"):
        kernel = params[layer]["kernel"]
        limit = np.sqrt(6 / (kernel.shape[-2] + kernel.shape[-1]))  # glorot_uniform
        params[layer]["kernel"] = rng.uniform(-limit, limit, kernel.shape).astype(np.float32)
    randomised = heatmaps.Explainer.of_run(loaded, "gradcam", TINY_CUT).maps(images)
    rho = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(trained, randomised)]
    rho = np.nan_to_num(rho)  # an all-zero map has no ranks
    print(f"mean Spearman rank correlation, trained vs randomised head: {np.mean(rho):.3f}")
    assert np.mean(rho) < 0.5


def test_a_batch_gives_what_single_images_give(demo):
    _, run = demo
    loaded = load_run(run, log=lambda m: None)
    images = load_images(_test_images(run, 1)[:5], 64, progress=False)
    explainer = heatmaps.Explainer.of_run(loaded, "gradcam++", "conv2_block2_concat", batch_size=4)
    together = explainer.maps(images)  # two batches, the second padded
    alone = np.concatenate([explainer.maps(images[i : i + 1]) for i in range(5)])
    assert together.shape == (5, 64, 64) and together.max() > 0
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6 * together.max())


class _HandNet(nn.Module):
    """x -> tf preprocessing -> A = relu(x W) (1x1 conv, 2 channels) -> logit = sum(V * A):
    dlogit/dA = V, so Grad-CAM, Grad-CAM++ and saliency have closed forms."""

    w: np.ndarray  # (3, 2)
    v: np.ndarray  # (h, w, 2)

    @nn.compact
    def __call__(self, images, deltas=None):
        deltas = deltas or {}
        x = images / 127.5 - 1.0 + deltas.get("input", 0.0)
        a = jax.nn.relu(x @ self.w) + deltas.get("a", 0.0)
        logit = (a * self.v).sum((1, 2, 3))
        return jnp.stack([-logit, logit], -1), {"input": x, "a": a}


def test_the_formulas_on_a_network_computed_by_hand():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    v = rng.normal(size=(4, 4, 2)).astype(np.float32)
    images = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    model = _HandNet(w, v)
    _, treedef = jax.tree.flatten({})

    def maps(method, probe):
        return np.asarray(
            heatmaps.heat_maps(model, probe, method, "tf", (treedef, ()), ([], []), images)
        )

    x = images / 127.5 - 1.0
    a = np.maximum(x @ w, 0)  # (n, 4, 4, 2)
    cam = np.maximum((a * v.mean((0, 1))).sum(-1), 0)
    np.testing.assert_allclose(maps("gradcam", "a"), cam, rtol=1e-5, atol=1e-6)

    g2, g3 = v**2, v**3
    alpha = g2 / (2 * g2 + a.sum((1, 2), keepdims=True) * g3 + 1e-7)
    weights = (alpha * np.maximum(v, 0)).sum((1, 2))  # (n, 2)
    plus = np.maximum(np.einsum("nhwc,nc->nhw", a, weights), 0)
    np.testing.assert_allclose(maps("gradcam++", "a"), plus, rtol=1e-4, atol=1e-6)

    # dlogit/dpixel = sum_c W[k, c] V[c] [x W > 0]_c / 127.5; saliency takes |.| max over k.
    active = (x @ w > 0).astype(np.float32)
    pixel = np.einsum("kc,nhwc->nhwk", w, active * v) / 127.5
    np.testing.assert_allclose(
        maps("saliency", "input"), np.abs(pixel).max(-1), rtol=1e-5, atol=1e-7
    )


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("tiny") / "d", 40, 48, seed=5)


def test_maps_are_computed_in_inference_mode(tiny_data, tmp_path):
    """With trainable BatchNorm layers (TINY_MID) the maps equal those of the run's own
    trainable model called in inference mode, and differ from those with the BatchNorm in
    training mode (batch statistics): the mode matters and the right one is used."""
    run = tmp_path / "run"
    _train(tiny_train_args(tiny_data, run, trainable=TINY_MID, epochs=1))
    loaded = load_run(run, log=lambda m: None)
    info = get_backbone("densenet121")
    layer = "conv2_block2_concat"
    images = load_images(
        sorted(map(str, (tiny_data / "PNEUMONIA").iterdir()))[:8], 32, progress=False
    )
    ours = heatmaps.Explainer.of_run(loaded, "gradcam", layer).maps(images)

    from pneumojax.model import build_classifier  # noqa: PLC0415

    trainable = frozenset(loaded.config["plan"]["trainable_layers"])
    model = build_classifier(info, TINY_CUT, trainable, intermediates=(layer,))
    model = model.clone(dropout=0.0)  # only the BatchNorm mode differs below
    variables = jax.tree.map(lambda a: a[0], loaded.full_variables)

    def reference(train):
        def logit(delta):
            out = model.apply(
                variables, images, train=train, deltas={layer: delta}, mutable=["batch_stats"]
            )[0]
            return out[0][:, 1].sum(), out[1][layer]

        shape = jax.eval_shape(logit, 0.0)[1].shape
        g, a = jax.grad(logit, has_aux=True)(jnp.zeros(shape))
        cam = heatmaps._cam(g, a, plus=False)
        return np.asarray(jax.image.resize(cam, (len(images), 32, 32), "bilinear"))

    np.testing.assert_allclose(ours, reference(False), rtol=1e-4, atol=1e-5 * ours.max())
    assert not np.allclose(ours, reference(True), rtol=1e-2, atol=1e-2 * ours.max())


def test_an_ensembles_map_is_its_members_mean(tiny_data, tmp_path):
    run = tmp_path / "run"
    _train(tiny_train_args(tiny_data, run, "--balance", "ensemble", "--ensemble-size", "3"))
    loaded = load_run(run, log=lambda m: None)
    images = load_images(
        sorted(map(str, (tiny_data / "PNEUMONIA").iterdir()))[:6], 32, progress=False
    )
    mean = heatmaps.Explainer.of_run(loaded, "gradcam", TINY_CUT).maps(images)
    singles = []
    for i in range(3):
        one = load_run(run, log=lambda m: None)
        one.full_variables = jax.tree.map(lambda a, i=i: a[i : i + 1], one.full_variables)
        one.thresholds = one.thresholds[i : i + 1]
        singles.append(heatmaps.Explainer.of_run(one, "gradcam", TINY_CUT).maps(images))
    assert not np.allclose(singles[0], singles[1])  # members differ
    np.testing.assert_allclose(mean, np.mean(singles, 0), rtol=1e-4, atol=1e-6 * mean.max())
    shared, differ, _ = heatmaps._shared_and_member_variables(loaded.full_variables)
    assert len(differ) == 4  # the two heads' kernels and biases; the backbone runs once
    r = CliRunner().invoke(
        main, ["explain", "--run", str(run), str(tiny_data / "NORMAL"), "--out", str(tmp_path)]
    )
    assert r.exit_code == 0 and "the mean of the 3 ensemble members' maps" in r.output, r.output


def test_evaluate_explain_sheets_the_most_confident_errors(demo, tmp_path):
    _, run = demo
    out = tmp_path / "eval" / "metrics.json"
    r = CliRunner().invoke(
        main, ["evaluate", "--run", str(run), "--out", str(out), "--explain", "2"]
    )
    assert r.exit_code == 0, r.output
    paths, labels, member_p = read_predictions(out.parent / "predictions.csv")
    threshold = json.loads(out.read_text())["threshold"]
    p = member_p[:, 0]
    fp = sorted(
        (i for i in range(len(p)) if labels[i] == 0 and p[i] >= threshold), key=lambda i: -p[i]
    )[:2]
    fn = sorted(
        (i for i in range(len(p)) if labels[i] == 1 and p[i] < threshold), key=lambda i: p[i]
    )[:2]
    rows = _read_csv(out.parent / "explain" / "explain.csv")
    assert [r["path"] for r in rows] == [paths[i] for i in fp + fn]
    assert all((out.parent / "explain" / r["overlay"]).exists() for r in rows)
    assert (out.parent / "plots" / "errors.png").stat().st_size > 10_000
    assert f"({len(fp)} false positives, {len(fn)} false negatives)" in r.output


def test_usage_errors(demo, tmp_path):
    _, run = demo
    image = _test_images(run, 1)[0]
    base = ["explain", "--run", str(run), image, "--out", str(tmp_path)]
    for extra, expected in (
        (["--layer", "conv2_block3_concta"], "Nearest: conv2_block3_concat"),
        (["--layer", "conv3_block1_concat"], "is after the run's cut conv2_block3_concat"),
        (["--method", "saliency", "--layer", "pool1"], "does not apply to --method saliency"),
        (["--method", "cam"], "'cam' is not one of"),
    ):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and expected in r.output, r.output
    r = CliRunner().invoke(
        main, ["evaluate", "--run", str(run), "--explain", "1", "--explain-layer", "dense"]
    )
    assert r.exit_code == 2 and "'--explain-layer'" in r.output, r.output
    assert not list(tmp_path.iterdir())  # nothing was written


def test_default_layers_are_the_last_block_outputs_before_the_cut():
    expected = {
        "resnet152": "conv5_block2_out",
        "resnet50v2": "conv5_block3_out",
        "densenet121": "conv5_block14_concat",
        "inception_v3": "mixed9",
    }
    for name, info in REGISTRY.items():
        assert heatmaps.default_layer(info, info.default_cut) == expected[name]
    info = get_backbone("inception_v3")
    assert heatmaps.default_layer(info, "mixed7") == "mixed7"
    assert heatmaps.default_layer(info, "conv2d_3") == "conv2d_3"  # in the stem: the cut


def test_overlay_names_never_clash():
    files = ["a/NORMAL/x.jpeg", "a/PNEUMONIA/x.jpeg", "b/PNEUMONIA/x.png", "c/y.jpeg"]
    names = overlays.overlay_names(files, "gradcam")
    assert names == [
        "NORMAL_x.gradcam.png",
        "PNEUMONIA_x.gradcam.png",
        "PNEUMONIA_x-2.gradcam.png",
        "y.gradcam.png",
    ]


@pytest.mark.skipif(
    not MINI.exists(), reason=f"chest_xray_mini not found at {MINI} (set PNEUMOJAX_MINI_DATA)"
)
def test_real_images_get_overlays_at_their_own_size(demo, tmp_path):
    """Real chest X-rays (chest_xray_mini, various sizes) explained by a run: each overlay
    has its image's own width and height (plus the caption bar)."""
    _, run = demo
    files = sorted((MINI / "test" / "PNEUMONIA").iterdir())[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    r = CliRunner().invoke(
        main, ["explain", "--run", str(run), str(folder), "--out", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    for row in _read_csv(tmp_path / "out" / "explain.csv"):
        with (
            Image.open(row["path"]) as source,
            Image.open(tmp_path / "out" / row["overlay"]) as overlay,
        ):
            assert overlay.width == source.width and overlay.height > source.height
            assert 0 <= float(row["peak_x"]) < source.width
            assert 0 <= float(row["peak_y"]) < source.height


def test_a_dicom_is_explained_at_its_own_size(demo, tmp_path):
    from test_dicom import gradient, write_dicom  # noqa: PLC0415

    _, run = demo
    write_dicom(tmp_path / "scan.dcm", gradient(rows=70, columns=50, bits=12))
    r = CliRunner().invoke(
        main, ["explain", "--run", str(run), str(tmp_path / "scan.dcm"), "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    (row,) = _read_csv(tmp_path / "explain.csv")
    with Image.open(tmp_path / row["overlay"]) as overlay:
        assert overlay.width == 50 and overlay.height > 70
    assert (
        float(row["p_pneumonia"])
        == predict_paths(run, [str(tmp_path / "scan.dcm")])[0]["p_pneumonia"]
    )


def test_a_seed_ensemble_with_tta_is_explained_as_predict_scores_it(tiny_data, tmp_path):
    """A seed ensemble (one threshold on the members' mean) trained with TTA: the maps average
    both members, and explain.csv's probabilities and labels are predict's (TTA included)."""
    run = tmp_path / "run"
    _train(tiny_train_args(tiny_data, run, "--seed-ensemble", "2", "--tta", "2", epochs=1))
    files = sorted(map(str, (tiny_data / "PNEUMONIA").iterdir()))[:4]
    r = CliRunner().invoke(main, ["explain", "--run", str(run), *files, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "the mean of the 2 ensemble members' maps" in r.output
    assert "probabilities with the run's" in r.output
    rows = _read_csv(tmp_path / "explain.csv")
    predicted = predict_paths(run, files, log=lambda m: None)
    assert [float(r["p_pneumonia"]) for r in rows] == [p["p_pneumonia"] for p in predicted]
    assert [r["label"] for r in rows] == [p["label"] for p in predicted]


def test_overlay_is_blended_in_float32_rows_and_matches_matplotlib():
    """Finding 9 of the faults issue: the overlay of a huge image was made in float64 RGBA
    (a 12000 x 12000 DICOM: about 8 GB). It is the same picture, within one grey level, made in
    float32 a few rows at a time."""
    import tracemalloc  # noqa: PLC0415

    from matplotlib import colormaps  # noqa: PLC0415

    from pneumojax.overlays import heat_to_image, overlay_pixels  # noqa: PLC0415

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (301, 257), dtype=np.uint8)
    heat = rng.random((7, 7)).astype(np.float32)
    colour = colormaps["inferno"](heat_to_image(heat, 257, 301))[..., :3] * 255.0
    reference = np.clip(np.rint(0.6 * gray[..., None].astype(np.float64) + 0.4 * colour), 0, 255)
    ours = overlay_pixels(gray, heat, 0.4)
    assert ours.dtype == np.uint8 and ours.shape == (301, 257, 3)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert (ours == reference).mean() > 0.999

    big = np.zeros((3000, 3000), np.uint8)
    tracemalloc.start()
    overlay_pixels(big, heat)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # float64 RGBA of the whole image alone would be 288 MB; ours holds the uint8 result
    # (27 MB), the float32 map (36 MB), its colour index (9 MB) and a few rows
    assert peak < 120e6, peak
