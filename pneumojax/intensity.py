"""Per-image intensity normalisation inside the model (``--intensity``).

Radiographs from another hospital differ first in their grey levels: exposure, detector,
post-processing. Normalising each image on its own before the backbone takes those
differences out of what the network can learn from. It runs on the device as the model's first
step, after any on-device augmentation and before the backbone's Keras preprocessing, so
training, ``evaluate``, ``predict``, ``explain`` and the activation cache all see the same
normalised images, and an image needs no host-side preparation beyond its resize.

- ``none``: the image as decoded (the study's pipeline).
- ``equalize``: global histogram equalisation of the grey image, exactly OpenCV's
  ``cv2.equalizeHist`` (``round((cdf(g) - cdf_min) * 255 / (n - cdf_min))``; a constant image keeps its level),
  written back to all three channels.
- ``clahe``: contrast-limited adaptive histogram equalisation, exactly OpenCV's
  ``cv2.createCLAHE(clipLimit=2.0, tileGridSize=(g, g)).apply`` on the grey image (to within one
  grey level: OpenCV's float rounding), with ``g = clip(size // 16, 1, 8)`` tiles a side so each
  tile holds at least 16 x 16 pixels (8 x 8 tiles from 128 px up, 4 x 4 at 64 px): local
  equalisation, limited so that noise in flat regions is not amplified.
- ``standardize``: the grey image to zero mean and unit standard deviation, mapped to
  ``127.5 + 42.5 z`` (three standard deviations span the uint8 range) so the backbone's
  preprocessing sees values on its usual scale.

Imports nothing heavy at module level: the CLI reads :data:`INTENSITY_METHODS`.
"""

from __future__ import annotations

INTENSITY_METHODS = ("none", "equalize", "clahe", "standardize")
CLAHE_CLIP = 2.0  # OpenCV's clipLimit: a bin holds at most 2x the tile's mean count


def normalize_intensity(images, method: str):
    """``images`` (n, H, W, C) in [0, 255] (uint8 or float) -> float32 (n, H, W, C) in
    [0, 255] (``standardize`` may leave it a little); ``none`` returns them as float32."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x = jnp.asarray(images).astype(jnp.float32)
    if method == "none":
        return x
    if method not in INTENSITY_METHODS:
        raise ValueError(f"unknown intensity method {method!r}; choose {INTENSITY_METHODS}")
    grey = x.mean(-1)  # radiographs are grey; RGB JPEGs of them carry three equal channels
    if method == "standardize":
        mean = grey.mean((1, 2), keepdims=True)
        std = grey.std((1, 2), keepdims=True)
        out = 127.5 + 42.5 * (grey - mean) / jnp.maximum(std, 1.0)
    else:
        levels = jnp.clip(jnp.round(grey), 0, 255).astype(jnp.int32)
        out = jax.vmap(_equalize if method == "equalize" else _clahe)(levels)
    return jnp.broadcast_to(out[..., None], x.shape)


def _equalize(levels):
    """One grey image of integer levels (H, W) -> its equalised levels as float32."""
    import jax.numpy as jnp  # noqa: PLC0415

    flat = levels.reshape(-1)
    cdf = jnp.cumsum(jnp.zeros(256, jnp.int32).at[flat].add(1))
    n = flat.shape[0]
    cdf_min = cdf[flat.min()]  # pixels at the darkest level present
    span = jnp.maximum(n - cdf_min, 1).astype(jnp.float32)
    lut = jnp.clip(jnp.round((cdf - cdf_min).astype(jnp.float32) * 255.0 / span), 0, 255)
    # a constant image keeps its level, as in OpenCV
    return jnp.where(cdf_min == n, levels.astype(jnp.float32), lut[levels])


def clahe_tiles(size: int) -> int:
    """Tiles a side for ``clahe`` at an image size: at least 16 x 16 pixels each, at most 8."""
    return max(1, min(8, size // 16))


def _clahe(levels):
    """One grey image of integer levels (H, W) -> CLAHE's levels as float32, as OpenCV's
    ``CLAHE_Impl::apply`` computes them: the image padded (reflect-101) to whole tiles, a
    histogram per tile clipped at ``max(int(clip * area / 256), 1)`` with the excess spread
    evenly and its residue over every ``256 // residue``-th bin, a LUT per tile
    (``round(cumsum * 255 / area)``), and each pixel bilinearly between its four nearest
    tiles' LUTs."""
    import jax.numpy as jnp  # noqa: PLC0415

    h, w = levels.shape
    g = clahe_tiles(min(h, w))
    padded = jnp.pad(levels, ((0, (-h) % g), (0, (-w) % g)), mode="reflect")
    th, tw = padded.shape[0] // g, padded.shape[1] // g
    area = th * tw
    tiles = padded.reshape(g, th, g, tw).transpose(0, 2, 1, 3).reshape(g * g, area)
    index = jnp.arange(g * g)[:, None] * 256 + tiles
    hist = jnp.zeros(g * g * 256, jnp.int32).at[index.reshape(-1)].add(1).reshape(g * g, 256)
    limit = max(int(CLAHE_CLIP * area / 256), 1)
    clipped = jnp.maximum(hist - limit, 0).sum(1, keepdims=True)
    hist = jnp.minimum(hist, limit) + clipped // 256
    residual = clipped % 256
    step = jnp.maximum(256 // jnp.maximum(residual, 1), 1)
    bins = jnp.arange(256)[None, :]
    hist = hist + ((bins % step == 0) & (bins // step < residual)).astype(jnp.int32)
    scale = jnp.float32(255.0 / area)
    lut = jnp.clip(jnp.round(jnp.cumsum(hist, 1).astype(jnp.float32) * scale), 0, 255)
    lut = lut.reshape(g, g, 256)

    def axis(n, tile):
        f = jnp.arange(n, dtype=jnp.float32) * jnp.float32(1.0 / tile) - 0.5
        first = jnp.floor(f).astype(jnp.int32)
        frac = f - first
        return jnp.maximum(first, 0), jnp.minimum(first + 1, g - 1), frac

    y1, y2, ya = axis(h, th)
    x1, x2, xa = axis(w, tw)
    ya, xa = ya[:, None], xa[None, :]

    def at(ty, tx):
        return lut[ty[:, None], tx[None, :], levels]

    top = at(y1, x1) * (1 - xa) + at(y1, x2) * xa
    bottom = at(y2, x1) * (1 - xa) + at(y2, x2) * xa
    return jnp.clip(jnp.round(top * (1 - ya) + bottom * ya), 0, 255)
