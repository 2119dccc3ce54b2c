"""Heat maps drawn over the images they explain: each image in gray at its own size with the
map over it in matplotlib's inferno and a caption bar below, the overlays' file names, and the
error sheet of ``evaluate --explain`` (the maps come from :mod:`pneumojax.heatmaps`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from pneumojax.data.decode import open_image, to_8bit_rgb_or_gray


def overlay_names(files: list[str], suffix: str) -> list[str]:
    """``<stem>.<suffix>.png`` per file; stems that clash get their parent folders' names in
    front (``PNEUMONIA_x``), then a number, so no overlay overwrites another."""
    names: list[str] = []
    taken: set[str] = set()
    stems = [Path(f).stem for f in files]
    clashes = {s for s in stems if stems.count(s) > 1}
    for f, stem in zip(files, stems):
        base = f"{Path(f).parent.name}_{stem}" if stem in clashes else stem
        name, k = f"{base}.{suffix}.png", 1
        while name in taken:
            k += 1
            name = f"{base}-{k}.{suffix}.png"
        taken.add(name)
        names.append(name)
    return names


def heat_to_image(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (S, S) map stretched to (height, width) bilinearly and scaled to [0, 1] by its
    maximum (an all-zero map stays zero)."""
    from PIL import Image  # noqa: PLC0415

    big = np.asarray(
        Image.fromarray(np.asarray(heat, np.float32), "F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    top = float(big.max())
    return np.clip(big / top, 0, 1) if top > 0 else np.zeros_like(big)


OVERLAY_ROWS = 512  # rows blended at a time: a 12000 x 12000 image never lives in float64


def overlay_pixels(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``gray`` (H, W) uint8 with ``heat`` (S, S) stretched over it in matplotlib's inferno at
    ``alpha``: (H, W, 3) uint8. The map is upsampled once, in float32, and blended a few rows
    at a time, so memory stays near the uint8 image's own size (a 12000 x 12000 DICOM:
    about 1 GB, where float64 RGBA needed 8)."""
    from matplotlib import colormaps  # noqa: PLC0415

    h, w = gray.shape
    lut = (colormaps["inferno"](np.arange(256))[:, :3] * 255.0).astype(np.float32)
    big = heat_to_image(heat, w, h)  # float32 in [0, 1]
    # matplotlib's own quantisation of a float in [0, 1] onto its 256 colours
    index = np.minimum((big * 256.0).astype(np.int32), 255).astype(np.uint8)
    del big
    out = np.empty((h, w, 3), np.uint8)
    for r in range(0, h, OVERLAY_ROWS):
        rows = slice(r, r + OVERLAY_ROWS)
        blend = (1 - alpha) * gray[rows, :, None].astype(np.float32) + alpha * lut[index[rows]]
        out[rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def write_overlay(path, heat: np.ndarray, caption: str, out: Path, alpha: float = 0.4):
    """The image in gray at its own size with the map over it (inferno, ``alpha``) and a
    caption bar below; returns the map's peak (x, y) in the image's pixels (empty strings for
    an all-zero map)."""
    from PIL import Image  # noqa: PLC0415

    with open_image(path) as image:
        gray = np.asarray(to_8bit_rgb_or_gray(image).convert("L"), np.uint8)
    h, w = gray.shape
    s = heat.shape[0]
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    peak = (round((col + 0.5) * w / heat.shape[1], 1), round((row + 0.5) * h / s, 1))
    if not heat.max() > 0:
        peak = ("", "")  # an all-zero map (nothing speaks for PNEUMONIA) has no peak
    picture = Image.fromarray(overlay_pixels(gray, heat, alpha), "RGB")
    _with_caption(picture, caption).save(out, compress_level=1)
    return peak


def _with_caption(picture, caption: str):
    from matplotlib import font_manager  # noqa: PLC0415
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    w, h = picture.size
    size = max(10, w // 45)
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    lines = [part for line in caption.split("\n") for part in _wrap(line, font, w - size)]
    bar = int(len(lines) * size * 1.3 + size * 0.6)
    canvas = Image.new("RGB", (w, h + bar), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((size // 2, h + size * 0.3 + i * size * 1.3), line, fill="white", font=font)
    return canvas


def _wrap(line: str, font, width: int) -> list[str]:
    """``line`` broken at spaces into lines that fit ``width``; a word too long for a line of
    its own is broken between characters."""
    out = [""]
    for word in line.split(" "):
        trial = f"{out[-1]} {word}".strip()
        if font.getlength(trial) <= width:
            out[-1] = trial
            continue
        if out[-1]:
            out.append("")
        for char in word:
            if out[-1] and font.getlength(out[-1] + char) > width:
                out.append("")
            out[-1] += char
    return out


def plot_error_sheet(false_pos: list[dict], false_neg: list[dict], folder: Path, out, count):
    """Two rows of overlays: the most confident false positives, then false negatives."""
    from PIL import Image  # noqa: PLC0415

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from pneumojax.plots import _save  # noqa: PLC0415

    columns = max(1, min(count, max(len(false_pos), len(false_neg), 1)))
    fig = Figure(figsize=(2.4 * columns, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, columns, squeeze=False)
    for r, (rows, title) in enumerate(
        (
            (false_pos, "false positive (NORMAL called PNEUMONIA)"),
            (false_neg, "false negative (PNEUMONIA called NORMAL)"),
        )
    ):
        for c in range(columns):
            ax = grid[r][c]
            ax.set_axis_off()
            if c < len(rows):
                with Image.open(folder / rows[c]["overlay"]) as im:
                    im.thumbnail((320, 400))
                    ax.imshow(np.asarray(im))
            elif c == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        grid[r][0].text(
            -0.08,
            0.5,
            title.split(" (")[0],
            rotation=90,
            ha="right",
            va="center",
            transform=grid[r][0].transAxes,
            fontsize=9,
        )
    title = "Most confident errors at the run's threshold; heat maps of the PNEUMONIA logit"
    fig.suptitle(textwrap.fill(title, 26 * columns))  # a narrow sheet wraps it, not crops it
    return _save(fig, out)
