"""``pneumojax serve`` in process (FastAPI's TestClient): answers equal ``predict``'s for PNG,
JPEG and DICOM, heat-map overlays, the page and the model card, every bad upload a 4xx with a
one-line reason while serving goes on, and the batcher. The real server process (browser,
load, signals) is tested in test_serve_process.py."""

import asyncio
import base64
import io
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pneumojax import data as pj_data  # noqa: E402
from pneumojax.cli import main  # noqa: E402
from pneumojax.inference import predict_paths  # noqa: E402
from pneumojax.serve import ServeOptions, Scorer, create_app  # noqa: E402
from pneumojax.serve.batcher import Batcher  # noqa: E402

from conftest import MINI_DATA  # noqa: E402
from test_dicom import write_dicom  # noqa: E402

LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def scorer(tiny_run):
    s = Scorer(tiny_run, log=lambda m: None)
    s.warm_up()
    return s


@pytest.fixture
def client(scorer):
    with TestClient(create_app(scorer, ServeOptions(max_upload_mb=LIMIT_MB, max_files=4))) as c:
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A PNG (RGB), a JPEG (gray; a real X-ray when the mini set is there) and a DICOM."""
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    Image.fromarray(smooth, "RGB").save(root / "colour.png")
    real = sorted((MINI_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[:1]
    if real:
        with Image.open(real[0]) as im:
            im.convert("L").resize((200, 160)).save(root / "xray.jpeg", quality=90)
    else:
        Image.fromarray(smooth[..., 0], "L").save(root / "xray.jpeg")
    pixels = (np.kron(rng.integers(0, 4096, (8, 8)), np.ones((8, 8)))).astype(np.uint16)
    write_dicom(root / "scan.dcm", pixels, bits_stored=12)
    return [root / "colour.png", root / "xray.jpeg", root / "scan.dcm"]


def _files(paths):
    return [("file", (p.name, p.read_bytes())) for p in paths]


def test_answers_are_predicts_for_png_jpeg_and_dicom_in_order(client, tiny_run, images):
    expected = predict_paths(tiny_run, [str(p) for p in images], log=lambda m: None)
    response = client.post("/predict", files=_files(images[::-1]))
    assert response.status_code == 200, response.text
    rows = response.json()
    assert [r["name"] for r in rows] == [p.name for p in images[::-1]]
    for row, want in zip(rows, expected[::-1]):
        assert set(row) == {"name", "p_pneumonia", "label", "threshold", "threshold_source"}
        assert row["p_pneumonia"] == want["p_pneumonia"]  # bit for bit
        assert (row["label"], row["threshold"]) == (want["label"], want["threshold"])
        assert row["threshold_source"] == "validation"


def test_explain_returns_an_overlay_png_of_the_image(client, images):
    response = client.post("/predict?explain=1", files=_files(images[1:2]))
    assert response.status_code == 200, response.text
    (row,) = response.json()
    assert row["heat_map"].startswith("Grad-CAM at ")
    with Image.open(io.BytesIO(base64.b64decode(row["overlay_png"]))) as overlay:
        assert overlay.format == "PNG" and overlay.size == (200, 160)


def test_health_model_card_and_the_page_need_nothing_from_outside(client, scorer):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["batch_sizes"] == [8]
    card = client.get("/model").json()  # pneumojax.modelcard's card of the run
    assert card["model"]["backbone"] == "densenet121" and card["limits"]
    assert card["threshold"]["value"] == scorer.run.thresholds[0]
    assert card["training_data"]["summary"] and card["evaluations"][0]["auc_ci"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text  # no CDN
    assert "https://" not in page.text and "http://" not in page.text


def _bad_uploads(tmp_path):
    good = io.BytesIO()
    Image.new("L", (40, 30), 128).save(good, "PNG")
    truncated = good.getvalue()[: len(good.getvalue()) // 2]
    big = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(big, "PNG")
    assert big.tell() > LIMIT_MB * 2**20
    report = tmp_path / "report.dcm"  # a DICOM object with no image: a structured report
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(report, enforce_file_format=True)
    one = lambda name, body: {"files": [("file", (name, body))]}  # noqa: E731
    return good.getvalue(), [
        ("not an image", one("notes.png", b"hello, not a picture"), 422, "not an image"),
        ("truncated PNG", one("cut.png", truncated), 422, "corrupt or truncated"),
        ("DICOM, no pixels", one("sr.dcm", report.read_bytes()), 422, "without pixel data"),
        ("empty file", one("empty.jpeg", b""), 422, "empty file"),
        ("over the limit", one("big.png", big.getvalue()), 413, "over the server's limit"),
        ("empty body", {"headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, ""),
        ("no file field", {"data": {"name": "x"}, "files": [("other", ("a", b"1"))]}, 400, "no"),
        ("text, not a file", {"data": {"file": "x"}, "files": [("o", ("a", b"1"))]}, 400, "text"),
        ("JSON", {"json": {"file": "x.png"}}, 415, "multipart/form-data"),
        ("raw bytes", {"content": good.getvalue()}, 415, "no content type"),
        ("five files", {"files": [("file", ("a.png", good.getvalue()))] * 5}, 400, "Too many"),
    ]


def test_bad_uploads_get_a_4xx_with_one_line_and_serving_goes_on(client, tmp_path):
    good, cases = _bad_uploads(tmp_path)
    for what, request, status, reason in cases:
        response = client.post("/predict", **request)
        detail = response.json()["detail"]
        assert response.status_code == status, (what, response.text)
        assert isinstance(detail, str) and "\n" not in detail and reason in detail, (what, detail)
        again = client.post("/predict", files=[("file", ("ok.png", good))])
        assert again.status_code == 200, (what, again.text)


def test_an_image_over_the_pixel_limit_is_refused(client, monkeypatch):
    monkeypatch.setattr(pj_data, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 0).save(buffer, "PNG")
    response = client.post("/predict", files=[("file", ("wide.png", buffer.getvalue()))])
    assert response.status_code == 422
    assert response.json()["detail"].startswith("wide.png: too large: 40 x 30 = 1,200 pixels")


def test_batch_sizes_pad_to_the_smallest_that_holds_a_batch():
    fake = types.SimpleNamespace(batch_sizes=(1, 4, 8))
    assert [Scorer.bucket(fake, n) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, 8]


def test_batcher_shares_calls_among_concurrent_items_and_finishes_on_stop():
    calls = []

    def double(items):
        calls.append(len(items))
        return [2 * i for i in items]

    async def scenario():
        batcher = Batcher(double, max_batch=4, window_s=0.05)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        late = asyncio.ensure_future(batcher.submit(99))
        await asyncio.sleep(0)  # queued before the stop mark
        await batcher.stop()
        return results, await late

    results, late = asyncio.run(scenario())
    assert results == [2 * i for i in range(10)] and late == 198
    assert calls == [4, 4, 2, 1]


def test_a_failing_batch_reaches_its_callers_and_the_batcher_goes_on():
    def fussy(items):
        if -1 in items:
            raise RuntimeError("device fault")
        return items

    async def scenario():
        batcher = Batcher(fussy, max_batch=8, window_s=0)
        await batcher.start()
        with pytest.raises(RuntimeError, match="device fault"):
            await batcher.submit(-1)
        ok = await batcher.submit(5)
        await batcher.stop()
        return ok

    assert asyncio.run(scenario()) == 5


def test_serve_without_fastapi_says_what_to_install(monkeypatch, tiny_run):
    for name in [m for m in sys.modules if m.startswith("pneumojax.serve")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    result = CliRunner().invoke(main, ["serve", "--run", str(tiny_run)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: pneumojax serve needs fastapi: pip install 'pneumojax[serve]'"
    )
