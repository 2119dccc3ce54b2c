"""InceptionV3, layer for layer as ``keras.applications.inception_v3`` (auto-named layers)."""

from .graph import GraphBuilder


def inception_v3():
    g = GraphBuilder()

    def cbr(x, filters, rows, cols, padding="same", strides=1):
        x = g.conv(x, filters, (rows, cols), strides=strides, padding=padding, use_bias=False)
        return g.act(g.bn(x, 1e-3, scale=False))

    def pool_branch(x, filters):
        return cbr(g.avg_pool(x, 3, strides=1, padding="same"), filters, 1, 1)

    x = cbr(g.input, 32, 3, 3, strides=2, padding="valid")
    x = cbr(x, 32, 3, 3, padding="valid")
    x = cbr(x, 64, 3, 3)
    x = g.max_pool(x, 3, strides=2)
    x = cbr(x, 80, 1, 1, padding="valid")
    x = cbr(x, 192, 3, 3, padding="valid")
    x = g.max_pool(x, 3, strides=2)

    for i, pool_filters in enumerate((32, 64, 64)):  # mixed0-2: 35x35
        b1 = cbr(x, 64, 1, 1)
        b5 = cbr(cbr(x, 48, 1, 1), 64, 5, 5)
        b3 = cbr(cbr(cbr(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        x = g.concat([b1, b5, b3, pool_branch(x, pool_filters)], name=f"mixed{i}")

    b3 = cbr(x, 384, 3, 3, strides=2, padding="valid")  # mixed3: 17x17
    b3d = cbr(cbr(cbr(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2, padding="valid")
    x = g.concat([b3, b3d, g.max_pool(x, 3, strides=2)], name="mixed3")

    for i, f in enumerate((128, 160, 160, 192)):  # mixed4-7
        b1 = cbr(x, 192, 1, 1)
        b7 = cbr(cbr(cbr(x, f, 1, 1), f, 1, 7), 192, 7, 1)
        b7d = cbr(x, f, 1, 1)
        for filters, (r, c) in ((f, (7, 1)), (f, (1, 7)), (f, (7, 1)), (192, (1, 7))):
            b7d = cbr(b7d, filters, r, c)
        x = g.concat([b1, b7, b7d, pool_branch(x, 192)], name=f"mixed{4 + i}")

    b3 = cbr(cbr(x, 192, 1, 1), 320, 3, 3, strides=2, padding="valid")  # mixed8: 8x8
    b7 = cbr(cbr(cbr(x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
    b7 = cbr(b7, 192, 3, 3, strides=2, padding="valid")
    x = g.concat([b3, b7, g.max_pool(x, 3, strides=2)], name="mixed8")

    for i in range(2):  # mixed9-10
        b1 = cbr(x, 320, 1, 1)
        b3 = cbr(x, 384, 1, 1)
        b3 = g.concat([cbr(b3, 384, 1, 3), cbr(b3, 384, 3, 1)], name=f"mixed9_{i}")
        b3d = cbr(cbr(x, 448, 1, 1), 384, 3, 3)
        b3d = g.concat([cbr(b3d, 384, 1, 3), cbr(b3d, 384, 3, 1)])
        x = g.concat([b1, b3, b3d, pool_branch(x, 192)], name=f"mixed{9 + i}")
    return g.build()
