"""Where a run's model looks: Grad-CAM, Grad-CAM++ and saliency heat maps (``pneumojax explain``)
and the error sheet of ``pneumojax evaluate --explain``.

Maps are gradients of the PNEUMONIA logit (before the sigmoid) in inference mode: every
BatchNorm with its moving statistics, no dropout. They come from the same classifier and best
weights a run scores with, run from images in float32, and a zero ``delta`` added to the chosen
layer's output (see :class:`pneumojax.backbones.KerasGraph`) is what the gradient is taken with
respect to, so frozen layers do not stop it. One jitted function computes a whole batch; a
folder compiles once.

- Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_c mean_ij(dy/dA_ijc) * A_ijc)``.
- Grad-CAM++ (Chattopadhay et al. 2018), in the closed form of its paper and of
  pytorch-grad-cam: ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)``, channel weights
  ``sum_ij(alpha * ReLU(g))``.
- Saliency (Simonyan et al. 2014): ``max_channel |dy/dpixel|`` of the raw image.

An ensemble's map is the mean of its members' maps. Layer maps are upsampled bilinearly to the
model's input and then to each image's own size (images were squashed, not cropped, to the
input, so the same stretch maps them back).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pneumojax import balance
from pneumojax.backbones import ancestors, get_backbone, preprocess
from pneumojax.backbones.registry import BackboneInfo
from pneumojax.data import load_images
from pneumojax.data.decode import open_image, to_8bit_rgb_or_gray
from pneumojax.scoring import (
    LoadedRun,
    load_run,
    predicted_labels,
    prediction_rows,
    run_intensity,
    run_resize,
    scoring_tta,
)
from pneumojax.inference import gather_image_files, score_run
from pneumojax.predictions import read_predictions
from pneumojax.io import write_text_atomic
from pneumojax.model import build_classifier
from pneumojax.progress import progress_bar
from pneumojax.step import Steps, make_mesh

METHODS = ("gradcam", "gradcam++", "saliency")
_SUFFIX = {"gradcam": "gradcam", "gradcam++": "gradcampp", "saliency": "saliency"}
_TITLE = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "saliency": "saliency"}
_MERGES = ("Add", "Concatenate")


class LayerChoiceError(ValueError):
    """A ``--layer`` that is not a spatial layer at or before the run's cut."""


def input_layer(info: BackboneInfo) -> str:
    return next(s.name for s in info.layers if s.kind == "InputLayer")


def default_layer(info: BackboneInfo, cut: str) -> str:
    """The last block output at or before the cut: the last merge layer (Add or Concatenate,
    or the activation right after one, as ResNet's ``_out``) that every path from the input to
    the cut goes through. For the four default cuts: conv5_block2_out (ResNet152),
    conv5_block3_out (ResNet50V2), conv5_block14_concat (DenseNet121), mixed9 (InceptionV3)."""
    by_name = {s.name: s for s in info.layers}
    need = ancestors(info.layers, [cut])
    first = input_layer(info)
    for spec in reversed(info.layers[: info.layer_index[cut] + 1]):
        if spec.name not in need:
            continue
        merge = spec.kind in _MERGES or (
            spec.kind == "Activation"
            and len(spec.inputs) == 1
            and by_name[spec.inputs[0]].kind in _MERGES
        )
        if merge and first not in ancestors(info.layers, [cut], given=[spec.name]):
            return spec.name
    return cut  # a cut inside the stem: its own output


def check_layer(info: BackboneInfo, cut: str, layer: str) -> str:
    """``layer`` if the gradient of the run's output reaches it (it lies at or before the cut,
    on a path to it) and its output is a spatial map; otherwise a clear error."""
    try:
        info.check_layer(layer)
    except KeyError as e:
        raise LayerChoiceError(e.args[0]) from None
    if layer not in ancestors(info.layers, [cut]) or layer == input_layer(info):
        where = "after" if info.layer_index[layer] > info.layer_index[cut] else "not on a path to"
        raise LayerChoiceError(
            f"{layer} is {where} the run's cut {cut}: the model's output does not "
            f"depend on it. Choose a layer up to {cut} "
            f"(pneumojax layers --backbone {info.name})"
        )
    return layer


@dataclasses.dataclass
class Explainer:
    """Heat maps of a classifier (``backbone`` cut at ``cut``; ``variables``: every member's
    whole classifier, stacked on a leading axis) for batches of uint8 images at its input
    size. :meth:`of_run` makes one for a run's model."""

    backbone: str
    cut: str
    variables: dict
    method: str
    layer: str  # the Keras layer the map is taken at ('' for saliency: the raw image)
    batch_size: int = 16
    intensity: str = "none"  # the run's --intensity (saliency: gradients w.r.t. its output)

    @classmethod
    def of_run(cls, run: LoadedRun, method: str, layer: str, batch_size: int = 16):
        config = run.config
        return cls(
            config["backbone"],
            config["cut"],
            run.full_variables,
            method,
            layer,
            batch_size,
            run_intensity(config),
        )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        info = get_backbone(self.backbone)
        probe = input_layer(info) if self.method == "saliency" else self.layer
        self.model = build_classifier(
            info,
            self.cut,
            frozenset(),
            jnp.float32,
            intermediates=(probe,),
            intensity=self.intensity,
        )
        self._probe, self._mode = probe, info.preprocess_mode
        self._steps = Steps(self.model, optax.identity(), make_mesh())
        shared, differ, self._structure = _shared_and_member_variables(self.variables)
        # placed once: every maps() call would otherwise copy the whole model to the devices
        self._variables = jax.device_put((shared, differ), self._steps.replicated)
        self.members = int(jax.tree.leaves(self.variables)[0].shape[0])

    def maps(
        self, images: np.ndarray, desc: str | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, S, S) float32 maps (>= 0; ensembles: the members' mean), for uint8 (n, S, S, 3),
        in padded batches of ``batch_size`` (default: the explainer's own)."""
        out = np.zeros(images.shape[:3], np.float32)

        def sink(start, stop, maps):
            out[start:stop] = maps

        size = batch_size or self.batch_size
        self._steps.map(self._batch_maps, self._variables, images, size, sink, desc)
        return out

    @functools.cached_property
    def _batch_maps(self):
        return functools.partial(
            heat_maps, self.model, self._probe, self.method, self._mode, self._structure
        )


def _shared_and_member_variables(stacked: dict):
    """Splits K members' stacked variables into the leaves they share (one copy, so the frozen
    backbone runs once for all members) and the leaves that differ (kept stacked)."""
    leaves, treedef = jax.tree.flatten(stacked)
    same = tuple(bool(np.all(leaf == leaf[:1])) for leaf in leaves)
    shared = [leaf[0] for leaf, s in zip(leaves, same) if s]
    differ = [leaf for leaf, s in zip(leaves, same) if not s]
    return shared, differ, (treedef, same)


def _member_tree(shared, differ, structure):
    treedef, same = structure
    s, d = iter(shared), iter(differ)
    return jax.tree.unflatten(treedef, [next(s) if x else next(d) for x in same])


def heat_maps(model, probe: str, method: str, mode: str, structure, variables, images):
    """The batch's maps, (n, S, S), averaged over members; pure and jittable."""
    shared, differ = variables
    x = images.astype(jnp.float32)

    def logit_and_activation(delta, member_differ):
        member = _member_tree(shared, member_differ, structure)
        logits, inter = model.apply(member, x, deltas={probe: delta})
        return logits[:, 1].sum(), inter[probe]

    first = [d[0] for d in differ]
    shape = jax.eval_shape(logit_and_activation, 0.0, first)[1]
    zero = jnp.zeros(shape.shape, shape.dtype)
    grad = jax.grad(logit_and_activation, has_aux=True)
    if differ:
        g, a = jax.vmap(grad, in_axes=(None, 0))(zero, differ)
    else:
        g, a = jax.tree.map(lambda t: t[None], grad(zero, []))
    if method == "saliency":
        # g is the gradient at the input layer, after preprocessing: take it back to pixels.
        _, back = jax.vjp(lambda im: preprocess(im, mode), x)
        maps = jnp.abs(jax.vmap(lambda gi: back(gi)[0])(g)).max(-1)
    else:
        maps = jax.vmap(functools.partial(_cam, plus=method == "gradcam++"))(g, a)
        maps = jax.image.resize(maps, (*maps.shape[:2], *images.shape[1:3]), "bilinear")
    return jnp.maximum(maps, 0).mean(0)


def _cam(g, a, plus: bool):
    """Grad-CAM (or ++) of one member: g, a (n, h, w, C) -> (n, h, w)."""
    if plus:
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum((1, 2), keepdims=True) * g3 + 1e-7)
        alpha = jnp.where(g != 0, alpha, 0.0)
        weights = (alpha * jnp.maximum(g, 0)).sum((1, 2))
    else:
        weights = g.mean((1, 2))
    return jnp.maximum(jnp.einsum("nhwc,nc->nhw", a, weights), 0)


def resolve_layer(info: BackboneInfo, cut: str, layer: str | None, method: str) -> str:
    if method == "saliency":
        if layer:
            raise LayerChoiceError("--layer does not apply to --method saliency (the raw image)")
        return ""
    return check_layer(info, cut, layer) if layer else default_layer(info, cut)


def describe(run: LoadedRun, method: str, layer: str, chosen: bool) -> str:
    """One line saying what the maps are: method, layer (and why that one), members."""
    where = (
        "of the raw image's pixels"
        if method == "saliency"
        else f"at {layer}"
        + ("" if chosen else f" (default: the last block output up to the cut {run.config['cut']})")
    )
    members = member_count(run)
    mean = f"; the mean of the {members} ensemble members' maps" if members > 1 else ""
    tta = (
        f"; maps of each image as given, probabilities with the run's {run.tta.describe()}"
        if getattr(run, "tta", None)
        else ""
    )
    return f"{_TITLE[method]} {where}, of the PNEUMONIA logit in inference mode{mean}{tta}"


def member_count(run: LoadedRun) -> int:
    """How many models a run holds (balance and seed ensembles alike)."""
    return int(jax.tree.leaves(run.full_variables)[0].shape[0])


def explain_paths(
    run_dir,
    paths: list[str],
    out,
    layer: str | None = None,
    method: str = "gradcam",
    precision: str | None = None,
    log=print,
) -> list[dict]:
    """``pneumojax explain``: an overlay PNG per image and ``explain.csv`` in ``out``."""
    chosen = check_run_layer(run_dir, layer, method)  # usage errors before any loading
    run = load_run(run_dir, precision, log)
    files = gather_image_files(paths, log)
    images = load_images(
        files, run.config["image_size"], progress=len(files) > 50, resize=run_resize(run.config)
    )
    # probabilities and labels exactly as ``predict`` gives them (the run's own TTA included)
    tta, thresholds, _ = scoring_tta(run, log=log)
    member_p = run.model.probabilities_of_images(images, tta=tta)
    run = dataclasses.replace(run, thresholds=thresholds)
    return explain_images(run, files, images, member_p, Path(out), chosen, method, layer, log)


def explain_images(run, files, images, member_p, out: Path, layer, method, asked, log):
    """Maps for ``images`` (decoded ``files``), overlays named after the files, explain.csv."""
    log(describe(run, method, layer, chosen=bool(asked)))
    maps = Explainer.of_run(run, method, layer).maps(images, desc="heat maps")
    rows = prediction_rows(run, files, member_p)
    names = overlay_names(files, _SUFFIX[method])
    out.mkdir(parents=True, exist_ok=True)
    what = _TITLE[method] + ("" if method == "saliency" else f" at {layer}")
    for row, heat, name in progress_bar(
        list(zip(rows, maps, names)), desc="overlays", unit="img", disable=len(rows) < 20
    ):
        threshold = row["threshold"]
        caption = (
            f"{Path(row['path']).name}\nP(pneumonia) {row['p_pneumonia']:.3f}: {row['label']}"
            + (f" (threshold {threshold:.3f})" if threshold != "vote" else " (members' vote)")
            + f"\n{what}"
        )
        peak = write_overlay(row["path"], heat, caption, out / name)
        row.update(peak_x=peak[0], peak_y=peak[1], overlay=name)
    header = ["path", "p_pneumonia", "label", "peak_x", "peak_y", "overlay"]
    lines = [",".join(header)] + [
        ",".join(_csv(str(row[k])) if k in ("path", "overlay") else str(row[k]) for k in header)
        for row in rows
    ]
    write_text_atomic(out / "explain.csv", "\n".join(lines) + "\n")
    log(f"wrote {len(rows)} overlays and {out / 'explain.csv'}")
    return rows


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


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


def check_run_layer(run_dir, layer: str | None, method: str) -> str:
    """:func:`resolve_layer` for a run folder, reading only its config.json."""
    config_file = Path(run_dir) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a pneumojax run folder (no config.json)")
    config = json.loads(config_file.read_text())
    return resolve_layer(get_backbone(config["backbone"]), config["cut"], layer, method)


def explain_errors(
    run: LoadedRun, eval_dir: Path, count: int, method="gradcam", layer=None, log=print
):
    """``evaluate --explain N``: overlays of the N most confident false positives and false
    negatives of an evaluation (read back from its predictions.csv) in ``eval_dir/explain``
    and their contact sheet in ``eval_dir/plots/errors.png``."""
    info = get_backbone(run.config["backbone"])
    chosen = resolve_layer(info, run.config["cut"], layer, method)
    paths, labels, member_p = read_predictions(eval_dir / "predictions.csv")
    predicted = predicted_labels(member_p, run.thresholds)
    mean = balance.mean_probability(member_p.T)
    fp = [i for i in np.argsort(-mean, kind="stable") if labels[i] == 0 and predicted[i] == 1]
    fn = [i for i in np.argsort(mean, kind="stable") if labels[i] == 1 and predicted[i] == 0]
    picked = fp[:count] + fn[:count]
    rows: list[dict] = []
    if picked:
        files = [paths[i] for i in picked]
        images = load_images(
            files, run.config["image_size"], progress=False, resize=run_resize(run.config)
        )
        rows = explain_images(
            run, files, images, member_p[picked], eval_dir / "explain", chosen, method, layer, log
        )
    sheet = plot_error_sheet(
        rows[: len(fp[:count])],
        rows[len(fp[:count]) :],
        eval_dir / "explain",
        eval_dir / "plots" / "errors.png",
        count,
    )
    log(f"wrote {sheet} ({len(fp[:count])} false positives, {len(fn[:count])} false negatives)")
    return sheet


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


def evaluate_and_explain(run_dir, explain: tuple[int, str, str | None], log=print, **evaluate):
    """``pneumojax evaluate --explain N``: :func:`pneumojax.inference.evaluate_run`, then heat
    maps of the N most confident false positives and false negatives, labelled at the
    thresholds the evaluation used (re-derived for another TTA)."""
    metrics, run, folder = score_run(run_dir, log=log, **evaluate)
    if explain[0]:
        explain_errors(run, folder, *explain, log=log)
    return metrics
