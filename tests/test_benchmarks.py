"""The benchmark suite: quick runs end to end (subprocesses), and its table logic.

The quick runs check that every framework produced every figure and that the tables carry the
ratio columns; they assert nothing about speed (CI machines vary).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ab_table  # noqa: E402
import profile_step  # noqa: E402
import recall  # noqa: E402
import kaggle_standin  # noqa: E402
import shift_panel  # noqa: E402
import throughput  # noqa: E402


def _run(script: str, *args: str, timeout: float) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def _check_rate(figures: dict) -> None:
    for key in ("first_call_s", "median_s", "min_s", "max_s", "images_per_s", "cores_used"):
        assert figures[key] > 0, key
    lo, hi = figures["images_per_s_range"]
    assert lo <= figures["images_per_s"] <= hi
    assert figures["n"] == throughput.QUICK["steps"]


@pytest.mark.tensorflow
@pytest.mark.slow
def test_throughput_quick_measures_every_framework(tmp_path):
    out = tmp_path / "throughput.json"
    _run("throughput.py", "--quick", "--out", str(out), timeout=480)
    payload = json.loads(out.read_text())
    assert payload["hardware"]["cpu"] and payload["hardware"]["accelerators"]
    assert set(payload["versions"]) == set(throughput.FRAMEWORKS)
    assert [e["number"] for e in payload["configs"]] == throughput.QUICK["configs"]
    peak = payload["peak"]
    assert peak["n"] == throughput.QUICK["peak_size"]
    assert peak["float32_gflops"] > 0 and peak["bfloat16_gflops"] > 0
    for entry in payload["configs"]:
        assert set(entry["results"]) == set(throughput.FRAMEWORKS)
        assert (entry["image_size"], entry["batch_size"]) == (96, 8)  # --quick's, for all
        assert entry["train_flops_per_step"] > 0 and entry["predict_flops_per_step"] > 0
        for phase in ("train", "inference"):
            achieved = entry["achieved_gflops"][phase]
            assert set(achieved) == set(throughput.FRAMEWORKS) and min(achieved.values()) > 0
            assert min(entry["percent_of_float32_peak"][phase].values()) > 0
        for framework, result in entry["results"].items():
            assert "error" not in result, (framework, result)
            for phase in throughput.PHASES:
                _check_rate(result[phase])
            assert result["peak_rss_mb"] > 0 and result["setup_s"] > 0
        for other in ("keras-tf", "keras-jax"):
            assert all(
                entry["ratios"][f"pneumojax/{other}"][phase] > 0 for phase in throughput.PHASES
            )
        # The same model on every side: same trainable set, same outputs from the same weights.
        assert entry["checks"]["trainable_params_equal"]
        assert max(entry["checks"]["logit_diff_vs_pneumojax"].values()) < 1e-3
        # Every framework's Grad-CAM points at the same places (each map over its maximum).
        assert max(entry["checks"]["map_diff_vs_pneumojax"].values()) < 1e-3
    # ... and the maps compared have places to point at (ResNet50V2's conv5_block3_out is 3x3
    # at 96 px; InceptionV3's mixed9 would be one pixel there, its maps flat).
    maps = throughput.normalized_maps(payload["configs"][-1]["results"]["pneumojax"]["probe_maps"])
    assert np.ptp(maps) > 0.5 and np.isfinite(maps).all()
    table = out.with_suffix(".md").read_text()
    for column in (
        "pneumojax / Keras-TF",
        "pneumojax / Keras-JAX",
        "peak RSS MB",
        "first train step s",
        "Grad-CAM",
        "cores used training",
        "px / batch",
        "achieved GFLOP/s training (pneumojax / Keras-TF / Keras-JAX)",
        "% of float32 matmul peak",
        "Matrix-product peak of this machine",
    ):
        assert column in table


@pytest.mark.tensorflow
@pytest.mark.slow
def test_recall_quick_runs_both_frameworks_on_the_same_splits(tmp_path):
    out = tmp_path / "recall.json"
    _run("recall.py", "--quick", "--out", str(out), timeout=360)
    payload = json.loads(out.read_text())
    assert payload["splits_identical"] is True
    assert set(payload["results"]) == set(recall.FRAMEWORKS)
    for framework, result in payload["results"].items():
        assert "error" not in result, (framework, result)
        m = result["metrics"]
        for figure in recall.FIGURES:
            lo, hi = m["ci95"][figure]
            assert lo <= m[figure] <= hi, (framework, figure)
        assert 0 <= m["threshold"] <= 1
        assert result["epochs_run"] == recall.QUICK["epochs"]
        assert result["seconds"]["total"] > 0 and result["seconds"]["first_epoch"] > 0
    assert set(payload["intervals_overlap"]) == set(recall.OVERLAP_FIGURES)
    table = out.with_suffix(".md").read_text()
    assert "95% intervals overlap" in table and "pneumojax" in table and "Keras-TF" in table


def test_config_5_reuses_the_step_of_config_4():
    selected = [throughput.CONFIGS[n] for n in (1, 4, 5, 6)]
    assert throughput.timed_configs(selected) == [1, 4, 6]
    assert throughput.timed_configs([throughput.CONFIGS[5]]) == [4]
    # The payload gives configuration 5 the figures measured for 4, and says so.
    args = throughput.parse_args(["--quick", "--configs", "4", "5"])
    plans = {4: throughput.plan_record(args, throughput.CONFIGS[4])}
    results = {4: {fw: _fake_result(10.0 + i) for i, fw in enumerate(throughput.FRAMEWORKS)}}
    selected = [throughput.CONFIGS[4], throughput.CONFIGS[5]]
    payload = throughput.assemble(args, selected, plans, results, 1.0, [0, 0, 0], {"error": "x"})
    four, five = payload["configs"]
    assert (four["number"], five["number"]) == (4, 5)
    assert five["measured_as"] == five["same_step_as"] == 4 and "reused" in five["note"]
    assert five["results"] == four["results"] and five["ratios"] == four["ratios"]
    assert "note" not in four and four["measured_as"] == 4
    assert "(= config 4's step, not re-measured)" in throughput.render_markdown(payload)


def test_config_7_runs_at_its_recipes_size_unless_the_command_line_sets_one():
    weights = Path("w.npz")
    cfg7, cfg2 = throughput.CONFIGS[7], throughput.CONFIGS[2]
    args = throughput.parse_args([])
    assert 7 in args.configs
    job = throughput.make_job(args, cfg7, throughput.plan_record(args, cfg7), "keras-tf", weights)
    assert (job["image_size"], job["batch_size"]) == (64, 32)  # configs/no_imagenet.toml's
    assert throughput.size_and_batch(args, cfg2) == (256, 32)  # the suite's
    args = throughput.parse_args(["--image-size", "128"])
    job = throughput.make_job(args, cfg7, throughput.plan_record(args, cfg7), "keras-tf", weights)
    assert (job["image_size"], job["batch_size"]) == (128, 32)
    args = throughput.parse_args(["--quick"])  # --quick's small setting for every configuration
    assert throughput.size_and_batch(args, cfg7) == (96, 8)


def test_study_class_weights_follow_the_formula():
    w_normal, w_pneumonia = throughput.study_class_weights()
    total = sum(throughput.STUDY_CLASS_COUNTS)
    assert w_normal == pytest.approx(total / (2 * 1341))
    assert w_pneumonia == pytest.approx(total / (2 * 3875))


def test_intervals_overlap():
    assert recall.intervals_overlap([0.1, 0.5], [0.4, 0.9]) is True
    assert recall.intervals_overlap([0.1, 0.3], [0.4, 0.9]) is False
    assert recall.intervals_overlap([0.1, 0.3], [None, None]) is None


def test_summarize_reports_median_and_spread():
    import common  # noqa: PLC0415

    s = common.summarize([0.5, 1.0, 2.0], batch_size=8)
    assert s["median_s"] == 1.0 and s["images_per_s"] == 8.0
    assert s["images_per_s_range"] == [4.0, 16.0]


def _fake_throughput_payload(results: dict, number: int = 6, peak: dict | None = None) -> dict:
    """A suite's payload around one configuration's results, as ``assemble`` builds it."""
    cfg = throughput.CONFIGS[number]
    size, batch = cfg.image_size or 96, cfg.batch_size or 8
    peak = peak or {"error": "exit status 1"}
    entry = {
        "number": number,
        "label": cfg.label,
        "same_step_as": None,
        "image_size": size,
        "batch_size": batch,
        "trainable_params": 10,
        "results": results,
        "checks": throughput.checks(results, {"trainable_params": 10}),
        "ratios": {
            f"pneumojax/{o}": {
                p: throughput.ratio(results, p, "pneumojax", o) for p in throughput.PHASES
            }
            for o in ("keras-tf", "keras-jax")
        },
        "train_flops_per_step": results["pneumojax"].get("train_flops_per_step"),
        "predict_flops_per_step": results["pneumojax"].get("predict_flops_per_step"),
        **throughput.flop_rates(results, batch, peak),
    }
    return {
        "settings": {
            "frameworks": list(throughput.FRAMEWORKS),
            "batch_size": 8,
            "image_size": 96,
            "steps": 3,
            "warmup": 1,
            "quick": True,
        },
        "hardware": {
            "cpu": "x",
            "cpu_count": 2,
            "usable_cores": 2,
            "memory_gb": 1,
            "load_average": [0, 0, 0],
            "load_average_before": [0, 0, 0],
            "accelerators": ["cpu: cpu"],
        },
        "peak": peak,
        "versions": {},
        "configs": [entry],
        "wall_s": 1.0,
    }


def _fake_result(train_ips: float = 20.0) -> dict:
    def phase(ips, first):
        return {
            "images_per_s": ips,
            "images_per_s_range": [ips - 1, ips + 1],
            "first_call_s": first,
            "cores_used": 1.9,
        }

    return {
        "setup_s": 1.0,
        "peak_rss_mb": 100.0,
        "trainable_params": 10,
        "probe_logits": [[0.25, 0.75]],
        "probe_maps": [[[0.0, 1.0], [0.5, 0.25]]],
        "train": phase(train_ips, 3.0),
        "inference": phase(40.0, 1.0),
        "explain": phase(30.0, 2.0),
    }


def test_throughput_table_marks_failures_and_skips():
    results = {
        "pneumojax": _fake_result(20.0),
        "keras-tf": _fake_result(10.0),
        "keras-jax": {"error": "exit status 1"},
    }
    table = throughput.render_markdown(_fake_throughput_payload(results))
    assert "2.00×" in table  # pneumojax / Keras-TF training: 20 / 10
    assert "failed" in table and "Not measured: config 6 Keras-JAX: exit status 1." in table
    assert "Matrix-product peak: not measured (exit status 1)." in table


def test_throughput_table_gives_each_configs_size_and_the_flops_achieved():
    ours = {
        **_fake_result(16.0),
        "train_flops_per_step": 5e9,  # 5 GFLOP a step of 32 images
        "predict_flops_per_step": 2e9,
    }
    results = {"pneumojax": ours, "keras-tf": _fake_result(8.0), "keras-jax": {"skipped": "x"}}
    peak = {"n": 512, "calls": 10, "warmup": 3, "float32_gflops": 100.0, "bfloat16_gflops": 250.0}
    payload = _fake_throughput_payload(results, number=7, peak=peak)
    entry = payload["configs"][0]
    # 5 GFLOP x 16 img/s / 32 img = 2.5 GFLOP/s; Keras-TF at half the rate, the same work.
    assert entry["achieved_gflops"]["train"] == {"pneumojax": 2.5, "keras-tf": 1.25}
    assert entry["percent_of_float32_peak"]["train"]["pneumojax"] == pytest.approx(2.5)
    assert entry["achieved_gflops"]["inference"]["pneumojax"] == pytest.approx(2.5)  # 2e9*40/32
    table = throughput.render_markdown(payload)
    assert "batch 8, 96×96 px; configuration 7 at 64 px, batch 32" in table  # the title
    assert "| px / batch |" in table and "| 64 / 32 |" in table
    assert "float32 100.0 GFLOP/s, bfloat16 inputs with float32 results 250.0 GFLOP/s" in table
    assert "achieved GFLOP/s training (pneumojax / Keras-TF / Keras-JAX)" in table
    row = next(line for line in table.splitlines() if line.startswith("| 7 | 64 / 32 | 5.00 |"))
    assert "| 2.5 / 1.2 / – | 2.5% / 1.2% / – | 2.00 | 2.5 / 2.5 / – |" in row


HLO = """HloModule m

%fused_fwd (p0: f32[4,8,8,16], p1: f32[3,3,16,32]) -> f32[4,8,8,32] {
  %p0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  ROOT %c = f32[4,8,8,32]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, metadata={op_name="jit(f)/jvp(Classifier)/backbone/backbone._apply/conv2d_7/conv_general_dilated"}
}

%fused_dx (p0: f32[4,8,8,32], p1: f32[3,3,32,16]) -> f32[4,8,8,16] {
  ROOT %c = f32[4,8,8,16]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, metadata={op_name="jit(f)/transpose(jvp(Classifier))/backbone/backbone._apply/conv2d_7/conv_general_dilated"}
}

%fused_dw (p0: f32[16,8,8,4], p1: f32[8,8,4,32]) -> f32[16,3,3,32] {
  ROOT %c = f32[16,3,3,32]{3,2,1,0} convolution(%p0, %p1), window={size=8x8}
}

%fused_add (p0: f32[4,8,8,16], p1: f32[4,8,8,16]) -> f32[4,8,8,16] {
  %p0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %p1 = f32[4,8,8,16]{3,2,1,0} parameter(1)
  ROOT %s = f32[4,8,8,16]{3,2,1,0} add(%p0, %p1)
}

%fused_copy (p0: f32[4,8,8,16]) -> f32[4,16,8,8] {
  %p0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  ROOT %t = f32[4,16,8,8]{3,2,1,0} transpose(%p0), dimensions={0,3,1,2}
}

ENTRY %main (a: f32[4,8,8,16]) -> f32[4,8,8,16] {
  %transpose_copy_fusion = f32[4,16,8,8]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_copy
  %ynn_fusion.1 = f32[4,8,8,32]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_fwd
  %ynn_fusion.2 = f32[4,8,8,16]{3,2,1,0} fusion(%g, %w), kind=kCustom, calls=%fused_dx
  %ynn_fusion.3 = f32[16,3,3,32]{3,2,1,0} fusion(%a, %g), kind=kCustom, calls=%fused_dw
  %reduce_window_max.0 = f32[4,4,4,16]{3,2,1,0} reduce-window(%a, %z), window={size=1x3x3x1 stride=1x2x2x1}, to_apply=%max, metadata={op_name="jit(f)/jvp(Classifier)/backbone/backbone._apply/max_pooling2d/reduce_window_max"}
  ROOT %add_fusion = f32[4,8,8,16]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add
}
"""


def test_profile_attributes_operations_to_kinds_and_layers():
    ops = profile_step.hlo_operations(HLO)
    kinds = {
        name: profile_step.classify(ops[name], batch=4)
        for name in (
            "ynn_fusion.1",
            "ynn_fusion.2",
            "ynn_fusion.3",
            "reduce_window_max.0",
            "add_fusion",
            "transpose_copy_fusion",
        )
    }
    assert kinds == {
        "ynn_fusion.1": ("convolution forward", "conv2d_7"),
        "ynn_fusion.2": ("convolution input gradient", "conv2d_7"),
        "ynn_fusion.3": ("convolution weight gradient", "-"),
        "reduce_window_max.0": ("pooling", "max_pooling2d"),
        "add_fusion": ("elementwise fusions and other", "-"),
        "transpose_copy_fusion": ("layout copies", "-"),
    }


@pytest.mark.slow
def test_profile_step_runs_a_trainable_range(tmp_path):
    out = tmp_path / "profile.json"
    _run(
        "profile_step.py",
        "--config",
        "4",
        "--batch-size",
        "2",
        "--image-size",
        "96",
        "--steps",
        "1",
        "--out",
        str(out),
        timeout=300,
    )
    payload = json.loads(out.read_text())
    kinds = payload["kinds"]
    for kind in (
        "convolution forward",
        "convolution input gradient",
        "convolution weight gradient",
    ):
        assert kinds[kind] > 0, kind  # the trainable range runs backward
    assert payload["op_ms_per_step"] == pytest.approx(sum(kinds.values()), abs=1.0)
    assert payload["top"] and all(r["kind"] in profile_step.KINDS for r in payload["top"])
    assert "kind of operation" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_augment_cost_times_the_augmented_step_beside_the_plain_and_cached_ones(tmp_path):
    out = tmp_path / "augment.json"
    _run(
        "augment_cost.py",
        "--backbone",
        "densenet121",
        "--cut",
        "conv2_block3_concat",
        "--trainable",
        "conv2_block2_0_bn:conv2_block3_0_bn",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--rounds",
        "2",
        "--steps",
        "1",
        "--out",
        str(out),
        timeout=300,
    )
    payload = json.loads(out.read_text())
    assert set(payload["median_s"]) == {"plain", "augmented", "augment alone", "cached"}
    assert len(payload["augmentation_share_of_augmented_step"]["per_round"]) == 2
    assert 0 < payload["augment_alone_over_plain_step"] and payload["cached_over_plain_step"] > 0
    assert "augmentation's share of the augmented step" in out.with_suffix(".md").read_text()


def test_scaling_sweeps_batch_and_size_and_tabulates_ratios(tmp_path, monkeypatch):
    """scaling.py's points, table and plot from throughput.py's results (the suite itself is
    stubbed: its workers are tested above); a failed point shows as a dash, not a ratio."""
    import scaling  # noqa: PLC0415

    assert scaling.points(scaling.FULL) == [
        (8, 256),
        (16, 256),
        (32, 256),
        (64, 256),
        (32, 128),
        (32, 384),
    ]
    calls = []

    def fake_suite(args):
        calls.append((args.batch_size, args.image_size, args.steps))
        ok = {"images_per_s": 10.0 * args.batch_size, "first_call_s": 2.0}
        results = {
            "pneumojax": {"train": ok, "inference": ok, "peak_rss_mb": 900.0},
            "keras-tf": (
                {"error": "boom"}
                if args.image_size == 75
                else {
                    "train": {**ok, "images_per_s": 5.0 * args.batch_size},
                    "inference": ok,
                    "peak_rss_mb": 1200.0,
                }
            ),
        }
        return {"configs": [{"number": 2, "label": "DenseNet121, head only", "results": results}]}

    monkeypatch.setattr(scaling.throughput, "run_suite", fake_suite)
    out = tmp_path / "s.json"
    assert scaling.main(["--quick", "--configs", "2", "--out", str(out)]) == 1  # one failed point
    assert calls == [(2, 96, 1), (4, 96, 1), (4, 75, 1)]
    table = out.with_suffix(".md").read_text()
    assert "| DenseNet121, head only | 2 | 96 | 20.00 / 10.00 | 2.00× |" in table
    assert "| DenseNet121, head only | 4 | 75 | 40.00 / – | – |" in table
    assert out.with_suffix(".png").stat().st_size > 5000


def test_the_kaggle_stand_in_keeps_patients_whole_and_fills_test_first(tmp_path):
    from pneumojax.data.patients import patient_id

    flat = tmp_path / "flat"
    names = {
        "NORMAL": [f"IM-{p:04d}-{i:04d}.jpeg" for p in range(6) for i in range(1, 3)]
        + [f"NORMAL2-IM-{p:04d}-0001.jpeg" for p in range(4)],
        "PNEUMONIA": [f"person{p}_bacteria_{i}.jpeg" for p in range(8) for i in range(2)]
        + [f"person{p}_virus_{p + 50}.jpeg" for p in range(5)],  # persons 0-4 have both kinds
    }
    for cls, files in names.items():
        (flat / cls).mkdir(parents=True)
        for name in files:
            (flat / cls / name).write_bytes(b"x")
    wanted = {"test": {"NORMAL": 4, "PNEUMONIA": 6}, "val": {"NORMAL": 1, "PNEUMONIA": 3}}
    counts = kaggle_standin.build(flat, tmp_path / "kaggle", seed=3, wanted=wanted)
    out = tmp_path / "kaggle"
    where = {}
    for split in ("train", "val", "test"):
        for cls in names:
            files = sorted((out / split / cls).iterdir()) if (out / split / cls).is_dir() else []
            assert len(files) == counts[split][cls]
            for f in files:
                assert f.is_symlink() and f.resolve() == (flat / cls / f.name).resolve()
                assert where.setdefault(patient_id(f.name), split) == split  # one split each
    for split in ("test", "val"):  # filled with whole patients as far as they fit (at most 3)
        assert all(wanted[split][c] - 3 < counts[split][c] <= wanted[split][c] for c in names)
    assert sum(n for by in counts.values() for n in by.values()) == 16 + 21  # every file once
    with pytest.raises(FileExistsError):
        kaggle_standin.build(flat, out)
    assert kaggle_standin.main([str(tmp_path / "nothing"), str(tmp_path / "k2")]) == 2


def test_the_shift_panel_shifts_keep_size_and_do_what_they_say():
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.integers(20, 236, (40, 60), np.uint8)
    im = Image.fromarray(x)
    out = {name: np.asarray(f(im), np.float32) for name, f in shift_panel.SHIFTS.items()}
    assert all(a.shape == x.shape for a in out.values())
    assert np.array_equal(out["none"], x)
    assert out["darker (gamma 1.5)"].mean() < x.mean() < out["brighter (gamma 0.67)"].mean()
    low = out["lower contrast (x0.7)"]
    assert abs(low.std() - 0.7 * x.std()) < 0.5 and abs(low.mean() - x.mean()) < 0.5
    border = out["zoomed out (15% border)"]
    assert border[:5].max() == 0 and border[:, :8].max() == 0 and border[20, 30] > 0


def test_grad_cam_check_compares_where_maps_point_not_their_scale():
    maps = np.random.default_rng(0).random((2, 4, 4))
    base = {"train": {}, "trainable_params": 1, "probe_logits": [[0.0, 1.0]]}
    results = {
        "pneumojax": {**base, "probe_maps": maps.tolist()},
        "keras-tf": {**base, "probe_maps": (3 * maps).tolist()},  # another gradient scale
        "keras-jax": {**base, "probe_maps": maps[:, ::-1].tolist()},  # flipped: elsewhere
    }
    diff = throughput.checks(results, {"trainable_params": 1})["map_diff_vs_pneumojax"]
    assert diff["keras-tf"] < 1e-12
    assert diff["keras-jax"] > 0.1


def test_ab_table_lists_every_run_and_the_ratio_of_group_medians(tmp_path):
    def run(name, rate):
        entry = {"number": 2, "label": "DenseNet121", "same_step_as": None}
        entry["results"] = {"pneumojax": {"train": {"images_per_s": rate}}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"configs": [entry]}))
        return str(path)

    text = ab_table.table(
        [["A", run("a1", 10.0), run("a2", 12.0), run("a3", 30.0)], ["B", run("b1", 15.0)]],
        "train",
        "pneumojax",
    )
    row = text.splitlines()[-1]
    assert "10.00, 12.00, 30.00 → **12.00**" in row  # the median, not the mean (17.33)
    assert row.endswith("| 1.25× |")


def test_pipeline_parity_pairs_external_figures_with_a_t_interval():
    import pipeline_parity  # noqa: PLC0415

    def result(auc, ext_auc):
        metrics = {"auc": auc, "recall": 0.98, "specificity": 0.5, "threshold": 0.4}
        metrics["at_0_5"] = {"recall": 0.9, "specificity": 0.6}
        external = {"auc": ext_auc, "recall": 0.9, "specificity": 0.2}
        return {"metrics": metrics, "external": external, "test_p": [0.1, 0.9]}

    seeds = [
        {
            "seed": i,
            "results": {"pneumojax-antialias": result(0.90, e), "keras-tf": result(0.92, e + d)},
        }
        for i, (e, d) in enumerate([(0.50, 0.01), (0.55, 0.03), (0.48, 0.02)])
    ]
    summary = pipeline_parity.summarize_runs(seeds)
    pair = summary["paired"]["keras-tf - pneumojax-antialias"]["external auc"]
    assert pair["mean"] == pytest.approx(0.02)
    # t(0.975, 2) = 4.303; sd of (0.01, 0.03, 0.02) = 0.01
    half = 4.302652729911275 * 0.01 / np.sqrt(3)
    assert pair["ci95_mean"] == pytest.approx([0.02 - half, 0.02 + half])
    assert summary["per_setting"]["keras-tf"]["external auc"]["values"] == pytest.approx(
        [0.51, 0.58, 0.50]
    )


def test_levers_table_groups_seeds_and_pairs_them_with_the_baseline():
    import levers_table  # noqa: PLC0415

    assert levers_table.lever_of("recipe.s2") == ("recipe", 2)
    assert levers_table.lever_of("eq_strong") == ("eq_strong", None)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.5

    def record(seed, auc_shift):
        p = np.clip(rng.normal(np.where(y, 0.6 + auc_shift, 0.4), 0.2), 0, 1)
        return {
            "seed": seed,
            "external": {"auc": 0.5 + auc_shift, "recall": 0.9, "specificity": 0.3},
            "_paths": [f"{i}.png" for i in range(200)],
            "_y": y,
            "_p": p,
        }

    base = [record(s, 0.0) for s in (0, 1, 2)]
    lever = [record(s, d) for s, d in ((0, 0.05), (1, 0.07), (2, 0.06))]
    v = levers_table.against_baseline(lever, base)
    assert v["seeds"] == 3 and v["auc_delta"] == pytest.approx(0.06)
    assert v["ci95"][0] < 0.06 < v["ci95"][1] and v["ci95"][0] > 0
    one = levers_table.against_baseline([record(5, 0.1)], [record(7, 0.0)])
    assert one["seeds"] == 1 and 0 <= one["delong_p"] <= 1  # different seeds: DeLong, unpaired
    assert levers_table.against_baseline(base, base) is None


def test_levers_table_names_a_study_without_its_report(tmp_path):
    import levers_table  # noqa: PLC0415

    (tmp_path / "half" / "scratch").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no study.json.*--report-only"):
        levers_table.collect([tmp_path / "half"], "nih")


def test_site_statistics_on_two_demo_sites(tmp_path):
    import site_statistics  # noqa: PLC0415

    from pneumojax.data import make_demo_dataset  # noqa: PLC0415

    a = make_demo_dataset(tmp_path / "a", n_per_class=20, image_size=64, seed=1)
    b = make_demo_dataset(tmp_path / "b", n_per_class=10, image_size=48, seed=2)
    r = site_statistics.measure(str(a), str(b), 32)
    assert r["counts"] == {"train": [20, 20], "external": [10, 10]}
    assert len(r["statistics"]) == 10 and set(r["linear"]) == {
        f"{h}, {t}x{t}" for h in site_statistics.NORMALISATIONS for t in site_statistics.THUMBNAILS
    }
    for v in [*r["statistics"].values(), *r["linear"].values()]:
        assert all(0.0 <= x <= 1.0 for x in v.values())
    x = np.arange(16, dtype=float).reshape(1, 4, 4)
    np.testing.assert_array_equal(site_statistics.thumbnails(x, 2) * 255, [[2.5, 4.5, 10.5, 12.5]])


@pytest.mark.tensorflow
@pytest.mark.slow
def test_export_speed_quick_times_every_runtime(tmp_path):
    import export_speed  # noqa: PLC0415

    out = tmp_path / "export-speed.json"
    _run("export_speed.py", "--quick", "--out", str(out), timeout=600)
    payload = json.loads(out.read_text())
    assert payload["hardware"]["cpu"]
    assert set(payload["results"]) == set(export_speed.RUNTIMES)
    for name, result in payload["results"].items():
        assert "error" not in result, (name, result)
        for batch in export_speed.BATCHES:
            assert result["batches"][str(batch)]["images_per_s"] > 0
    for diff in payload["score_max_abs_diff_vs_predict"].values():
        assert diff <= 1e-5  # the same float32 model in every runtime
    assert "vs predict" in out.with_suffix(".md").read_text()
