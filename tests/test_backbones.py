"""Backbone graphs, the Flax module and the layer table, without TensorFlow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.backbones import (
    REGISTRY,
    GraphBuilder,
    KerasGraph,
    backbone_model,
    get_backbone,
    layer_table,
)
from pneumojax.cli import main


def test_study_layer_indices_of_inception_v3():
    index = get_backbone("inception_v3").layer_index
    assert (index["conv2d_44"], index["average_pooling2d_4"], index["conv2d_86"]) == (133, 151, 283)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_default_cut_is_a_layer(name):
    info = get_backbone(name)
    assert info.check_layer(info.default_cut) == info.default_cut


def test_unknown_layer_names_nearest_and_the_layers_command():
    with pytest.raises(KeyError, match=r"conv2d_44.*pneumojax layers --backbone resnet152"):
        get_backbone("resnet152").check_layer("conv2d_44")
    with pytest.raises(KeyError, match="Nearest: conv5_block3_1_relu"):
        get_backbone("resnet152").check_layer("conv5_block3_1_rel")


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(KeyError, match="densenet121, inception_v3"):
        get_backbone("vgg16")


def test_keras_order_sorts_by_depth_then_first_visit():
    # A residual block: Keras lists the shortcut conv after the first main-path layers,
    # because it sits at the same depth as the second main-path conv.
    g = GraphBuilder()
    short = g.conv(g.input, 4, 1, name="b_0_conv")
    x = g.conv(g.input, 4, 1, name="b_1_conv")
    x = g.act(x, name="b_1_relu")
    x = g.conv(x, 4, 1, name="b_2_conv")
    g.add([short, x], name="b_add")
    names = [s.name for s in g.build()]
    assert names == ["input_layer", "b_1_conv", "b_1_relu", "b_0_conv", "b_2_conv", "b_add"]


def test_auto_names_count_per_kind_and_skip_explicit_names():
    g = GraphBuilder()
    a = g.conv(g.input, 2, 1)
    b = g.conv(a, 2, 1, name="explicit")
    c = g.conv(b, 2, 1)
    assert (a, b, c) == ("conv2d", "explicit", "conv2d_1")


def test_cut_model_builds_only_what_the_cut_needs():
    info = get_backbone("densenet121")
    model = backbone_model(info, outputs=["conv2_block1_concat"])
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert set(variables["params"]) == {
        "conv1_conv",
        "conv1_bn",
        "conv2_block1_0_bn",
        "conv2_block1_1_conv",
        "conv2_block1_1_bn",
        "conv2_block1_2_conv",
    }


def _tiny_graph():
    g = GraphBuilder()
    x = g.act(g.bn(g.conv(g.input, 4, 3, padding="same", name="c1"), name="b1"), name="r1")
    x = g.act(g.bn(g.conv(x, 4, 3, padding="same", name="c2"), name="b2"), name="r2")
    return g.build()


def test_frozen_prefix_gets_no_gradient_and_frozen_bn_keeps_statistics():
    layers = _tiny_graph()
    model = KerasGraph(layers, ("r2",), frozenset({"c2", "b2"}))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)) * 3 + 1
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(out["r2"] ** 2), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["c1"]))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["b1"]))
    assert float(jnp.abs(grads["c2"]["kernel"]).max()) > 0
    stats = updates["batch_stats"]
    np.testing.assert_array_equal(stats["b1"]["mean"], variables["batch_stats"]["b1"]["mean"])
    assert not np.allclose(stats["b2"]["mean"], variables["batch_stats"]["b2"]["mean"])


def test_layer_table_rejects_too_small_inputs():
    with pytest.raises(ValueError, match="at least 75 px"):
        layer_table(get_backbone("inception_v3"), 64)


def test_layers_command_lists_keras_names_and_shapes():
    result = CliRunner().invoke(main, ["layers", "--backbone", "inception_v3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1 + 283].split()[:3] == ["283", "conv2d_86", "Conv2D"]
    assert "(None, 6, 6, 384)" in lines[1 + 283]
    assert lines[-1].startswith("311 layers, 21,802,784 parameters")


def test_layers_command_bad_input_size_is_a_usage_error():
    result = CliRunner().invoke(
        main, ["layers", "--backbone", "inception_v3", "--input-size", "64"]
    )
    assert result.exit_code == 2 and "at least 75 px" in result.output


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_compiled_forward_does_no_more_work_than_traced(name):
    """XLA:CPU used to fuse each residual block's elementwise output into every consumer,
    recomputing the whole residual stream again in each block (quadratic work: ResNet152 ran
    at half speed). Tensors with several consumers are now materialized once; the compiled
    program must cost no more flops than the traced one."""
    model = backbone_model(get_backbone(name))
    x = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    lowered = jax.jit(model.apply).lower(variables, x)
    traced = lowered.cost_analysis()["flops"]
    compiled = lowered.compile().cost_analysis()
    compiled = (compiled[0] if isinstance(compiled, list) else compiled)["flops"]
    assert compiled <= 1.005 * traced, (compiled, traced)
