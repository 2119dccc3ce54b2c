"""Augmentation on the device (``--device-augment``): the spec, each transform against a known
case, per-sample draws that depend on the seed, step and sample index only, the train step
(augments the images, keeps the labels, adds nothing when off), and whole runs: the cache rule,
re-scoring, resume, and ``none`` leaving a run exactly as it was."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.augment import (
    PRESETS,
    AugmentSpec,
    AugmentSpecError,
    apply_params,
    augment,
    draw_params,
    parse_augment,
)
from pneumojax.cli import main

from conftest import REPO, TINY_CUT, TINY_MID, run_figures, tiny_train_args

STRONG = PRESETS["strong"]


def _pattern(n=1, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


# The spec


def test_presets_and_items_parse_and_print_back():
    assert parse_augment("none") == AugmentSpec() and AugmentSpec().identity
    assert parse_augment("light") == PRESETS["light"]
    spec = parse_augment("rotate=10, translate=0.08,scale=0.9:1.1,crop=0.8,hflip=0.5,fill=edge")
    assert spec == AugmentSpec(
        rotate=10, translate=0.08, scale=(0.9, 1.1), crop=0.8, hflip=0.5, fill="edge"
    )
    assert parse_augment("strong,noise=0") == AugmentSpec(**{**vars(STRONG), "noise": 0.0})
    for s in (spec, STRONG, PRESETS["light"]):
        assert parse_augment(str(s)) == s
    assert str(AugmentSpec()) == "none" and str(AugmentSpec(fill="edge")) == "none"
    assert not any(getattr(p, "hflip") for p in PRESETS.values())  # no flip unless asked


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("heavy", "not a preset"),
        ("rotate=ten", "not a number"),
        ("rotate=270", "must be in [0, 180]"),
        ("scale=1.1", "give a range LO:HI"),
        ("scale=1.2:0.8", "0 < LO <= HI"),
        ("zoom=2", "unknown transform 'zoom'"),
        ("rotate=5,rotate=6", "given twice"),
        ("rotate=5,light", "a preset can only come first"),
        ("crop=0", "must be in"),
        ("fill=wrap", "choose constant or edge"),
        ("noise=inf", "not a finite number"),
        ("blur=9", "must be in [0, 8]"),
        ("sharpen=-1", "must be in [0, 4]"),
    ],
)
def test_bad_specs_are_clear_errors(text, message):
    with pytest.raises(AugmentSpecError) as e:
        parse_augment(text)
    assert message in str(e.value)


def test_a_bad_spec_is_a_usage_error_on_the_command_line_and_in_an_experiment_file(tmp_path):
    r = CliRunner().invoke(main, ["train", "--device-augment", "rotate=ten", "--dry-run"])
    assert r.exit_code == 2
    assert "--device-augment" in r.output and "not a number" in r.output
    from pneumojax.experiments import (
        ExperimentError,
        check_options,
        load_experiment,
        resolve_options,
    )

    (tmp_path / "aug.toml").write_text('backbone = "densenet121"\ndevice_augment = "light"\n')
    assert resolve_options(load_experiment(tmp_path / "aug.toml")).device_augment == "light"
    with pytest.raises(ExperimentError, match="x.toml: device_augment = .*unknown transform"):
        check_options({"device_augment": "zoom=2"}, "x.toml")


# Each transform against a known case (parameters given, not drawn)


def _geometric(images, matrix, offset, fill="constant"):
    n = len(images)
    params = {
        "matrix": jnp.broadcast_to(jnp.asarray(matrix, jnp.float32), (n, 2, 2)),
        "offset": jnp.broadcast_to(jnp.asarray(offset, jnp.float32), (n, 2)),
    }
    return np.asarray(apply_params(jnp.asarray(images), params, fill))


def test_the_identity_map_and_the_identity_spec_return_the_input_exactly():
    x = _pattern(3)
    np.testing.assert_array_equal(_geometric(x, np.eye(2), [0, 0]), x)
    assert augment(jax.random.key(0), x, AugmentSpec()) is x
    assert augment(jax.random.key(0), x, AugmentSpec(fill="edge")) is x


def test_a_translation_by_k_pixels_shifts_the_pattern_by_k_pixels():
    x, k = _pattern(2), 3
    # output pixel p samples the input at p - (k, -2): content moves down k and left 2
    out = _geometric(x, np.eye(2), [-k, 2])
    np.testing.assert_array_equal(out[:, k:, :-2], x[:, :-k, 2:])
    assert (out[:, :k] == 0).all() and (out[:, :, -2:] == 0).all()  # constant fill: black
    edge = _geometric(x, np.eye(2), [-k, 0], fill="edge")
    np.testing.assert_array_equal(edge[:, k:], x[:, :-k])
    np.testing.assert_array_equal(edge[:, :k], np.repeat(x[:, :1], k, axis=1))


def test_a_rotation_by_90_degrees_is_rot90():
    x = _pattern(2)
    theta = np.pi / 2  # counterclockwise as displayed, as np.rot90
    m = [[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]]
    out = _geometric(x, m, [0, 0])
    expected = np.rot90(x, axes=(1, 2))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # cos(pi/2) ~ 4e-8


def test_a_crop_of_the_centre_half_resized_is_bilinear_on_a_ramp():
    size = 17
    ramp = np.broadcast_to(np.arange(size, dtype=np.uint8)[None, :, None] * 15, (size, size, 3))
    out = _geometric(ramp[None], np.eye(2) * 0.5, [0, 0])  # window of half the side, centred
    c = (size - 1) / 2
    expected = 15 * (c + 0.5 * (np.arange(size) - c))  # bilinear is exact on a linear ramp
    np.testing.assert_allclose(out[0, 5, :, 0], np.round(expected), atol=1)
    assert (out[0] == out[0, :1]).all()  # rows stay the same


def test_photometric_transforms_on_known_cases():
    x = np.full((1, 8, 8, 3), 100, np.uint8)
    x[0, :4] = 60  # mean 80

    def run(**params):
        p = {k: jnp.asarray([v], jnp.float32) for k, v in params.items()}
        return np.asarray(apply_params(jnp.asarray(x), p)).astype(float)

    assert run(brightness=20.0).mean() == pytest.approx(100.0)  # shifts the mean
    out = run(contrast=1.5)  # scales the spread about the mean, keeps the mean
    assert out.mean() == pytest.approx(80.0) and set(np.unique(out)) == {50.0, 110.0}
    out = run(gamma=2.0)
    assert set(np.unique(out)) == {round(255 * (60 / 255) ** 2), round(255 * (100 / 255) ** 2)}
    noise = np.random.default_rng(0).normal(0, 4.0, (1, 8, 8, 1)).astype(np.float32)
    out = np.asarray(apply_params(jnp.asarray(x), {"noise": jnp.asarray(noise)})).astype(float)
    np.testing.assert_array_equal(out - x, np.round(x + noise) - x)  # the same in each channel
    assert run(brightness=-200.0).min() == 0 and run(brightness=300.0).max() == 255  # clipped


def test_blur_is_scipys_gaussian_filter_and_sharpen_adds_texture():
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    x = _pattern(3, size=20)
    sigma = np.array([0.0, 0.8, 2.5], np.float32)
    out = np.asarray(apply_params(jnp.asarray(x), {"blur": jnp.asarray(sigma)}, max_blur=2.5))
    np.testing.assert_array_equal(out[0], x[0])  # sigma 0: unchanged
    for i in (1, 2):
        ref = gaussian_filter(
            x[i].astype(np.float32), (sigma[i], sigma[i], 0), mode="nearest", truncate=3.0
        )
        assert np.abs(out[i] - ref).max() <= 0.5 + 1e-3  # rounded to uint8
    one = np.repeat(x[:1], 3, axis=0)  # one image, three sharpening amounts
    soft = np.asarray(apply_params(jnp.asarray(one), {"blur": jnp.full(3, 1.5)}, max_blur=1.5))

    def texture(im):
        return np.abs(np.diff(im.astype(float), axis=2)).mean()

    sharp = np.asarray(apply_params(jnp.asarray(soft), {"sharpen": jnp.asarray([0.0, 1.0, 2.0])}))
    np.testing.assert_array_equal(sharp[0], soft[0])  # amount 0: unchanged
    assert texture(soft[0]) < texture(sharp[1]) < texture(sharp[2])
    # blur and sharpen draw from their own key: every other transform is drawn as before
    a = draw_params(jax.random.key(3), STRONG, (8, 16, 16, 3))
    b = draw_params(jax.random.key(3), parse_augment("strong,blur=1,sharpen=1"), (8, 16, 16, 3))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert 0 <= np.asarray(b["blur"]).min() and np.asarray(b["blur"]).max() <= 1


def test_hflip_only_when_asked_and_then_it_mirrors():
    x = _pattern(4)
    flipped = np.asarray(augment(jax.random.key(0), x, AugmentSpec(hflip=1.0)))
    np.testing.assert_array_equal(flipped, x[:, :, ::-1])
    p = draw_params(jax.random.key(0), AugmentSpec(rotate=1.0), (64, 16, 16, 3))
    assert (np.asarray(p["matrix"])[:, 1, 1] > 0).all()  # never mirrored without hflip


def test_drawn_parameters_stay_in_their_ranges():
    spec = AugmentSpec(
        rotate=10, translate=0.1, scale=(0.9, 1.2), gamma=0.2, contrast=0.3, brightness=0.1
    )
    p = jax.tree.map(np.asarray, draw_params(jax.random.key(1), spec, (256, 20, 20, 3)))
    m = p["matrix"]
    angle = np.degrees(np.arctan2(m[:, 0, 1], m[:, 0, 0]))
    zoom = 1 / np.sqrt(np.abs(np.linalg.det(m)))
    assert np.abs(angle).max() <= 10 and np.abs(angle).max() > 8
    assert zoom.min() >= 0.9 - 1e-6 and zoom.max() <= 1.2 + 1e-6
    assert 1 / 1.2 - 1e-6 <= p["gamma"].min() and p["gamma"].max() <= 1.2 + 1e-6
    assert np.abs(p["contrast"] - 1).max() <= 0.3 and np.abs(p["brightness"]).max() <= 25.5


# The draws: per sample, from (key, sample index) alone


def test_every_sample_gets_its_own_draw_from_the_key_and_its_index():
    x = np.repeat(_pattern(1, size=24), 6, axis=0)  # six copies of one image
    a = np.asarray(augment(jax.random.key(7), x, STRONG))
    assert a.shape == x.shape and a.dtype == np.uint8
    assert all(not np.array_equal(a[i], x[i]) for i in range(6))  # every input changed
    assert len({a[i].tobytes() for i in range(6)}) == 6  # each its own transform
    np.testing.assert_array_equal(np.asarray(augment(jax.random.key(7), x, STRONG)), a)
    assert not (np.asarray(augment(jax.random.key(8), x, STRONG)) == a).all()
    # sample i's draw does not depend on the batch around it (so not on the devices either)
    np.testing.assert_array_equal(np.asarray(augment(jax.random.key(7), x[:3], STRONG)), a[:3])
    jitted = jax.jit(augment, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(jitted(jax.random.key(7), x, STRONG)), a)


_SHARDED = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pneumojax.augment import PRESETS, augment
    from pneumojax.step import make_mesh
    assert jax.device_count() == 2
    x = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), np.uint8)
    sharded = jax.device_put(x, NamedSharding(make_mesh(), P("data")))
    out = jax.jit(augment, static_argnums=2)(jax.random.key(7), sharded, PRESETS["strong"])
    np.save({out!r}, np.asarray(out))
""")


def test_a_batch_sharded_over_two_devices_augments_as_on_one(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), np.uint8)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    out = tmp_path / "two.npy"
    script = _SHARDED.format(out=str(out))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=REPO)
    np.testing.assert_array_equal(np.load(out), np.asarray(augment(jax.random.key(7), x, STRONG)))


# The train step


def _tiny_step_inputs(k=2, n=8, size=32):
    from pneumojax.backbones import get_backbone
    from pneumojax.model import build_classifier, init_variables
    from pneumojax.optim import make_optimizer

    info = get_backbone("densenet121")
    model = build_classifier(info, TINY_CUT, frozenset())
    variables = init_variables(model, size, 0)
    tx = make_optimizer(variables["params"], frozenset(), 1e-3)
    from pneumojax.step import create_train_state

    state = create_train_state(tx, [variables] * k)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (k, n, size, size, 3), np.uint8),
        "label": rng.integers(0, 2, (k, n)).astype(np.int32),
        "weight": np.ones((k, n), np.float32),
    }
    keys = jax.random.split(jax.random.key(3), k)
    return model, tx, state, batch, keys


def test_the_step_without_augmentation_is_the_plain_step():
    from pneumojax.step import train_members_step

    model, tx, state, batch, keys = _tiny_step_inputs(k=1)
    plain = jax.make_jaxpr(lambda *a: train_members_step(model, tx, *a))(state, batch, keys)
    for spec in (None, parse_augment("none"), AugmentSpec(fill="edge")):
        same = jax.make_jaxpr(lambda *a: train_members_step(model, tx, *a, augment_spec=spec))
        assert str(same(state, batch, keys)) == str(plain)
    augmented = jax.make_jaxpr(lambda *a: train_members_step(model, tx, *a, augment_spec=STRONG))
    assert str(augmented(state, batch, keys)) != str(plain)


def test_the_step_trains_each_member_on_its_own_augmented_images_with_the_same_labels():
    """One augmented step equals the plain step on images augmented outside it, with the
    member's key folded with AUGMENT_STREAM and the step number: the labels and weights go
    through untouched, and each member of an ensemble draws its own transforms."""
    from pneumojax.step import AUGMENT_STREAM, train_members_step

    model, tx, state, batch, keys = _tiny_step_inputs(k=2)
    state = state.replace(step=state.step + 5)  # a later step draws from its own number
    step = jax.jit(train_members_step, static_argnums=(0, 1), static_argnames="augment_spec")
    new, metrics = step(model, tx, state, batch, keys, augment_spec=STRONG)
    outside = np.stack(
        [
            np.asarray(
                augment(
                    jax.random.fold_in(jax.random.fold_in(keys[i], AUGMENT_STREAM), 5),
                    batch["image"][i],
                    STRONG,
                )
            )
            for i in range(2)
        ]
    )
    assert not np.array_equal(outside[0], outside[1])  # members draw apart
    ref, ref_metrics = step(model, tx, state, {**batch, "image": outside}, keys)
    # Fused inside the step, a pixel or two can round to the next grey level: the losses agree
    # to 1e-4, and Adam turns that into at most a fraction of one step (lr 1e-3) on a few
    # near-zero gradients. Other labels, or other images, move the loss by far more.
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-4)
    np.testing.assert_array_equal(metrics["accuracy"], ref_metrics["accuracy"])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert diff.max() < 5e-4 and (diff > 1e-5).mean() < 1e-2
    _, unaugmented = step(model, tx, state, batch, keys)
    assert np.abs(np.asarray(metrics["loss"]) - unaugmented["loss"]).min() > 1e-3


def test_augmentation_refuses_cached_activations():
    from pneumojax.step import train_step

    model, tx, state, batch, keys = _tiny_step_inputs(k=1)
    one = jax.tree.map(lambda a: a[0], (state, batch))
    with pytest.raises(ValueError, match="needs the images, not cached activations"):
        train_step(model, tx, one[0], {**one[1], "image": {"x": 0}}, keys[0], STRONG)


# Whole runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pneumojax.data import make_demo_dataset

    root = tmp_path_factory.mktemp("augment")
    return make_demo_dataset(root / "xray", n_per_class=30, image_size=40, seed=1)


@pytest.mark.slow
def test_an_augmented_run_skips_the_cache_rescores_exactly_and_resumes_to_the_same_end(
    demo, tmp_path, monkeypatch
):
    from pneumojax.config import TrainConfig
    from pneumojax.run import train_run
    from pneumojax.train import Interrupted

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    # A mid-range trainable part: without augmentation the frozen prefix would be cached.
    args = tiny_train_args(
        demo, ref, "--device-augment", "strong", "--patience", "0", trainable=TINY_MID
    )
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"device augmentation: {STRONG} on every training batch" in r.output
    assert "feature cache:" not in r.output and not (tmp_path / "cache" / "features").exists()
    config = json.loads((ref / "config.json").read_text())
    assert config["device_augment"] == str(STRONG) and config["feature_cache"] is False
    assert config["requested"]["device_augment"] == "strong"
    assert config["requested"]["feature_cache"] is True

    r = CliRunner().invoke(main, ["evaluate", "--run", str(ref), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((ref / "eval-test" / "metrics.json").read_text())
    trained = json.loads((ref / "metrics.json").read_text())
    for key in ("threshold", "confusion_matrix", "auc"):
        assert again[key] == trained[key], key

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(demo),
        weights="none",
        cut=TINY_CUT,
        trainable=TINY_MID,
        image_size=32,
        batch_size=8,
        epochs=2,
        patience=0,
        device_augment="strong",
        out=str(run),
    )
    with pytest.raises(Interrupted, match="epoch 1, batch 2;"):
        train_run(cfg, log=lambda line: None, stop_after_steps=2)
    resumed = CliRunner().invoke(main, ["train", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 1, batch 2" in resumed.output
    assert f"device augmentation: {STRONG}" in resumed.output
    assert run_figures(run) == run_figures(ref)


def test_device_augment_none_leaves_a_run_exactly_as_it_was(demo, tmp_path, monkeypatch):
    """``none`` (the default) adds nothing: the same cache use, figures and weights as a run
    that does not name the option (whose step is the plain one: see the jaxpr test above)."""
    from pneumojax.checkpoint import load_variables

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name, extra in (("plain", []), ("none", ["--device-augment", "none"])):
        r = CliRunner().invoke(main, tiny_train_args(demo, tmp_path / name, *extra))
        assert r.exit_code == 0, r.output
        assert "feature cache: training on cached activations" in r.output
        assert "device augmentation" not in r.output
        runs[name] = tmp_path / name
    assert run_figures(runs["plain"]) == run_figures(runs["none"])
    a, _ = load_variables(runs["plain"] / "model")
    b, _ = load_variables(runs["none"] / "model")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    config = json.loads((runs["none"] / "config.json").read_text())
    assert config["device_augment"] == "none" and config["feature_cache"] is True
    assert "device_augment" not in config["requested"]
