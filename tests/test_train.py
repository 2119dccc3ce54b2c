"""Model plans, Keras-exact freezing, the sharded step, resume, and the train/evaluate/predict CLI."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.backbones import get_backbone
from pneumojax.cli import main
from pneumojax.model import (
    TrainableSpecError,
    build_classifier,
    init_variables,
    make_plan,
    parse_trainable,
)
from pneumojax.optim import make_optimizer
from pneumojax.step import Steps, make_mesh
from pneumojax.train import FitOptions, Interrupted, fit
from pneumojax.optim import epoch_lr_factor

from conftest import REPO, TINY_CUT, TINY_MID, tiny_train_args

# A short DenseNet121 prefix keeps compiles quick; its block 2 has BatchNorm to train.
CUT, MID = TINY_CUT, TINY_MID


@pytest.mark.parametrize(
    "backbone, trainable, expected",
    [
        ("resnet152", "none", 4_194_690),
        ("densenet121", "none", 1_048_962),
        ("inception_v3", "none", 1_769_858),
        ("inception_v3", "conv2d_44:average_pooling2d_4", 2_733_378),
    ],
)
def test_study_trainable_parameter_counts_at_256(backbone, trainable, expected):
    plan = make_plan(get_backbone(backbone), None, trainable, 256)
    assert plan.trainable_params == expected
    assert f"trainable_params={expected}" in plan.lines()


def test_trainable_ranges_follow_python_slices():
    info = get_backbone("inception_v3")
    ranges, layers = parse_trainable("conv2d_44:average_pooling2d_4", info, "conv2d_86")
    assert ranges == (("conv2d_44", "activation_47"),)
    assert len(layers) == 151 - 133 and "average_pooling2d_4" not in layers
    assert parse_trainable("133:151", info, "conv2d_86")[1] == layers
    _, tail = parse_trainable("280:", info, "conv2d_86")  # open end, clipped at the cut
    assert "conv2d_86" in tail and "mixed10" not in tail
    _, two = parse_trainable(":3, mixed7", info, "conv2d_86")
    assert two == {"input_layer", "conv2d", "batch_normalization", "mixed7"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("average_pooling2d_4:conv2d_44", "selects no layer"),
        ("mixed10:", "after the cut layer conv2d_86"),
        ("conv2d_44:nope", "has no layer 'nope'"),
        ("1:2:3", "a range is START:END"),
        ("999:", "out of range"),
    ],
)
def test_bad_trainable_specs_are_clear_errors(spec, message):
    with pytest.raises(TrainableSpecError, match=message):
        parse_trainable(spec, get_backbone("inception_v3"), "conv2d_86")


def test_inception_names_on_resnet152_exit_2_with_nearest_layers():
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--backbone",
            "resnet152",
            "--trainable",
            "conv2d_44:average_pooling2d_4",
            "--dry-run",
        ],
    )
    assert result.exit_code == 2
    assert "resnet152 has no layer 'conv2d_44'" in result.output
    assert "Nearest resnet152 layers:" in result.output
    assert "pneumojax layers --backbone resnet152" in result.output


def test_dry_run_prints_the_plan_of_experiment_4():
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--backbone",
            "inception_v3",
            "--trainable",
            "conv2d_44:average_pooling2d_4",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trainable layers: conv2d_44 .. activation_47" in result.output
    assert "trainable_params=2733378" in result.output and "frozen_params=" in result.output


def test_keras_seed_schedule_compounds_like_the_study():
    lr, keras_rates = 1e-3, []
    for epoch in range(6):  # LearningRateScheduler(lambda epoch, lr: lr * 0.85 ** epoch)
        lr = lr * 0.85**epoch
        keras_rates.append(lr)
    ours = [1e-3 * epoch_lr_factor("keras-seed", e) for e in range(6)]
    np.testing.assert_allclose(ours, keras_rates, rtol=1e-12)
    assert epoch_lr_factor("exponential", 3) == pytest.approx(0.85**3)


def _tiny(trainable_spec, n=24, size=32, seed=0, lr=1e-2):
    info = get_backbone("densenet121")
    _, layers = parse_trainable(trainable_spec, info, CUT)
    model = build_classifier(info, CUT, layers)
    variables = init_variables(model, size, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32)
    steps = Steps(model, make_optimizer(variables["params"], layers, lr), make_mesh())
    return (
        steps,
        variables,
        layers,
        (images, labels, np.ones(n, np.float32)),
        (images[:8], labels[:8]),
    )


def test_frozen_parameters_and_statistics_stay_while_trainable_ones_move(tmp_path):
    steps, variables, layers, train, val = _tiny(MID)
    [best], _ = fit(
        steps, variables, train, val, FitOptions(epochs=1, batch_size=8, patience=0), tmp_path
    )
    before, after = variables, jax.tree.map(np.asarray, best)
    for layer, leaves in before["params"]["backbone"].items():
        for k, v in leaves.items():
            moved = not np.array_equal(v, after["params"]["backbone"][layer][k])
            assert moved == (layer in layers), (layer, k)
    for layer, leaves in before["batch_stats"]["backbone"].items():
        moved = not np.array_equal(leaves["mean"], after["batch_stats"]["backbone"][layer]["mean"])
        assert moved == (layer in layers), layer
    assert not np.array_equal(
        before["params"]["dense"]["kernel"], after["params"]["dense"]["kernel"]
    )


def test_the_scheduled_learning_rate_is_the_one_applied(tmp_path):
    steps, variables, _, train, val = _tiny("none", lr=1e-2)  # the optimizer's initial rate
    opts = FitOptions(epochs=2, batch_size=8, patience=0, learning_rate=0.0)
    [best], progress = fit(steps, variables, train, val, opts, tmp_path)
    np.testing.assert_array_equal(
        best["params"]["dense"]["kernel"], variables["params"]["dense"]["kernel"]
    )
    assert progress.history[0]["val_loss"] == progress.history[1]["val_loss"]


def test_one_compile_for_all_epochs(tmp_path):
    steps, variables, _, train, val = _tiny(MID)
    fit(
        steps,
        variables,
        train,
        val,
        FitOptions(epochs=3, batch_size=8, patience=0, log_every=2),
        tmp_path,
    )
    assert steps.train._cache_size() == 1
    assert steps._jitted[steps.predict_members]._cache_size() == 1


def test_bfloat16_compute_stays_close_to_float32():
    from pneumojax.backbones import backbone_model, preprocess

    info = get_backbone("densenet121")
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    f32 = backbone_model(info, outputs=[CUT])
    variables = init_variables(build_classifier(info, CUT, frozenset()), 64, 0)["params"]
    bs = init_variables(build_classifier(info, CUT, frozenset()), 64, 0)["batch_stats"]
    v = {"params": variables["backbone"], "batch_stats": bs["backbone"]}
    a = f32.apply(v, preprocess(x, info.preprocess_mode))[CUT]
    b = backbone_model(info, outputs=[CUT], dtype=jax.numpy.bfloat16).apply(
        v, preprocess(x, info.preprocess_mode)
    )[CUT]
    assert b.dtype == jax.numpy.bfloat16
    rel = float(np.max(np.abs(np.asarray(b, np.float32) - np.asarray(a))) / np.max(np.abs(a)))
    assert 0 < rel < 3e-2  # bfloat16 keeps 8 bits of mantissa: ~0.4% per op


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    opts = FitOptions(epochs=3, batch_size=8, patience=0, seed=3)
    steps, variables, _, train, val = _tiny(MID)
    full, full_progress = fit(steps, variables, train, val, opts, tmp_path / "a")
    with pytest.raises(Interrupted, match="epoch 2, batch 1"):
        fit(steps, variables, train, val, opts, tmp_path / "b", stop_after_steps=4)
    resumed, progress = fit(steps, variables, train, val, opts, tmp_path / "b", resume=True)
    assert progress.history == full_progress.history
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = (tmp_path / "b" / "history.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]


_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    sys.path.insert(0, {tests!r})
    from test_train import _tiny, MID
    from pneumojax.train import FitOptions, fit
    assert jax.device_count() == {n}, jax.devices()
    steps, variables, _, train, val = _tiny(MID, lr=1e-3)
    [best], progress = fit(steps, variables, train, val,
                         FitOptions(epochs=2, batch_size=8, patience=0, learning_rate=1e-3),
                         __import__("pathlib").Path({out!r}))
    leaves = jax.tree_util.tree_leaves_with_path(best)
    leaves += [(("history",), np.array([[r["loss"], r["val_loss"]] for r in progress.history]))]
    np.savez({out!r} + "/best.npz", **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}})
""")


def _run_on_devices(n, out):
    os.makedirs(out)
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
        "JAX_PLATFORMS": "cpu",
    }
    script = _DEVICE_SCRIPT.format(tests=str(REPO / "tests"), n=n, out=str(out))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=REPO)
    return dict(np.load(out / "best.npz"))


@pytest.mark.slow
def test_one_device_and_four_devices_train_the_same(tmp_path):
    one, four = _run_on_devices(1, tmp_path / "one"), _run_on_devices(4, tmp_path / "four")
    assert one.keys() == four.keys()
    # Same math; only the order of the cross-device sums differs. Adam turns that rounding
    # into at most a fraction of one step (lr = 1e-3) on a few near-zero gradients; a real
    # difference (per-device BatchNorm statistics, a lost gradient shard) is far larger.
    for k in one:
        if "params" in k:
            diff = np.abs(four[k] - one[k])
            assert diff.max() < 5e-4, k  # under half of one Adam step everywhere
            assert (diff > 1e-5).mean() < 1e-2, k  # and tiny almost everywhere
        else:  # losses and BatchNorm moving statistics
            np.testing.assert_allclose(four[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "trainable,precision", [("none", "float32"), (MID, "float32"), (MID, "bfloat16")]
)
def test_cached_activations_train_the_same_as_the_full_model(
    tiny_data, tmp_path, trainable, precision
):
    args = tiny_train_args(
        tiny_data, None, "--seed", "4", "--precision", precision, trainable=trainable
    )
    cached = CliRunner().invoke(main, args + ["--out", str(tmp_path / "cached")])
    assert cached.exit_code == 0, cached.output
    assert "feature cache: training on cached activations of" in cached.output
    assert f"stored as {precision}" in cached.output  # auto: as computed
    # float32: identical up to summation order. bfloat16: XLA keeps fused intermediates of the
    # full model in float32, so the two paths round differently, within bfloat16's precision.
    rel, w_rel = (1e-5, 1e-4) if precision == "float32" else (5e-3, 5e-2)
    full = CliRunner().invoke(main, args + ["--out", str(tmp_path / "full"), "--no-feature-cache"])
    assert full.exit_code == 0, full.output
    assert "feature cache" not in full.output
    hist = [
        [json.loads(l) for l in (tmp_path / r / "history.jsonl").read_text().splitlines()]
        for r in ("cached", "full")
    ]
    for a, b in zip(*hist):
        for k in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), k
    from pneumojax.checkpoint import load_variables

    va, _ = load_variables(tmp_path / "cached" / "model")
    vb, _ = load_variables(tmp_path / "full" / "model")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(va), jax.tree.leaves(vb)):
        np.testing.assert_allclose(
            a,
            b,
            rtol=w_rel,
            atol=1e-6 if precision == "float32" else 1e-4,
            err_msg=jax.tree_util.keystr(path),
        )
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("cached", "full"))
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    assert ma["auc"] == pytest.approx(mb["auc"], abs=1e-6)


def test_bfloat16_feature_cache_halves_storage_and_keeps_metrics(tiny_data, tmp_path):
    args = tiny_train_args(tiny_data, None, "--precision", "float32", trainable=MID)
    features = tmp_path / "cache" / "features"
    metrics, sizes = {}, {}
    for storage in ("float32", "bfloat16"):
        before = set(features.glob("*")) if features.exists() else set()
        r = CliRunner().invoke(
            main, args + ["--feature-cache-dtype", storage, "--out", str(tmp_path / storage)]
        )
        assert r.exit_code == 0, r.output
        assert f"stored as {storage}" in r.output
        new = set(features.glob("*")) - before
        sizes[storage] = sum(f.stat().st_size for d in new for f in d.glob("*.npy"))
        metrics[storage] = json.loads((tmp_path / storage / "metrics.json").read_text())
    assert sizes["bfloat16"] < 0.52 * sizes["float32"]
    for name in ("auc", "recall", "specificity"):
        lo, hi = metrics["float32"]["ci95"][name]
        assert lo - 1e-9 <= metrics["bfloat16"][name] <= hi + 1e-9, name


def test_bfloat16_training_matches_float32_within_intervals(tiny_data, tmp_path):
    args = tiny_train_args(tiny_data, trainable=MID)
    metrics = {}
    for p in ("float32", "bfloat16"):
        r = CliRunner().invoke(main, args + ["--precision", p, "--out", str(tmp_path / p)])
        assert r.exit_code == 0, r.output
        assert f"{p} compute" in r.output
        metrics[p] = json.loads((tmp_path / p / "metrics.json").read_text())
    lo, hi = metrics["float32"]["ci95"]["auc"]
    assert lo - 1e-9 <= metrics["bfloat16"]["auc"] <= hi + 1e-9


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    from pneumojax.data import make_demo_dataset

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    return make_demo_dataset(tmp_path / "xray", n_per_class=40, image_size=48, seed=1)


def test_train_evaluate_predict_cli_end_to_end(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, trainable=MID)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "split train:" in result.output and "patients" in result.output
    for name in (
        "config.json",
        "history.jsonl",
        "metrics.json",
        "splits.json",
        "plots/history.png",
        "plots/confusion_matrix.png",
        "plots/roc.png",
    ):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "n",
        "threshold",
        "accuracy",
        "recall",
        "precision",
        "specificity",
        "f1",
        "auc",
        "confusion_matrix",
        "at_0_5",
        "ci95",
        "classification_report",
    ):
        assert key in metrics, key
    assert metrics["threshold_source"] == "validation"
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["trainable_params"] > 0 and config["cut"] == CUT

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already holds a run" in again.output

    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(tiny_data),
            "--split",
            "all",
            "--out",
            str(tmp_path / "ext.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    external = json.loads((tmp_path / "ext.json").read_text())
    assert external["n"] == 80 and external["threshold"] == metrics["threshold"]

    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(tiny_data / "NORMAL")])
    assert result.exit_code == 0, result.output
    rows = result.output.strip().splitlines()
    assert rows[0] == "path,p_pneumonia,label,threshold" and len(rows) == 41


def test_train_refuses_missing_imagenet_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CHECKPOINTS", str(tmp_path / "none-here"))
    result = CliRunner().invoke(
        main, tiny_train_args(tiny_data, tmp_path / "r", weights=None, epochs=None, batch_size=None)
    )
    assert result.exit_code == 1
    assert "pneumojax port --backbone densenet121 --weights imagenet" in result.output


def test_the_classifier_returns_named_intermediates_beside_the_same_logits():
    info = get_backbone("densenet121")
    plain = build_classifier(info, CUT, frozenset())
    named = build_classifier(info, CUT, frozenset(), intermediates=("conv1_relu", "pool1"))
    variables = init_variables(plain, 32, 0)
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    logits, inter = named.apply(variables, x)
    np.testing.assert_allclose(logits, plain.apply(variables, x), rtol=1e-6, atol=1e-6)
    assert sorted(inter) == ["conv1_relu", "pool1"]
    assert inter["conv1_relu"].shape == (2, 16, 16, 64) and inter["pool1"].shape == (2, 8, 8, 64)
    with pytest.raises(KeyError, match="no layer 'mixed7'"):
        build_classifier(info, CUT, frozenset(), intermediates=("mixed7",))
