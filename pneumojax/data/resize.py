"""Resizing decoded images to the model's input side, in one of two ways.

* ``antialias`` (the default): PIL's bilinear filter, which widens its support when it
  downscales, so every source pixel contributes (an antialiased, area-like average).
* ``keras``: exactly what the study's pipeline computes, ``tf.image.resize(image, size)``
  (``method='bilinear'``, ``antialias=False``): each output pixel interpolates the 2 x 2 source
  pixels nearest to its half-pixel centre, whatever the scale, so a 2-3x downscale samples the
  source rather than averaging it. Implemented here in numpy, so that pneumojax does not need
  TensorFlow to run; tested against ``tf.image.resize``.

Both return uint8 (rounded): decoded images are cached as uint8.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pneumojax.config import RESIZE_METHODS  # one source, shared with the CLI


def resize_image(image: Image.Image, image_size: int, method: str = "antialias") -> np.ndarray:
    """``image`` (8-bit ``L`` or ``RGB``) as a uint8 ``(S, S)`` or ``(S, S, 3)`` array, the aspect
    ratio not kept."""
    if method == "antialias":
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))
    if method == "keras":
        return round_to_uint8(tf_bilinear(np.asarray(image), image_size, image_size))
    raise ValueError(f"resize method {method!r}: expected one of {', '.join(RESIZE_METHODS)}")


def tf_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 ``tf.image.resize(array, (height, width), 'bilinear', antialias=False)`` of a
    ``(H, W)`` or ``(H, W, C)`` array: TensorFlow's ``ResizeBilinear`` with half-pixel centres,
    in its float32 arithmetic (two horizontal interpolations, then one vertical)."""
    a = array.astype(np.float32)
    y0, y1, fy = _taps(a.shape[0], height)
    x0, x1, fx = _taps(a.shape[1], width)
    if a.ndim == 3:
        fx = fx[:, None]
    fy = fy[:, None, None] if a.ndim == 3 else fy[:, None]
    rows0, rows1 = a[y0], a[y1]  # only the rows that are read: (height, W[, C])
    top = rows0[:, x0] + (rows0[:, x1] - rows0[:, x0]) * fx
    bottom = rows1[:, x0] + (rows1[:, x1] - rows1[:, x0]) * fx
    return top + (bottom - top) * fy


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source index and the weight of the upper one, per output index, as
    TensorFlow computes them (``compute_interpolation_weights`` with ``HalfPixelScaler``)."""
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(x)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(x), in_size - 1).astype(np.intp)
    return lower, upper, (x - floor).astype(np.float32)


def round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Nearest grey level (ties to even), clipped to 0..255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
