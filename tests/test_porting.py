"""Porting keras.applications weights: layer lists, parity, strictness, checkpoints."""

import dataclasses

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.backbones import REGISTRY, get_backbone, layer_table
from pneumojax.checkpoint import CheckpointError, load_variables, read_manifest, save_variables
from pneumojax.cli import main
from ports import keras_port as kp

# Small inputs keep Keras and XLA fast; InceptionV3 cannot go below 75 px.
SMALL = {"resnet152": 64, "resnet50v2": 64, "densenet121": 64, "inception_v3": 75}


@pytest.fixture(scope="module")
def randomized():
    """One randomized Keras model per backbone (built lazily, reused across tests)."""
    cache = {}

    def get(name, size=None):
        size = size or SMALL[name]
        if (name, size) not in cache:
            model = kp.build_keras_model(get_backbone(name), size)
            kp.randomize_keras_model(model, seed=1)
            cache[(name, size)] = (model, kp.weights_of_keras_model(model))
        return cache[(name, size)]

    return get


@pytest.mark.tensorflow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_layer_list_equals_keras(name):
    info = get_backbone(name)
    model = kp.build_keras_model(info, 256)
    ours = layer_table(info, 256)
    theirs = [
        dict(
            index=i,
            name=l.name,
            kind=type(l).__name__,
            output_shape=tuple(l.output.shape),
            params=l.count_params(),
        )
        for i, l in enumerate(model.layers)
    ]
    assert ours == theirs


@pytest.mark.tensorflow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_parity_with_randomized_keras_model(name, randomized):
    info = get_backbone(name)
    model, weights = randomized(name)
    variables = kp.port_keras_weights(weights, info, SMALL[name])
    layers = kp.parity_layers(info, n_inner=4)
    assert info.default_cut in layers and info.layers[-1].name in layers
    rows = kp.measure_parity(model, variables, info, SMALL[name], layers)
    for row in rows:
        assert row.max_abs_ref > 0
        assert row.ok, row.line()


@pytest.mark.tensorflow
def test_parity_at_256_px_through_the_cli(tmp_path):
    out = tmp_path / "inc"
    result = CliRunner().invoke(
        main,
        [
            "port",
            "--backbone",
            "inception_v3",
            "--weights",
            "none",
            "--randomize",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity conv2d_86 max_abs_diff=" in result.output
    assert "parity mixed10 max_abs_diff=" in result.output
    manifest = read_manifest(out)
    assert manifest["input_size"] == 256 and manifest["layer_count"] == 311
    assert manifest["source"]["randomized_seed"] == 3
    assert {r["layer"] for r in manifest["parity"]["layers"]} >= {"conv2d_86", "mixed10"}
    assert set(manifest["versions"]) == {"keras", "tensorflow", "jax", "flax"}


@pytest.mark.tensorflow
def test_parity_check_catches_a_wrong_epsilon(randomized):
    # The tolerance must not be so loose that a classic porting bug passes.
    info = get_backbone("inception_v3")
    model, weights = randomized("inception_v3")
    variables = kp.port_keras_weights(weights, info, 75)
    wrong = tuple(
        dataclasses.replace(
            s, config=tuple((k, 1.001e-5 if k == "epsilon" else v) for k, v in s.config)
        )
        for s in info.layers
    )
    buggy = dataclasses.replace(info, build=lambda: wrong)
    rows = kp.measure_parity(model, variables, buggy, 75, [info.default_cut])
    assert not rows[0].ok


@pytest.mark.tensorflow
def test_preprocess_equals_keras_preprocess_input():
    from pneumojax.backbones import preprocess

    images = kp.parity_batch(32, n=3)
    for info in REGISTRY.values():
        np.testing.assert_allclose(
            np.asarray(preprocess(images, info.preprocess_mode)),
            kp.keras_preprocess(info, images),
            rtol=1e-6,
            atol=1e-5,
        )


def _write_legacy_h5(path, weights):
    """A Keras 2 style weight file, the format of keras.applications' downloads."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in weights]
        for layer, ws in weights.items():
            g = f.create_group(layer)
            names = [f"{layer}/{w}:0" for w in ws]
            g.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, ws.values()):
                g.create_dataset(n, data=a)


@pytest.mark.tensorflow
def test_port_from_legacy_h5_file_keeps_parity_and_records_sha(tmp_path, randomized):
    _, weights = randomized("resnet50v2")
    path = tmp_path / "resnet50v2_notop.h5"
    _write_legacy_h5(path, weights)
    out = tmp_path / "ck"
    result = CliRunner().invoke(
        main,
        [
            "port",
            "--backbone",
            "resnet50v2",
            "--weights",
            str(path),
            "--input-size",
            "64",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["source"]["file_sha256"] == kp.file_sha256(path)
    assert manifest["weights_sha256"] == kp.weights_sha256(weights)
    variables, _ = load_variables(out)
    np.testing.assert_array_equal(
        variables["params"]["conv1_conv"]["kernel"], weights["conv1_conv"]["kernel"]
    )


@pytest.mark.tensorflow
@pytest.mark.parametrize(
    "defect, message",
    [
        ("missing", "layer conv2_block2_1_conv (Conv2D): missing from the weight source"),
        ("shape", "layer conv2_block2_1_conv: weight 'kernel' has shape (1, 1, 256, 32)"),
        ("unused", "layer extra_dense: in the weight source but not in resnet50v2"),
    ],
)
def test_port_refuses_a_defective_weight_file(tmp_path, randomized, defect, message):
    _, weights = randomized("resnet50v2")
    weights = {k: dict(v) for k, v in weights.items()}
    if defect == "missing":
        del weights["conv2_block2_1_conv"]
    elif defect == "shape":
        weights["conv2_block2_1_conv"]["kernel"] = np.zeros((1, 1, 256, 32), np.float32)
    else:
        weights["extra_dense"] = {"kernel": np.zeros((3, 2), np.float32)}
    path = tmp_path / "bad.h5"
    _write_legacy_h5(path, weights)
    result = CliRunner().invoke(
        main,
        [
            "port",
            "--backbone",
            "resnet50v2",
            "--weights",
            str(path),
            "--input-size",
            "64",
            "--out",
            str(tmp_path / "ck"),
        ],
    )
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "ck").exists()


@pytest.mark.tensorflow
def test_port_from_keras3_weights_file(tmp_path, randomized):
    model, weights = randomized("densenet121")
    path = tmp_path / "d.weights.h5"
    model.save_weights(path)
    manifest = kp.port_backbone(
        get_backbone("densenet121"), str(path), 64, tmp_path / "ck", echo=lambda s: None
    )
    assert manifest["weights_sha256"] == kp.weights_sha256(weights)


def test_imagenet_offline_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(kp, "cached_imagenet_file", lambda info: None)
    monkeypatch.setattr(kp.socket, "create_connection", no_network)
    result = CliRunner().invoke(
        main,
        [
            "port",
            "--backbone",
            "densenet121",
            "--weights",
            "imagenet",
            "--out",
            str(tmp_path / "ck"),
        ],
    )
    assert result.exit_code == 1
    assert "cannot reach storage.googleapis.com" in result.output
    assert "--weights FILE.h5" in result.output and "checkpoints/NAME-imagenet/" in result.output


def test_port_rejects_unknown_weight_argument(tmp_path):
    result = CliRunner().invoke(
        main, ["port", "--backbone", "densenet121", "--weights", str(tmp_path / "nope.h5")]
    )
    assert result.exit_code == 1 and "no such file" in result.output


def test_orbax_round_trip_restores_identical_arrays(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "params": {
            "conv2d": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
            "batch_normalization": {"bias": rng.normal(size=8).astype(np.float32)},
        },
        "batch_stats": {
            "batch_normalization": {
                "mean": rng.normal(size=8).astype(np.float32),
                "var": rng.uniform(size=8).astype(np.float32),
            }
        },
    }
    save_variables(tmp_path / "ck", variables, {"backbone": "test"})
    restored, manifest = load_variables(tmp_path / "ck")
    assert manifest == {"backbone": "test"}
    flat_a = {k: v for k, v in _flatten(variables)}
    flat_b = {k: v for k, v in _flatten(restored)}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_b[k].dtype == flat_a[k].dtype
        np.testing.assert_array_equal(flat_b[k], flat_a[k])
    with pytest.raises(CheckpointError, match="already exists"):
        save_variables(tmp_path / "ck", variables, {})


def test_half_written_checkpoint_is_reported(tmp_path):
    (tmp_path / "ck" / "variables").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_variables(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_variables(tmp_path / "missing")


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), np.asarray(v)
