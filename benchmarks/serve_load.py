"""``pneumojax serve`` under load on localhost: a fixed number of concurrent clients each send
a fixed number of one-image requests, with and without batching; requests/s, p50/p99 latency,
the server's memory (RSS) before and after, and a check that every answer equals the answer
the same image gets alone.

    python benchmarks/serve_load.py [--run RUN] [--data FOLDER] [--clients 8] [--requests 25]

Without ``--run`` it trains a small run first (DenseNet121 to its default cut, random init,
128 px, one epoch on the demo set). Results: ``benchmarks/results/serve-load-cpu.{md,json}``.
The functions here also drive the suite's bounded load test (tests/test_serve_process.py).
"""

from __future__ import annotations

import argparse
import json
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MINI_TEST = REPO.parent / "shared" / "data" / "chest_xray_mini" / "test"
READY = re.compile(r"Uvicorn running on (http://\S+)")


class Server:
    """``pneumojax serve`` in its own process on a free port; its log in ``log_file``."""

    def __init__(self, run_dir, log_file: Path, *options: str, timeout: float = 120):
        self.log_file = Path(log_file)
        command = [sys.executable, "-m", "pneumojax", "serve", "--run", str(run_dir)]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                command + ["--port", "0", *options], stdout=log, stderr=subprocess.STDOUT
            )
        self.url = self._wait(timeout)

    def _wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.search(self.log_file.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log_file.read_text()[-3000:]}")

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (``VmHWM``: its peak so far), MiB (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def payloads(folder: Path, count: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the first ``count`` images under ``folder``, sorted by path."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in files[:count]]


def predict_answers(run_dir, files: list[Path]) -> list[float]:
    """``pneumojax predict --json``'s probabilities for ``files``."""
    command = [sys.executable, "-m", "pneumojax", "predict", "--run", str(run_dir), "--json"]
    done = subprocess.run(command + [str(f) for f in files], check=True, capture_output=True)
    return [row["p_pneumonia"] for row in json.loads(done.stdout)]


def post(client, url: str, name: str, data: bytes) -> float:
    response = client.post(f"{url}/predict", files={"file": (name, data)})
    response.raise_for_status()
    return response.json()[0]["p_pneumonia"]


def single_answers(url: str, images: list[tuple[str, bytes]]) -> list[float]:
    """Each image's probability scored alone (one request at a time)."""
    import httpx  # noqa: PLC0415

    with httpx.Client(timeout=60) as client:
        return [post(client, url, name, data) for name, data in images]


def load(url: str, images: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    """``clients`` threads, each sending ``requests`` one-image requests back to back (image
    ``(c * requests + r) % len(images)``); every answer, the throughput and latencies."""
    import httpx  # noqa: PLC0415

    start_line = threading.Barrier(clients)

    def client_run(c: int):
        out = []
        with httpx.Client(timeout=120) as client:
            start_line.wait()
            for r in range(requests):
                index = (c * requests + r) % len(images)
                begin = time.perf_counter()
                p = post(client, url, *images[index])
                out.append((index, p, time.perf_counter() - begin))
        return out

    begin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client_run, range(clients)) for x in part]
    seconds = time.perf_counter() - begin
    latency = np.array([r[2] for r in results]) * 1000
    return {
        "clients": clients,
        "requests": len(results),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(results) / seconds, 2),
        "p50_ms": round(float(np.percentile(latency, 50)), 1),
        "p99_ms": round(float(np.percentile(latency, 99)), 1),
        "answers": [(i, p) for i, p, _ in results],
    }


def measure(server: Server, images, clients: int, requests: int, rounds: int = 2) -> dict:
    """Single answers, then ``rounds`` load rounds (the server's RSS after each): the last
    round's figures, whether every answer equalled the single one, and the memory."""
    import httpx  # noqa: PLC0415

    alone = single_answers(server.url, images)
    rss = {"before_mb": round(server.rss_mb(), 1), "after_round_mb": []}
    mismatches, worst = 0, 0.0
    for _ in range(rounds):
        figures = load(server.url, images, clients, requests)
        answers = figures.pop("answers")
        mismatches += sum(p != alone[i] for i, p in answers)
        worst = max(worst, max(abs(p - alone[i]) for i, p in answers))
        rss["after_round_mb"].append(round(server.rss_mb(), 1))
    rss["peak_mb"] = round(server.rss_mb("VmHWM"), 1)
    health = httpx.get(f"{server.url}/health").json()
    figures.update(
        alone=alone,
        answers_equal_single=mismatches == 0,
        mismatches=mismatches,
        max_diff_from_alone=worst,
        rss=rss,
        device_calls=health["device_calls"],
        images_scored=health["images"],
    )
    return figures


SETTINGS = {  # name -> pneumojax serve options
    "batching": ["--batch-window-ms", "10"],
    "no batching": ["--max-batch", "1", "--batch-window-ms", "0"],
    "no batching, padded to 1": [
        "--batch-sizes",
        "1",
        "--max-batch",
        "1",
        "--batch-window-ms",
        "0",
    ],
    "batching, sizes 1,2,4,8": ["--batch-sizes", "1,2,4,8", "--batch-window-ms", "10"],
}


def train_small_run(out: Path) -> Path:
    command = [sys.executable, "-m", "pneumojax", "train", "--data", "demo", "--weights", "none"]
    command += ["--image-size", "128", "--epochs", "1", "--batch-size", "8", "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv=None) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import cpu_model, hardware, markdown_table, versions, write_outputs  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder [default: train a small one]")
    parser.add_argument("--data", type=Path, default=MINI_TEST, help="JPEGs to send")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="per client and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", action="append", choices=list(SETTINGS), help="these settings")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve-load-cpu.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pneumojax-serve-load-") as tmp:
        run_dir = args.run or train_small_run(Path(tmp) / "run")
        images = payloads(args.data, args.images)
        predicted = predict_answers(run_dir, [args.data / name for name, _ in images])
        results = {}
        for name, options in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            server = Server(run_dir, Path(tmp) / f"{name}.log", "--no-explain", *options)
            try:
                results[name] = measure(server, images, args.clients, args.requests, args.rounds)
            finally:
                server.stop()
            results[name]["max_diff_from_predict"] = float(
                np.abs(np.array(results[name]["alone"]) - predicted).max()
            )
            shown = {k: v for k, v in results[name].items() if k not in ("rss", "alone")}
            print(name, shown, flush=True)
    payload = {
        "run": str(args.run or "DenseNet121, default cut, random init, 128 px, batch 8 (demo)"),
        "images": len(images),
        "settings": SETTINGS,
        "results": results,
        "hardware": hardware(),
        "versions": versions(),
    }
    rows = [
        [
            name,
            str(r["requests"]),
            f"{r['requests_per_s']:.1f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['images_scored'] / max(1, r['device_calls']):.2f}",
            "yes"
            if r["answers_equal_single"]
            else f"no: {r['mismatches']}, by <= {r['max_diff_from_alone']:.1e}",
            f"{r.get('max_diff_from_predict', 0.0):.1e}",
            f"{r['rss']['before_mb']:.0f} -> {' -> '.join(f'{m:.0f}' for m in r['rss']['after_round_mb'])}",
        ]
        for name, r in results.items()
    ]
    table = markdown_table(
        [
            "setting",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "images/call",
            "= alone",
            "max diff from predict",
            "RSS MiB",
        ],
        rows,
    )
    markdown = (
        f"# pneumojax serve under load ({cpu_model()}, {os.cpu_count()} cores)\n\n"
        f"{payload['run']}; {args.clients} concurrent clients on localhost, {args.requests} "
        f"one-image requests each per round, {args.rounds} rounds (figures: the last); {len(images)} "
        f'JPEGs from {args.data.name}. "= alone": every answer under load equals the image\'s answer '
        'scored alone by the same server; "max diff from predict": the largest difference of '
        "those lone answers from `pneumojax predict`'s (which pads to the run's batch size). RSS: the server's after warm-up, then after each round. Load average "
        f"{os.getloadavg()[0]:.1f} at the end (other processes shared the CPU).\n\n"
        f"{table}\n"
    )
    print(markdown)
    write_outputs(args.out, payload, markdown)


if __name__ == "__main__":
    main()
