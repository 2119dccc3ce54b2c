"""ResNet152 (v1) and ResNet50V2, layer for layer as ``keras.applications.resnet[_v2]``."""

from .graph import GraphBuilder

_EPS = 1.001e-5


def _block_v1(g: GraphBuilder, x, filters, stride=1, conv_shortcut=True, name=""):
    if conv_shortcut:
        shortcut = g.conv(x, 4 * filters, 1, strides=stride, name=f"{name}_0_conv")
        shortcut = g.bn(shortcut, _EPS, name=f"{name}_0_bn")
    else:
        shortcut = x
    x = g.conv(x, filters, 1, strides=stride, name=f"{name}_1_conv")
    x = g.act(g.bn(x, _EPS, name=f"{name}_1_bn"), name=f"{name}_1_relu")
    x = g.conv(x, filters, 3, padding="same", name=f"{name}_2_conv")
    x = g.act(g.bn(x, _EPS, name=f"{name}_2_bn"), name=f"{name}_2_relu")
    x = g.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
    x = g.bn(x, _EPS, name=f"{name}_3_bn")
    x = g.add([shortcut, x], name=f"{name}_add")
    return g.act(x, name=f"{name}_out")


def _block_v2(g: GraphBuilder, x, filters, stride=1, conv_shortcut=False, name=""):
    preact = g.act(g.bn(x, _EPS, name=f"{name}_preact_bn"), name=f"{name}_preact_relu")
    if conv_shortcut:
        shortcut = g.conv(preact, 4 * filters, 1, strides=stride, name=f"{name}_0_conv")
    else:
        shortcut = g.max_pool(x, 1, strides=stride) if stride > 1 else x
    x = g.conv(preact, filters, 1, use_bias=False, name=f"{name}_1_conv")
    x = g.act(g.bn(x, _EPS, name=f"{name}_1_bn"), name=f"{name}_1_relu")
    x = g.zero_pad(x, 1, name=f"{name}_2_pad")
    x = g.conv(x, filters, 3, strides=stride, use_bias=False, name=f"{name}_2_conv")
    x = g.act(g.bn(x, _EPS, name=f"{name}_2_bn"), name=f"{name}_2_relu")
    x = g.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
    return g.add([shortcut, x], name=f"{name}_out")


def _stack_v1(g, x, filters, blocks, stride1=2, name=""):
    x = _block_v1(g, x, filters, stride=stride1, name=f"{name}_block1")
    for i in range(2, blocks + 1):
        x = _block_v1(g, x, filters, conv_shortcut=False, name=f"{name}_block{i}")
    return x


def _stack_v2(g, x, filters, blocks, stride1=2, name=""):
    x = _block_v2(g, x, filters, conv_shortcut=True, name=f"{name}_block1")
    for i in range(2, blocks):
        x = _block_v2(g, x, filters, name=f"{name}_block{i}")
    return _block_v2(g, x, filters, stride=stride1, name=f"{name}_block{blocks}")


def _stem(g: GraphBuilder, preact: bool):
    x = g.zero_pad(g.input, 3, name="conv1_pad")
    x = g.conv(x, 64, 7, strides=2, name="conv1_conv")
    if not preact:
        x = g.act(g.bn(x, _EPS, name="conv1_bn"), name="conv1_relu")
    x = g.zero_pad(x, 1, name="pool1_pad")
    return g.max_pool(x, 3, strides=2, name="pool1_pool")


def resnet152():
    g = GraphBuilder()
    x = _stem(g, preact=False)
    x = _stack_v1(g, x, 64, 3, stride1=1, name="conv2")
    x = _stack_v1(g, x, 128, 8, name="conv3")
    x = _stack_v1(g, x, 256, 36, name="conv4")
    _stack_v1(g, x, 512, 3, name="conv5")
    return g.build()


def resnet50v2():
    g = GraphBuilder()
    x = _stem(g, preact=True)
    x = _stack_v2(g, x, 64, 3, name="conv2")
    x = _stack_v2(g, x, 128, 4, name="conv3")
    x = _stack_v2(g, x, 256, 6, name="conv4")
    x = _stack_v2(g, x, 512, 3, stride1=1, name="conv5")
    g.act(g.bn(x, _EPS, name="post_bn"), name="post_relu")
    return g.build()
