#!/usr/bin/env python
"""Levers measured on the carve and on images from elsewhere, side by side, from study folders.

Reads the ``study.json`` of one or more ``pneumojax study`` folders whose study names an
external set (``[[external]]``), groups their experiments into levers (``NAME`` or
``NAME.sSEED``: seeds of one lever), and writes one table: per lever the seeds, the carve's AUC
and specificity at the validation threshold, the external set's AUC, specificity (recall) at
the validation threshold, ECE, the AUC after ``pneumojax adapt``, and the external AUC against
a baseline lever: DeLong's test on the same images for one seed, the paired difference over
seeds (same seed, same splits) with its 95% t-interval for several.

Usage: ``python benchmarks/levers_table.py STUDY_DIR... --external nih --baseline scratch
--out benchmarks/results/cross-site-levers-cpu.json`` (the markdown goes beside it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

_SEEDED = re.compile(r"^(?P<lever>.+?)\.s(?P<seed>\d+)$")


def lever_of(name: str) -> tuple[str, int | None]:
    """``recipe.s2`` -> ("recipe", 2); ``recipe`` -> ("recipe", None)."""
    m = _SEEDED.match(name)
    return (m["lever"], int(m["seed"])) if m else (name, None)


def collect(studies: list[Path], external: str) -> dict[str, list[dict]]:
    """Per lever, one record per seed: the carve's figures and the external set's, with the
    external probabilities (for paired tests)."""
    from pneumojax.predictions import read_predictions  # noqa: PLC0415

    levers: dict[str, list[dict]] = defaultdict(list)
    for study in studies:
        if not (study / "study.json").is_file():
            raise SystemExit(
                f"{study}: no study.json (a study stopped before its report?); remake it with "
                "`pneumojax study FILE --data DATA --out FOLDER --report-only` (add --only to "
                "leave out unfinished experiments)"
            )
        report = json.loads((study / "study.json").read_text())
        section = next((s for s in report.get("external", []) if s["name"] == external), None)
        if section is None:
            raise SystemExit(f"{study}: its report has no external set {external!r}")
        entries = {e["name"]: e for e in section["entries"]}
        for row in report["rows"]:
            name = row["name"]
            if name not in entries:
                continue
            config = json.loads((study / name / "config.json").read_text())
            paths, y, p = read_predictions(study / name / f"eval-{external}" / "predictions.csv")
            temperature = temperature_effect(study / name, y, p.mean(1))
            lever, seed = lever_of(name)
            adapted = entries.get(f"{name} (adapted)")
            levers[lever].append(
                {
                    "study": str(study),
                    "name": name,
                    "seed": config["seed"] if seed is None else seed,
                    "epochs": config["epochs"],
                    "image_size": config["image_size"],
                    "description": row.get("description", ""),
                    "command": row["command"],
                    "carve": {k: row["test"][k] for k in ("auc", "recall", "specificity")},
                    "carve_ece": row["calibration"]["ece"],
                    "external": {
                        k: entries[name]["metrics"][k] for k in ("auc", "recall", "specificity")
                    },
                    "external_auc_ci95": entries[name]["metrics"]["ci95"]["auc"],
                    "external_ece": entries[name]["calibration"]["ece"],
                    "oracle_specificity": (entries[name]["oracle"] or {}).get("specificity"),
                    "adapted_auc": adapted["metrics"]["auc"] if adapted else None,
                    **temperature,
                    "adapted_specificity": adapted["metrics"]["specificity"] if adapted else None,
                    "wall_s": row["wall_s"],
                    "_paths": [Path(x).name for x in paths],
                    "_y": y,
                    "_p": p.mean(1),
                }
            )
    return levers


def temperature_effect(run: Path, y_external, p_external) -> dict:
    """What ``--calibrate temperature`` would have done, after the fact: T fitted on the run's
    validation probabilities, applied to its test and external ones (a monotone map: AUC and
    ranking unchanged), and the ECE there."""
    from pneumojax.calibration import fit_temperature  # noqa: PLC0415
    from pneumojax.predictions import read_predictions  # noqa: PLC0415
    from pneumojax.stats import expected_calibration_error  # noqa: PLC0415

    def logit(p):
        p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    _, y_val, p_val = read_predictions(run / "predictions" / "val.csv")
    _, y_test, p_test = read_predictions(run / "predictions" / "test.csv")
    t = fit_temperature(logit(p_val.mean(1)), y_val)

    def scaled(p):
        return 1 / (1 + np.exp(-logit(p) / t))

    return {
        "temperature": t,
        "carve_ece_temperature": expected_calibration_error(y_test, scaled(p_test.mean(1))),
        "external_ece_temperature": expected_calibration_error(y_external, scaled(p_external)),
    }


def t_interval(values) -> list[float] | None:
    from scipy import stats  # noqa: PLC0415

    v = np.asarray(values, float)
    if v.size < 2:
        return None
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


def against_baseline(records: list[dict], baseline: list[dict]) -> dict | None:
    """The external AUC against the baseline's: DeLong for one seed each, the paired
    difference over the seeds both have otherwise."""
    from pneumojax.stats import delong_auc_test  # noqa: PLC0415

    if records is baseline or not baseline:
        return None
    by_seed = {r["seed"]: r for r in baseline}
    pairs = [(r, by_seed[r["seed"]]) for r in records if r["seed"] in by_seed]
    if len(pairs) >= 2:
        d = [a["external"]["auc"] - b["external"]["auc"] for a, b in pairs]
        return {"seeds": len(pairs), "auc_delta": float(np.mean(d)), "ci95": t_interval(d)}
    a, b = records[0], baseline[0]
    if a["_paths"] != b["_paths"]:
        return None
    test = delong_auc_test(a["_y"], a["_p"], b["_p"])
    return {
        "seeds": 1,
        "auc_delta": test["auc_delta"],
        "ci95": test["auc_delta_ci95"],
        "delong_p": test["p"],
    }


def summarize(levers: dict[str, list[dict]], baseline: str) -> list[dict]:
    base = levers.get(baseline, [])
    out = []
    for lever, records in levers.items():
        records = sorted(records, key=lambda r: r["seed"])

        def spread(get, rs=records):
            v = [get(r) for r in rs if get(r) is not None]
            return None if not v else {"mean": float(np.mean(v)), "sd": _sd(v), "n": len(v)}

        out.append(
            {
                "lever": lever,
                "seeds": [r["seed"] for r in records],
                "epochs": records[0]["epochs"],
                "image_size": records[0]["image_size"],
                "command": records[0]["command"],
                "carve_auc": spread(lambda r: r["carve"]["auc"]),
                "carve_specificity": spread(lambda r: r["carve"]["specificity"]),
                "carve_ece": spread(lambda r: r["carve_ece"]),
                "external_auc": spread(lambda r: r["external"]["auc"]),
                "external_auc_ci95": records[0]["external_auc_ci95"] if len(records) == 1 else None,
                "external_specificity": spread(lambda r: r["external"]["specificity"]),
                "external_recall": spread(lambda r: r["external"]["recall"]),
                "external_ece": spread(lambda r: r["external_ece"]),
                "temperature": spread(lambda r: r["temperature"]),
                "carve_ece_temperature": spread(lambda r: r["carve_ece_temperature"]),
                "external_ece_temperature": spread(lambda r: r["external_ece_temperature"]),
                "oracle_specificity": spread(lambda r: r["oracle_specificity"]),
                "adapted_auc": spread(lambda r: r["adapted_auc"]),
                "vs_baseline": None if lever == baseline else against_baseline(records, base),
                "wall_min": spread(lambda r: r["wall_s"] / 60 if r["wall_s"] else None),
                "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records],
            }
        )
    return out


def _sd(v) -> float | None:
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def _ms(x: dict | None) -> str:
    if x is None:
        return "–"
    return f"{x['mean']:.3f}" + (f" ± {x['sd']:.3f}" if x["sd"] is not None else "")


def _vs(v: dict | None) -> str:
    if v is None:
        return "(baseline)"
    ci = v["ci95"]
    text = f"{v['auc_delta']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{v['auc_delta']:+.3f}"
    if "delong_p" in v:
        p = v["delong_p"]
        text += f" (DeLong p {'< 0.001' if p < 0.001 else f'{p:.3f}'})"
    else:
        text += f" ({v['seeds']} paired seeds)"
    return text


def render(summary: list[dict], external: str, baseline: str, hardware: dict, title: str) -> str:
    header = [
        "lever",
        "seeds",
        "epochs, px",
        "carve AUC",
        "carve specificity",
        "carve ECE",
        f"{external} AUC",
        f"{external} specificity (recall) at the validation threshold",
        f"{external} ECE",
        "temperature T (validation): carve / " + f"{external} ECE after it",
        f"{external} oracle specificity",
        f"{external} AUC adapted (no labels)",
        f"{external} AUC vs {baseline}",
        "wall min / run",
    ]
    rows = []
    for s in summary:
        auc = _ms(s["external_auc"])
        if s["external_auc_ci95"]:
            lo, hi = s["external_auc_ci95"]
            auc += f" [{lo:.3f}, {hi:.3f}]"
        rows.append(
            [
                s["lever"],
                str(len(s["seeds"])),
                f"{s['epochs']}, {s['image_size']}",
                _ms(s["carve_auc"]),
                _ms(s["carve_specificity"]),
                _ms(s["carve_ece"]),
                auc,
                f"{_ms(s['external_specificity'])} ({_ms(s['external_recall'])})",
                _ms(s["external_ece"]),
                f"{_ms(s['temperature'])}: {_ms(s['carve_ece_temperature'])} / "
                f"{_ms(s['external_ece_temperature'])}",
                _ms(s["oracle_specificity"]),
                _ms(s["adapted_auc"]),
                _vs(s["vs_baseline"]),
                _ms(s["wall_min"]),
            ]
        )
    lines = [
        f"## {title}",
        "",
        f"CPU: {hardware['cpu']} ({hardware['usable_cores']} usable cores). Mean ± sd over "
        f"seeds; one seed: the AUC's 95% bootstrap interval, and DeLong's test against "
        f"{baseline} on the same {external} images. Oracle specificity: at the threshold the "
        f"{external} labels would choose for the run's target recall (not available in "
        "practice). Adapted: `pneumojax adapt` (BatchNorm statistics, class prior and threshold "
        f"from the {external} images, never their labels).",
        "",
        common.markdown_table(header, rows),
        "",
        "Commands (one seed shown):",
        "",
    ]
    lines += [f"- {s['lever']}: `{s['command']}`" for s in summary]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", type=Path)
    p.add_argument("--external", default="nih")
    p.add_argument("--baseline", required=True, help="the lever the others are compared with")
    p.add_argument("--title", default="Levers on the carve and on images from elsewhere")
    p.add_argument("--out", type=Path, required=True, help="JSON (markdown beside it)")
    args = p.parse_args(argv)
    levers = collect(args.studies, args.external)
    if args.baseline not in levers:
        p.error(f"--baseline {args.baseline}: no such lever ({', '.join(levers)})")
    summary = summarize(levers, args.baseline)
    hardware = common.hardware()
    payload = {
        "benchmark": "levers_table",
        "external": args.external,
        "baseline": args.baseline,
        "studies": [str(s) for s in args.studies],
        "hardware": hardware,
        "levers": summary,
    }
    markdown = render(summary, args.external, args.baseline, hardware, args.title)
    md = common.write_outputs(args.out, payload, markdown)
    print(markdown)
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
