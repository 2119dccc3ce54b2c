"""Random augmentation of training batches on the device, inside the jitted train step.

``augment(key, images, spec)`` is a pure JAX function of uint8 images (batch, H, W, C): per
sample a random affine map (rotation, translation, scale) composed with a random resized crop
and, only when asked, a horizontal flip, sampled bilinearly in one gather; then gamma, contrast,
brightness and Gaussian noise; rounded back to uint8, the domain real images come in, so the
model never sees values it will not see at test. Sample i draws from ``fold_in(key, i)``
alone: the result does not depend on how the batch is split over devices.

``AugmentSpec`` is what ``--device-augment`` parses: a preset (``none``, ``light``,
``strong``) and/or ``name=value`` items (``"rotate=10,translate=0.08,scale=0.9:1.1"``). The
default, ``none``, adds no work at all to the step. No horizontal flip unless asked: it would
move the heart to the wrong side.

The spec parsing imports nothing heavy (the CLI checks the option before JAX loads); the
transforms import JAX when first used.
"""

from __future__ import annotations

import dataclasses
import math


class AugmentSpecError(ValueError):
    """A ``--device-augment`` value that cannot be parsed; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The random transforms of ``--device-augment``; every field's zero value is off.

    rotate: degrees, uniform in [-rotate, rotate] (positive: counterclockwise as displayed).
    translate: fraction of the side, uniform in [-translate, translate] on each axis.
    scale: zoom range (lo, hi), log-uniform; above 1 enlarges the content.
    crop: random resized crop: a window of area uniform in [crop, 1] of the image, aspect
        ratio log-uniform in [3/4, 4/3], anywhere inside it, resized to the full image.
    hflip: probability of a horizontal flip (0 unless asked).
    gamma: exponent log-uniform in [1 / (1 + gamma), 1 + gamma] on intensities in [0, 1].
    contrast: factor uniform in [1 - contrast, 1 + contrast] about each image's mean.
    brightness: shift uniform in [-brightness, brightness], a fraction of the full range.
    noise: Gaussian noise, standard deviation in grey levels (of 255), the same in every
        channel (radiographs are grey).
    blur: Gaussian blur, standard deviation uniform in [0, blur] pixels of the model's input.
    sharpen: unsharp masking, ``x + a (x - G(x))`` with G a Gaussian of 1 pixel and the amount
        a uniform in [0, sharpen]. With ``blur`` it randomises an image's fine texture both
        ways, so that sharpness (which differs between scanners and sites) tells nothing.
    fill: what the geometric transforms bring in from outside the image: ``constant``
        (black) or ``edge`` (the nearest border pixel).
    """

    rotate: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    crop: float = 1.0
    hflip: float = 0.0
    gamma: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    sharpen: float = 0.0
    fill: str = "constant"

    @property
    def geometric(self) -> bool:
        return bool(
            self.rotate
            or self.translate
            or self.scale != (1.0, 1.0)
            or self.crop < 1.0
            or self.hflip
        )

    @property
    def photometric(self) -> bool:
        return bool(
            self.gamma
            or self.contrast
            or self.brightness
            or self.noise
            or self.blur
            or self.sharpen
        )

    @property
    def identity(self) -> bool:
        """No transform at all: :func:`augment` returns its input, the step adds no work."""
        return not (self.geometric or self.photometric)

    def __str__(self) -> str:
        """The canonical ``--device-augment`` form: ``none``, or the non-default items."""
        items = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name == "scale":
                items.append(f"scale={_num(value[0])}:{_num(value[1])}")
            else:
                items.append(f"{f.name}={value if f.name == 'fill' else _num(value)}")
        if items == ["fill=edge"] or not items:  # a fill alone transforms nothing
            return "none"
        return ",".join(items)


def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


PRESETS = {
    "none": AugmentSpec(),
    # Gentle: small shifts of pose and exposure, as between two radiographs of one child.
    "light": AugmentSpec(
        rotate=5.0, translate=0.05, scale=(0.95, 1.05), contrast=0.1, brightness=0.1
    ),
    # The example: every transform on, no flip.
    "strong": AugmentSpec(
        rotate=10.0,
        translate=0.08,
        scale=(0.9, 1.1),
        crop=0.8,
        gamma=0.2,
        contrast=0.2,
        brightness=0.2,
        noise=4.0,
    ),
}

FILLS = ("constant", "edge")


def parse_augment(text: str) -> AugmentSpec:
    """``--device-augment``: a preset name (none, light, strong), comma-separated
    ``name=value`` items, or a preset followed by items that override it
    (``strong,noise=0``). Raises :class:`AugmentSpecError` naming the bad part."""
    text = str(text).strip()
    if not text:
        raise AugmentSpecError(
            f"is empty; give a preset ({', '.join(PRESETS)}) or name=value items"
        )
    parts = [p.strip() for p in text.split(",")]
    spec = PRESETS["none"]
    if "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise AugmentSpecError(
                f"{parts[0]!r} is not a preset ({', '.join(PRESETS)}) nor a name=value item"
            )
        spec, parts = PRESETS[parts[0]], parts[1:]
    names = [f.name for f in dataclasses.fields(AugmentSpec)]
    seen = set()
    for part in parts:
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            raise AugmentSpecError(f"{part!r} is not name=value (a preset can only come first)")
        if name not in names:
            raise AugmentSpecError(f"unknown transform {name!r}; choose from {', '.join(names)}")
        if name in seen:
            raise AugmentSpecError(f"{name} is given twice")
        seen.add(name)
        spec = dataclasses.replace(spec, **{name: _value(name, value)})
    return spec


_RANGES = {  # name: (lowest, highest, what the number is)
    "rotate": (0.0, 180.0, "degrees"),
    "translate": (0.0, 1.0, "a fraction of the side"),
    "crop": (1e-3, 1.0, "the smallest area fraction, in (0, 1]"),
    "hflip": (0.0, 1.0, "a probability"),
    "gamma": (0.0, 10.0, "the exponent's spread"),
    "contrast": (0.0, 1.0, "the factor's spread"),
    "brightness": (0.0, 1.0, "a fraction of the full range"),
    "noise": (0.0, 255.0, "grey levels"),
    "blur": (0.0, 8.0, "pixels (the largest standard deviation)"),
    "sharpen": (0.0, 4.0, "the largest unsharp-mask amount"),
}


def _value(name: str, text: str):
    if name == "fill":
        if text not in FILLS:
            raise AugmentSpecError(f"fill={text!r}: choose {' or '.join(FILLS)}")
        return text
    if name == "scale":
        lo_hi = text.split(":")
        if len(lo_hi) != 2:
            raise AugmentSpecError(f"scale={text!r}: give a range LO:HI, e.g. scale=0.9:1.1")
        lo, hi = (_number(name, t) for t in lo_hi)
        if not 0 < lo <= hi:
            raise AugmentSpecError(f"scale={text!r}: needs 0 < LO <= HI")
        return (lo, hi)
    x = _number(name, text)
    lo, hi, what = _RANGES[name]
    if not lo <= x <= hi:
        raise AugmentSpecError(f"{name}={text!r}: must be in [{_num(lo)}, {_num(hi)}] ({what})")
    return x


def _number(name: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise AugmentSpecError(f"{name}={text!r}: not a number") from None
    if not math.isfinite(x):
        raise AugmentSpecError(f"{name}={text!r}: not a finite number")
    return x


# The transforms. Parameters are drawn (draw_params) separately from being applied
# (apply_params), so each transform can be checked against a known case.


def augment(key, images, spec: AugmentSpec):
    """``images`` (batch, H, W, C) uint8, each sample randomly transformed as ``spec`` says
    with its own draw from ``fold_in(key, index)``; uint8 out. Labels are not involved: the
    transforms keep what an image shows. The identity spec returns ``images`` itself."""
    if spec.identity:
        return images
    params = draw_params(key, spec, images.shape)
    return apply_params(images, params, spec.fill, max_blur=spec.blur)


def draw_params(key, spec: AugmentSpec, shape) -> dict:
    """Per-sample transform parameters for images of ``shape`` (batch, H, W, C):
    ``matrix`` (batch, 2, 2) and ``offset`` (batch, 2), in pixels, (row, column) order, mapping
    each output pixel to where it samples the input (about the image centre); ``gamma``,
    ``contrast``, ``brightness`` (batch,) and ``noise`` (batch, H, W, 1) in grey levels, or
    None for what ``spec`` leaves off."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    n, h, w = shape[0], shape[1], shape[2]

    def one(i):
        k = jax.random.fold_in(key, i)
        u = jax.random.uniform(jax.random.fold_in(k, 0), (12,))
        sym = lambda j: 2.0 * u[j] - 1.0  # noqa: E731 - uniform in [-1, 1)
        out = {}
        if spec.geometric:
            theta = jnp.deg2rad(spec.rotate) * sym(0)
            log_lo, log_hi = math.log(spec.scale[0]), math.log(spec.scale[1])
            s = jnp.exp(log_lo + u[1] * (log_hi - log_lo))
            t = spec.translate * jnp.stack([h * sym(2), w * sym(3)])
            area = spec.crop + u[4] * (1.0 - spec.crop)
            ratio = jnp.exp(math.log(4 / 3) * sym(5)) if spec.crop < 1.0 else 1.0
            fh = jnp.minimum(1.0, jnp.sqrt(area / ratio))
            fw = jnp.minimum(1.0, jnp.sqrt(area * ratio))
            # the crop window's centre, relative to the image's: anywhere it fits
            cc = jnp.stack([(1.0 - fh) * h / 2 * sym(6), (1.0 - fw) * w / 2 * sym(7)])
            flip = jnp.where(u[8] < spec.hflip, -1.0, 1.0)
            cos, sin = jnp.cos(theta), jnp.sin(theta)
            # input = centre + inv(M) (window centre - t + D F (output - centre)), with
            # M = s R(theta) the forward affine, D the window's size, F the flip
            m_inv = jnp.array([[cos, sin], [-sin, cos]]) / s
            out["matrix"] = m_inv @ jnp.diag(jnp.stack([fh, fw * flip]))
            out["offset"] = m_inv @ (cc - t)
        if spec.gamma:
            out["gamma"] = jnp.exp(math.log1p(spec.gamma) * sym(9))
        if spec.contrast:
            out["contrast"] = 1.0 + spec.contrast * sym(10)
        if spec.brightness:
            out["brightness"] = 255.0 * spec.brightness * sym(11)
        if spec.noise:
            out["noise"] = spec.noise * jax.random.normal(jax.random.fold_in(k, 1), (h, w, 1))
        if spec.blur or spec.sharpen:  # its own key: the other draws stay as they were
            v = jax.random.uniform(jax.random.fold_in(k, 2), (2,))
            if spec.blur:
                out["blur"] = spec.blur * v[0]
            if spec.sharpen:
                out["sharpen"] = spec.sharpen * v[1]
        return out

    return jax.vmap(one)(jnp.arange(n))


def apply_params(images, params: dict, fill: str = "constant", max_blur: float = 8.0):
    """Applies :func:`draw_params`'s parameters (any subset) to uint8 images: the geometric
    map first (bilinear), then blur, sharpening, gamma, contrast, brightness, noise; rounded to
    uint8. ``max_blur`` bounds the blur's standard deviation (it sizes the kernel)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x = images.astype(jnp.float32)
    if "matrix" in params:
        x = jax.vmap(lambda im, m, b: warp(im, m, b, fill))(x, params["matrix"], params["offset"])
    per_image = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731
    if "blur" in params:
        x = gaussian_blur(x, params["blur"], max_blur)
    if "sharpen" in params:
        soft = gaussian_blur(x, jnp.ones(x.shape[0]), 1.0)
        x = x + per_image(params["sharpen"]) * (x - soft)
    if "gamma" in params:
        x = 255.0 * (jnp.clip(x, 0.0, 255.0) / 255.0) ** per_image(params["gamma"])
    if "contrast" in params:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * per_image(params["contrast"]) + mean
    if "brightness" in params:
        x = x + per_image(params["brightness"])
    if "noise" in params:
        x = x + params["noise"]
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def warp(image, matrix, offset, fill: str = "constant"):
    """One image (H, W, C), float: output pixel p samples the input bilinearly at
    ``centre + matrix @ (p - centre) + offset`` (row, column), centre = ((H-1)/2, (W-1)/2).
    Outside the input: 0 (``constant``) or the nearest border pixel (``edge``)."""
    import jax.numpy as jnp  # noqa: PLC0415

    h, w, c = image.shape
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    p = jnp.stack([rows.ravel(), cols.ravel()], -1).astype(jnp.float32) - centre
    src = p @ matrix.T.astype(jnp.float32) + offset.astype(jnp.float32) + centre
    y, x = src[:, 0], src[:, 1]
    if fill == "edge":
        y, x = jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)
    y0, x0 = jnp.floor(y), jnp.floor(x)
    wy, wx = y - y0, x - x0
    flat = image.reshape(h * w, c)
    out = jnp.zeros((h * w, c), jnp.float32)
    for dy, dx, weight in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yi, xi = y0 + dy, x0 + dx
        inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        index = jnp.clip(yi, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xi, 0, w - 1).astype(
            jnp.int32
        )
        out = out + jnp.where(inside, weight, 0.0)[:, None] * flat[index]
    return out.reshape(h, w, c)


BLUR_RADIUS_SIGMAS = 3.0  # the kernel reaches this many standard deviations


def gaussian_blur(x, sigma, max_sigma: float):
    """Each image of ``x`` (batch, H, W, C), float, blurred by a Gaussian of its own standard
    deviation ``sigma`` (batch,) in pixels, at most ``max_sigma`` (0: unchanged), separably,
    with the border pixels repeated (scipy's ``gaussian_filter(mode="nearest", truncate=3)``)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    radius = max(1, math.ceil(BLUR_RADIUS_SIGMAS * max_sigma))
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)[:, None]
    weights = jnp.exp(-0.5 * (taps[None] / s) ** 2)
    weights = jnp.where(jnp.abs(taps[None]) <= BLUR_RADIUS_SIGMAS * s + 0.5, weights, 0.0)
    weights = weights / weights.sum(1, keepdims=True)  # (batch, taps); sigma 0: a delta
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        # a weighted sum of shifted static slices: no gather, no (taps,)-wide intermediate
        out = jnp.zeros_like(x)
        for i in range(2 * radius + 1):
            window = jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            out = out + window * weights[:, i, None, None, None]
        x = out
    return x
