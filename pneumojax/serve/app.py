"""The web application of ``pneumojax serve`` (FastAPI on Starlette): ``POST /predict``,
``GET /health``, ``GET /model`` and the page at ``/``.

Uploads are read by Starlette's multipart parser (python-multipart) into temporary files,
decoded exactly as ``predict`` decodes files (:class:`~pneumojax.serve.scorer.Scorer`), and
scored by the :class:`~pneumojax.serve.batcher.Batcher`, so that concurrent requests share one
device call. Every refusal is a 4xx whose JSON ``detail`` is one line saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from pneumojax.modelcard import model_card
from pneumojax.serve.batcher import Batcher
from pneumojax.serve.limits import BodyLimit, BodyTooLarge, too_large
from pneumojax.serve.scorer import Scorer, UnreadableUpload

STATIC = Path(__file__).parent / "static"
COPY_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts (``pneumojax serve``'s options)."""

    max_batch: int | None = None  # images per device call; None: the largest batch size
    window_ms: float = 10.0  # how long a request waits for others to share its call
    max_upload_mb: float = 32.0  # the largest request body
    max_files: int = 16  # the most images in one request


def run_card(run_dir: Path) -> dict:
    """``GET /model``: the run's model card (:func:`pneumojax.modelcard.model_card`)."""
    return model_card(run_dir)


def create_app(scorer: Scorer, options: ServeOptions = ServeOptions(), log=print) -> FastAPI:
    """The application serving ``scorer``'s run (loaded and warmed up by the caller)."""
    batcher = Batcher(
        lambda items: scorer.score(
            np.stack([i for i, _ in items]), np.array([e for _, e in items])
        ),
        options.max_batch or scorer.batch_sizes[-1],
        options.window_ms / 1000,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # in-flight requests have finished by now (uvicorn waits)
            log(f"served {batcher.stats.items} images in {batcher.stats.calls} device calls")

    app = FastAPI(title="pneumojax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.scorer = batcher, scorer
    limit = int(options.max_upload_mb * 2**20)
    app.add_middleware(BodyLimit, limit=limit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return _health(scorer, batcher, options)

    @app.get("/model")
    async def model():
        try:
            return await run_in_threadpool(run_card, scorer.run_dir)
        except (OSError, ValueError, KeyError) as e:
            raise HTTPException(500, f"cannot read the model card: {_line(e)}") from None

    @app.post("/predict")
    async def predict(request: Request, explain: bool = False):
        """Per uploaded ``file``, in order: name, P(pneumonia), label at the run's threshold,
        the threshold and its source; with ``?explain=1`` a Grad-CAM overlay (base64 PNG)."""
        if explain and scorer.explainer is None:
            raise HTTPException(400, "heat maps are off on this server (started with --no-explain)")
        uploads = await _uploads(request, options, limit)
        return await _answer(uploads, explain, scorer, batcher)

    return app


def _health(scorer: Scorer, batcher: Batcher, options: ServeOptions) -> dict:
    return {
        "status": "ok",
        "run": str(scorer.run_dir),
        "batch_sizes": list(scorer.batch_sizes),
        "max_batch": batcher.max_batch,
        "window_ms": options.window_ms,
        "explain": scorer.explainer is not None,
        "device_calls": batcher.stats.calls,
        "images": batcher.stats.items,
    }


async def _answer(uploads: list, explain: bool, scorer: Scorer, batcher: Batcher) -> list[dict]:
    """The rows for ``uploads``: saved, decoded (a 422 naming the first that does not decode),
    scored through the batcher, overlays drawn when asked."""
    with tempfile.TemporaryDirectory(prefix="pneumojax-serve-") as folder:
        try:
            paths = await run_in_threadpool(_save, uploads, Path(folder))
            images = await asyncio.gather(
                *(run_in_threadpool(_decoded, scorer, name, path) for name, path in paths)
            )
        finally:
            for _, upload in uploads:
                await upload.close()
        scored = await asyncio.gather(*(batcher.submit((im, explain)) for im in images))
        rows = scorer.rows([name for name, _ in paths], list(scored))
        if explain:
            for row, (_, path), s in zip(rows, paths, scored):
                row["overlay_png"] = await run_in_threadpool(scorer.overlay, path, s.heat)
                row["heat_map"] = f"Grad-CAM at {scorer.layer}"
    return rows


async def _uploads(request: Request, options: ServeOptions, limit: int) -> list:
    """The request's ``file`` fields as (name, UploadFile); a 4xx for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise HTTPException(
            415,
            f"expected multipart/form-data with one or more 'file' fields, got "
            f"{kind or 'no content type'} (curl -F file=@xray.jpeg ...)",
        )
    try:
        form = await request.form(max_files=options.max_files, max_fields=options.max_files)
    except BodyTooLarge:
        raise HTTPException(413, too_large(limit)) from None
    except (MultiPartException, StarletteHTTPException) as e:  # Starlette turns the first
        message = e.message if isinstance(e, MultiPartException) else e.detail  # into the second
        raise HTTPException(400, f"cannot read the form: {_line(message)}") from None
    files = [(k, v) for k, v in form.multi_items() if k == "file"]
    if any(not isinstance(v, UploadFile) for _, v in files):
        await form.close()
        raise HTTPException(400, "the 'file' field must be a file upload, not text")
    if not files:
        await form.close()
        raise HTTPException(400, "no 'file' field: send one or more images (curl -F file=@x.jpeg)")
    return [(v.filename or f"image-{i + 1}", v) for i, (_, v) in enumerate(files)]


def _save(uploads: list, folder: Path) -> list[tuple[str, Path]]:
    """Each upload written to ``folder`` under a safe name that keeps its suffix (a ``.dcm``
    name changes only the reason given for a file that is not DICOM)."""
    out = []
    for i, (name, upload) in enumerate(uploads):
        suffix = "".join(c for c in Path(name).suffix[:12] if c.isalnum() or c == ".")
        path = folder / f"{i}{suffix}"
        upload.file.seek(0)
        with open(path, "wb") as f:
            while chunk := upload.file.read(COPY_CHUNK):
                f.write(chunk)
        out.append((name, path))
    return out


def _decoded(scorer: Scorer, name: str, path: Path) -> np.ndarray:
    try:
        return scorer.decode(path)
    except UnreadableUpload as e:
        raise HTTPException(422, f"{name}: {e}") from None


def _line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__
