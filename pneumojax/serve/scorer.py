"""The model behind ``pneumojax serve``: a run loaded once, uploads decoded exactly as
``predict`` decodes files, scored through the run's own scoring path in padded batches of a
fixed set of sizes (each compiled once, at start), with Grad-CAM maps on request.

By default the only batch size is the run's own ``batch_size``, the one ``predict`` pads to:
then the server's probabilities are ``predict``'s, bit for bit, whatever else shares a batch.
Other sizes (``batch_sizes``) make a lone image cheaper on a CPU, but XLA may then round some
results differently in the last bit (measured on a 2-core CPU: up to 2.4e-7 at sizes 1 and 2,
none at 4, 8 and 16, for a run trained at batch 8).
"""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np

from pneumojax.backbones import get_backbone
from pneumojax.data import decode_image_or_reason, open_image, to_8bit_rgb_or_gray
from pneumojax.heatmaps import Explainer, default_layer
from pneumojax.overlays import overlay_pixels
from pneumojax.scoring import load_run, prediction_rows, run_resize, scoring_tta


class UnreadableUpload(ValueError):
    """An upload that does not decode; the message is the reason, on one line."""


@dataclasses.dataclass
class Scored:
    """One image's result: P(pneumonia) per member and, when asked, its heat map."""

    member_p: np.ndarray  # (members,)
    heat: np.ndarray | None  # (S, S) or None


class Scorer:
    """A finished run ready to score uploads. Not thread-safe: one thread calls :meth:`score`
    (the batcher's), any thread may call :meth:`decode`, :meth:`rows` and :meth:`overlay`."""

    def __init__(
        self,
        run_dir: str | Path,
        batch_sizes: tuple[int, ...] | None = None,
        explain: bool = True,
        log=print,
    ):
        run = load_run(run_dir, log=log)
        # the TTA and thresholds the run chose its thresholds with, as predict uses them
        self.tta, thresholds, _ = scoring_tta(run, log=log)
        self.run = dataclasses.replace(run, thresholds=thresholds)
        self.run_dir = Path(run_dir)
        self.image_size = int(run.config["image_size"])
        self.resize = run_resize(run.config)
        sizes = sorted(set(batch_sizes or (run.model.batch_size,)))
        if sizes[0] < 1:
            raise ValueError(f"batch sizes must be at least 1, not {sizes[0]}")
        self.batch_sizes = tuple(sizes)
        self._models = {b: dataclasses.replace(run.model, batch_size=b) for b in sizes}
        self.explainer = None
        if explain:
            cut = run.config["cut"]
            self.layer = default_layer(get_backbone(run.config["backbone"]), cut)
            self.explainer = Explainer.of_run(self.run, "gradcam", self.layer)

    def bucket(self, n: int) -> int:
        """The padded batch size for ``n`` images: the smallest size that holds them (more
        than the largest: chunks of the largest)."""
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def warm_up(self) -> None:
        """Compiles every batch size (and its heat maps) once, so that no request does."""
        for b in self.batch_sizes:
            images = np.zeros((b, self.image_size, self.image_size, 3), np.uint8)
            self.score(images, np.full(b, self.explainer is not None))

    def decode(self, path: str | Path) -> np.ndarray:
        """(S, S, 3) uint8, exactly as ``predict`` decodes the same file; raises
        :class:`UnreadableUpload` with the reason."""
        image, reason = decode_image_or_reason(path, self.image_size, self.resize)
        if image is None:
            raise UnreadableUpload(" ".join(reason.split()))
        return image

    def score(self, images: np.ndarray, explain: np.ndarray) -> list[Scored]:
        """Scores (n, S, S, 3) uint8 images in one padded batch (or chunks of the largest
        size); heat maps for those with ``explain`` set."""
        images = np.asarray(images)
        n = len(images)
        model = self._models[self.bucket(n)]
        member_p = model.probabilities_of_images(images, tta=self.tta)
        heat = [None] * n
        wanted = np.flatnonzero(explain)
        if len(wanted) and self.explainer is not None:
            maps = self.explainer.maps(images[wanted], batch_size=self.bucket(len(wanted)))
            for i, m in zip(wanted, maps):
                heat[i] = m
        return [Scored(p, h) for p, h in zip(member_p, heat)]

    def rows(self, names: list[str], scored: list[Scored]) -> list[dict]:
        """``predict --json``'s rows (``name`` for ``path``) and where the threshold came from."""
        member_p = np.stack([s.member_p for s in scored]) if scored else np.zeros((0, 1))
        rows = prediction_rows(self.run, names, member_p)
        source = "validation" + (
            f" (the run's {self.tta.describe()})" if self.tta is not None else ""
        )
        return [{"name": r.pop("path"), **r, "threshold_source": source} for r in rows]

    def overlay(self, path: str | Path, heat: np.ndarray, max_side: int = 768) -> str:
        """The upload in gray, at most ``max_side`` pixels a side, with its map over it
        (``pneumojax explain``'s colours): a base64 PNG."""
        from PIL import Image  # noqa: PLC0415

        with open_image(path) as image:
            gray = to_8bit_rgb_or_gray(image).convert("L")
        gray.thumbnail((max_side, max_side))
        picture = Image.fromarray(overlay_pixels(np.asarray(gray), heat), "RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode("ascii")
