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
- ``standardize``: the grey image to zero mean and unit standard deviation, mapped to
  ``127.5 + 42.5 z`` (three standard deviations span the uint8 range) so the backbone's
  preprocessing sees values on its usual scale.

Imports nothing heavy at module level: the CLI reads :data:`INTENSITY_METHODS`.
"""

from __future__ import annotations

INTENSITY_METHODS = ("none", "equalize", "standardize")


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
        out = jax.vmap(_equalize)(levels)
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
