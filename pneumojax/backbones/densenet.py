"""DenseNet121, layer for layer as ``keras.applications.densenet`` (Keras 3 stem names)."""

from .graph import GraphBuilder

_EPS = 1.001e-5
_GROWTH = 32


def densenet121(blocks=(6, 12, 24, 16)):
    g = GraphBuilder()
    x = g.zero_pad(g.input, 3)
    x = g.conv(x, 64, 7, strides=2, use_bias=False, name="conv1_conv")
    x = g.act(g.bn(x, _EPS, name="conv1_bn"), name="conv1_relu")
    x = g.zero_pad(x, 1)
    x = g.max_pool(x, 3, strides=2, name="pool1")
    channels = 64
    for stage, n in enumerate(blocks, start=2):
        for i in range(1, n + 1):
            name = f"conv{stage}_block{i}"
            y = g.act(g.bn(x, _EPS, name=f"{name}_0_bn"), name=f"{name}_0_relu")
            y = g.conv(y, 4 * _GROWTH, 1, use_bias=False, name=f"{name}_1_conv")
            y = g.act(g.bn(y, _EPS, name=f"{name}_1_bn"), name=f"{name}_1_relu")
            y = g.conv(y, _GROWTH, 3, padding="same", use_bias=False, name=f"{name}_2_conv")
            x = g.concat([x, y], name=f"{name}_concat")
            channels += _GROWTH
        if stage < 2 + len(blocks) - 1:
            name = f"pool{stage}"
            x = g.act(g.bn(x, _EPS, name=f"{name}_bn"), name=f"{name}_relu")
            channels = int(channels * 0.5)
            x = g.conv(x, channels, 1, use_bias=False, name=f"{name}_conv")
            x = g.avg_pool(x, 2, strides=2, name=f"{name}_pool")
    g.act(g.bn(x, _EPS, name="bn"), name="relu")
    return g.build()
