"""``pneumojax serve`` as a real process (uvicorn): the page in headless Chromium shows
``predict``'s probability, a bounded load test with and without batching (every answer equal to
the image's answer alone, memory bounded), and Ctrl-C / SIGTERM finishing requests in flight."""

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from pneumojax.inference import predict_paths  # noqa: E402

from conftest import MINI_DATA, REPO  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_load  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Where the browser test also copies its screenshot when set (the README's docs/serve/page.png).
SCREENSHOT_COPY = os.environ.get("PNEUMOJAX_SERVE_SCREENSHOT")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """One batching server shared by the browser and the load tests."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    running = serve_load.Server(tiny_run, log, "--batch-window-ms", "10")
    yield running
    assert running.stop() == 0, log.read_text()[-2000:]


def _xray():
    found = sorted((MINI_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))
    if not found:
        pytest.skip(f"no chest_xray_mini at {MINI_DATA} (PNEUMOJAX_MINI_DATA)")
    return found[0]


def _browser(profile: Path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def test_the_page_in_a_browser_shows_predicts_probability(server, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xray = _xray()
    (expected,) = predict_paths(tiny_run, [str(xray)], log=lambda m: None)
    browser = _browser(tmp_path / "profile")
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "loading" not in b.find_element(By.ID, "card-model").text)
        browser.find_element(By.ID, "files").send_keys(str(xray))
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-done") == "1")
        shown = browser.find_element(By.CSS_SELECTOR, ".result .p-value")
        assert float(shown.get_attribute("data-p")) == expected["p_pneumonia"]
        assert shown.text == f"{expected['p_pneumonia']:.4f}"
        label = browser.find_element(By.CSS_SELECTOR, ".result .label").text
        assert label == expected["label"]
        overlay = browser.find_element(By.CSS_SELECTOR, ".result img.overlay")
        assert browser.execute_script("return arguments[0].naturalWidth", overlay) > 0
        assert "densenet121" in browser.find_element(By.ID, "card-model").text
        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    print(f"screenshot: {shot}")
    if SCREENSHOT_COPY:
        shutil.copy(shot, SCREENSHOT_COPY)


def test_load_with_and_without_batching_answers_as_alone_in_bounded_memory(
    server, tiny_run, tmp_path
):
    images = serve_load.payloads(MINI_DATA / "test", 8) or _generated(tmp_path)
    unbatched = serve_load.Server(
        tiny_run, tmp_path / "unbatched.log", "--no-explain", *serve_load.SETTINGS["no batching"]
    )
    try:
        figures = {
            "batching": serve_load.measure(server, images, clients=6, requests=8, rounds=3),
            "no batching": serve_load.measure(unbatched, images, clients=6, requests=8, rounds=3),
        }
    finally:
        assert unbatched.stop() == 0
    print(json.dumps(figures, indent=1))
    for name, f in figures.items():
        assert f["answers_equal_single"], name
        assert f["requests"] == 48
        rounds = f["rss"]["after_round_mb"]  # allocators settle in the first rounds, then
        assert rounds[2] - rounds[1] < 25, (name, f["rss"])  # no growth round to round
        assert f["rss"]["peak_mb"] - f["rss"]["before_mb"] < 300, (name, f["rss"])
    assert figures["no batching"]["device_calls"] == figures["no batching"]["images_scored"]
    batched = figures["batching"]
    assert batched["device_calls"] < batched["images_scored"]  # concurrent clients shared calls


def _generated(folder: Path) -> list[tuple[str, bytes]]:
    import io

    import numpy as np
    from PIL import Image

    out = []
    for i in range(8):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(buffer, "JPEG")
        out.append((f"{i}.jpeg", buffer.getvalue()))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_server_after_the_request_in_flight(sig, tiny_run, tmp_path):
    server = serve_load.Server(tiny_run, tmp_path / "server.log", "--no-explain")
    body = _generated(tmp_path)[0][1]
    request = httpx.Request("POST", server.url + "/predict", files={"file": ("x.jpeg", body)})
    encoded = request.read()
    half = threading.Event()

    def slowly():
        yield encoded[: len(encoded) // 2]
        half.set()
        time.sleep(1.0)  # the signal arrives now, with this request half received
        yield encoded[len(encoded) // 2 :]

    answer = {}

    def send():
        headers = {"content-type": request.headers["content-type"]}
        answer["response"] = httpx.post(
            server.url + "/predict", content=slowly(), headers=headers, timeout=60
        )

    sender = threading.Thread(target=send)
    sender.start()
    assert half.wait(30)
    time.sleep(0.2)
    server.process.send_signal(sig)
    sender.join(60)
    code = server.process.wait(60)
    log = server.log_file.read_text()
    assert answer["response"].status_code == 200, log[-2000:]
    assert answer["response"].json()[0]["name"] == "x.jpeg"
    assert code == 0, log[-2000:]
    assert "served 1 images in 1 device calls" in log
    with pytest.raises(httpx.ConnectError):  # and it no longer listens
        httpx.get(server.url + "/health", timeout=5)
