"""``pneumojax serve``: a finished run behind a small web service and page.

* :mod:`~pneumojax.serve.scorer`: the run loaded once, uploads decoded as ``predict`` decodes
  files, padded batches of fixed sizes compiled at start, Grad-CAM overlays;
* :mod:`~pneumojax.serve.batcher`: concurrent requests share one device call;
* :mod:`~pneumojax.serve.app`: the FastAPI application (``/predict``, ``/health``, ``/model``,
  the page at ``/`` from ``static/``); :mod:`~pneumojax.serve.limits`: the request-size limit.

Needs the ``serve`` extra (``pip install 'pneumojax[serve]'``: FastAPI, uvicorn,
python-multipart); nothing else in pneumojax imports this package.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from pneumojax.serve.app import ServeOptions, create_app
from pneumojax.serve.scorer import Scorer

__all__ = ["ServeOptions", "Scorer", "create_app", "serve_run"]


def serve_run(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions = ServeOptions(),
    batch_sizes: tuple[int, ...] | None = None,
    explain: bool = True,
    log=print,
) -> None:
    """Loads ``run_dir``, compiles every batch size, then serves until Ctrl-C or SIGTERM
    (uvicorn stops accepting, finishes the requests in flight, then the batcher stops)."""
    import uvicorn  # noqa: PLC0415

    scorer = Scorer(run_dir, batch_sizes, explain, log)
    start = time.perf_counter()
    scorer.warm_up()
    log(
        f"compiled batch sizes {', '.join(map(str, scorer.batch_sizes))}"
        f"{' with heat maps' if explain else ''} in {time.perf_counter() - start:.1f} s"
    )
    app = create_app(scorer, options, log)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60
    )
    # uvicorn handles SIGINT and SIGTERM itself (stop accepting, finish what is in flight,
    # shut the app down) and then raises the signal again for the handlers it found: these
    # make that a normal end (exit 0) instead of a KeyboardInterrupt or a death by SIGTERM.
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in _STOP_SIGNALS}
    try:
        uvicorn.Server(config).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        log(f"stopped ({signal.Signals(caught[0]).name})")


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
