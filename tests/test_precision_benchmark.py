"""benchmarks/precision.py on a tiny generated folder: every measurement runs and the JSON and
markdown it writes are well-formed. Its figures mean nothing at this size."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import precision  # noqa: E402

from pneumojax.data import make_demo_dataset  # noqa: E402


def test_precision_benchmark_writes_every_figure(tmp_path):
    data = make_demo_dataset(tmp_path / "xray", n_per_class=20, image_size=48)
    out = tmp_path / "precision.json"
    cut = "conv2_block3_concat"  # a shallow cut keeps the compiles short
    assert (
        precision.main(
            [
                "--data",
                str(data),
                "--image-size",
                "32",
                "--cut",
                cut,
                "--activation-backbones",
                "densenet121",
                "--activation-cut",
                cut,
                "--activation-images",
                "4",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--in-process",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())

    act = payload["activations"]["densenet121"]
    assert act["cut"] == cut and act["n_images"] == 4
    for key in ("layers", "layers_random_stats"):
        assert set(act[key]) == {cut, act["final"]}
        for stats in act[key].values():
            assert 0 < stats["rel_max"] < 0.1 and 0 < stats["rel_mean"] < 0.1
            assert stats["per_image_rel_max"]["median"] <= stats["per_image_rel_max"]["max"]

    assert list(payload["runs"]) == list(precision.VARIANTS)
    for variant, run in payload["runs"].items():
        assert "error" not in run, (variant, run)
        m = run["metrics"]
        for figure in precision.FIGURES:
            lo, hi = m["ci95"][figure]
            assert lo <= m[figure] <= hi, (variant, figure)
        assert len(run["test_p"]) == m["n"] and run["epochs_run"] == 2
        assert run["seconds"]["total"] > 0
    assert payload["runs"]["bfloat16-uncached"]["feature_cache"] is None
    assert payload["runs"]["float32-bf16-cache"]["feature_cache"] == "bfloat16"
    assert payload["runs"]["float32-bf16-cache"]["precision"] == "float32"

    vs = payload["comparison"]["vs_float32"]
    assert set(vs) == set(precision.VARIANTS) - {precision.REFERENCE}
    assert all(set(v["inside_float32_ci95"]) == set(precision.INSIDE_FIGURES) for v in vs.values())
    assert payload["comparison"]["cache_pair"]["runs"] == list(precision.CACHE_PAIR)
    assert all(v in (True, False) for k, v in payload["claims"].items() if k != "max_rel_max")

    table = out.with_suffix(".md").read_text()
    for text in (
        "## Precision",
        "Command: `",
        "Machine: ",
        "max abs Δ / max abs f32",
        "inside float32's interval",
        "Wall time (s)",
        "The README's claims",
    ):
        assert text in table, text


def test_inside_and_probability_shift():
    assert precision.inside(0.5, [0.4, 0.6]) is True
    assert precision.inside(0.7, [0.4, 0.6]) is False
    assert precision.inside(0.5, [None, None]) is None
    shift = precision.probability_shift([0.1, 0.5], [0.1, 0.75])
    assert shift == {"max_abs": 0.25, "mean_abs": 0.125}
