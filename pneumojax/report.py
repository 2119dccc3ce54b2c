"""A study's report as files: ``study.json`` (every figure), ``study.md`` (tables) and
``study.html`` (one self-contained page: tables, all ROC curves on one plot, reliability
diagrams, each experiment's confusion matrix and loss/accuracy curves; images embedded)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from pneumojax.io import write_text_atomic
from pneumojax.plots import _new_figure, _save
from pneumojax.study import FIGURES, REPORTED, public


def write_study_files(report: dict, out: Path) -> list[Path]:
    """Writes study.json, study.md, study.html (and the plots they show) into ``out``."""
    out = Path(out)
    plots = out / "study-plots"
    rows = report["rows"]
    roc = rel = None
    if rows:
        curves = [(r["name"], r["_test"]["y"], r["_test"]["p"], r["test"]["auc"]) for r in rows]
        roc = plot_roc_overlay(curves, plots / "roc.png")
        rel = plot_reliability(
            [(r["name"], r["calibration"]) for r in rows], plots / "reliability.png"
        )
    external_plots = {s["name"]: _external_plots(s, plots) for s in report.get("external", [])}
    paths = [out / "study.json", out / "study.md", out / "study.html"]
    write_text_atomic(paths[0], json.dumps(public(report), indent=1, default=_json_default) + "\n")
    write_text_atomic(paths[1], markdown(report, external_plots))
    write_text_atomic(paths[2], html_page(report, roc, rel, external_plots))
    return paths


def _external_plots(section: dict, plots: Path) -> list[Path]:
    """One external set's ROC curves and reliability diagrams (none for a one-class set)."""
    entries = [e for e in section["entries"] if e["metrics"]["auc"] is not None]
    if not entries:
        return []
    title = f"{section['name']} (every image)"
    return [
        plot_roc_overlay(
            [(e["name"], e["_y"], e["_p"], e["metrics"]["auc"]) for e in entries],
            plots / f"roc-{section['name']}.png",
            title=f"ROC on {title}",
        ),
        plot_reliability(
            [(e["name"], e["calibration"]) for e in entries],
            plots / f"reliability-{section['name']}.png",
            title=f"Reliability on {section['name']}",
        ),
    ]


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _ci(value, ci) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _p(p) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows), shared by the markdown and the page."""
    rows = report["rows"]
    point_names = sorted({k for r in rows for k in r["operating_points"]})
    out = [] if report.get("target") is None else [target_table(report)]
    out += [
        (
            "Test figures at the validation-chosen threshold (95% bootstrap intervals)",
            [
                "experiment",
                "trainable params",
                "threshold",
                *FIGURES,
                "study's accuracy / recall / precision",
                "wall s",
            ],
            [_main_row(r) for r in rows],
        ),
        (
            "The same models at a fixed 0.5 threshold",
            ["experiment", *FIGURES],
            [[r["name"]] + [_ci(r["test"]["at_0_5"].get(f), None) for f in FIGURES] for r in rows],
        ),
        (
            "Operating points (threshold chosen on validation, read on test)",
            ["experiment", *[k.replace("_", " ") for k in point_names]],
            [
                [r["name"]] + [_operating_point(r["operating_points"].get(k)) for k in point_names]
                for r in rows
            ],
        ),
        (
            f"Against the reference ({report['reference']}) on the same test images",
            [
                "experiment",
                "AUC difference [95% CI]",
                "DeLong p",
                "McNemar p",
                "discordant (only this / only reference right)",
            ],
            [_paired_row(r) for r in rows],
        ),
        (
            "Calibration on test",
            ["experiment", "Brier score", "ECE (10 bins)"],
            [
                [r["name"], f"{r['calibration']['brier']:.4f}", f"{r['calibration']['ece']:.4f}"]
                for r in rows
            ],
        ),
    ]
    return out


def _main_row(r: dict) -> list[str]:
    """One experiment's test figures, with the study's parameter count and figures beside."""
    m, rep = r["test"], r["seed_reported"]
    trainable = f"{r['trainable_params']:,}"
    if "trainable_params" in rep:
        flag = " (differs)" if r["trainable_params_differ"] else ""
        trainable += f" (study {rep['trainable_params']:,}{flag})"
    threshold = "vote" if len(m["member_thresholds"]) > 1 else f"{m['threshold']:.3f}"
    return (
        [r["name"], trainable, threshold]
        + [_ci(m[f], m["ci95"].get(f)) for f in FIGURES]
        + [
            " / ".join(f"{rep[k]:.2f}" if k in rep else "–" for k in REPORTED),
            "–" if r["wall_s"] is None else f"{r['wall_s']:.0f}",
        ]
    )


def _paired_row(r: dict) -> list[str]:
    """One experiment against the reference: AUC difference, DeLong and McNemar."""
    v = r["vs_reference"]
    if v is None:
        return [r["name"], "(reference)", "–", "–", "–"]
    if "error" in v:
        return [r["name"], v["error"], "–", "–", "–"]
    return [
        r["name"],
        _ci(v["auc_delta"], v["auc_delta_ci95"]),
        _p(v["delong_p"]),
        _p(v["mcnemar_p"]),
        "/".join(map(str, v["mcnemar_discordant"])),
    ]


EXTERNAL_NOTE = (
    "Every image of each set scored at the run's own validation threshold (chosen on the "
    "carve, never on these images). The oracle column chooses the threshold with the set's "
    "labels, for the run's target recall: what the threshold would have had to be, not "
    "available in practice. Adapted rows (pneumojax adapt) used the set's images, never its "
    "labels. A carve of the training folder shares its site, patients and preparation: only "
    "these figures say how a model holds up elsewhere."
)


def external_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The "Images from elsewhere" tables: the carve and each set side by side, then one
    table per set (figures at the validation threshold, calibration, DeLong against the
    reference, the oracle threshold)."""
    sets = report.get("external") or []
    if not sets:
        return []
    return [_side_by_side(report, sets)] + [_external_set_table(report, s) for s in sets]


def _side_by_side(report: dict, sets: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    """Each experiment's AUC and specificity (recall) on the carve and on every set."""
    header = ["experiment", "carve AUC [95% CI]", "carve specificity (recall)"]
    for s in sets:
        header += [f"{s['name']} AUC [95% CI]", f"{s['name']} specificity (recall)"]
    by_set = [{e["name"]: e for e in s["entries"]} for s in sets]
    names = [r["name"] for r in report["rows"]]
    names += [n for s in sets for n in (e["name"] for e in s["entries"]) if n not in names]
    test = {r["name"]: r["test"] for r in report["rows"]}
    side = []
    for name in names:
        m = test.get(name)
        cells = [name, _ci(m["auc"], m["ci95"].get("auc")) if m else "–", _spec_recall(m)]
        for entries in by_set:
            e = entries.get(name)
            cells += [_ci(e["metrics"]["auc"], e["metrics"]["ci95"].get("auc")) if e else "–"]
            cells += [_spec_recall(e["metrics"]) if e else "–"]
        side.append(cells)
    return "Images from elsewhere: the carve and each external set side by side", header, side


def _external_set_table(report: dict, s: dict) -> tuple[str, list[str], list[list[str]]]:
    """One external set's table: a row per scored entry, then what could not be scored."""
    rows = [_external_row(report, e) for e in s["entries"]]
    rows += [[f"not scored: {err}"] + ["–"] * 9 for err in s["errors"]]
    if not s["found"]:
        rows.append([f"not scored: no folder {s['path']}"] + ["–"] * 9)
    title = f"Images from elsewhere: {s['name']}" + (
        f" ({s['description']})" if s["description"] else ""
    )
    header = [
        "experiment",
        "NORMAL / PNEUMONIA",
        "AUC [95% CI]",
        "recall",
        "specificity",
        "threshold (validation)",
        "ECE",
        "Brier",
        f"AUC vs {report['reference']} (DeLong)",
        "oracle threshold (uses these labels)",
    ]
    return title, header, rows


def _external_row(report: dict, e: dict) -> list[str]:
    m, v, o = e["metrics"], e["vs_reference"], e["oracle"]
    return [
        e["name"],
        f"{e['counts'][0]} / {e['counts'][1]}",
        _ci(m["auc"], m["ci95"].get("auc")),
        _ci(m["recall"], m["ci95"].get("recall")) if e["counts"][1] else "–",
        _ci(m["specificity"], m["ci95"].get("specificity")) if e["counts"][0] else "–",
        f"{m['threshold']:.3f}" if len(m["member_thresholds"]) == 1 else "vote",
        f"{e['calibration']['ece']:.3f}",
        f"{e['calibration']['brier']:.3f}",
        "(reference)"
        if v is None and e["experiment"] == report["reference"] and not e["adapted"]
        else "–"
        if v is None
        else f"{_ci(v['auc_delta'], v['auc_delta_ci95'])} (p {_p(v['delong_p'])})",
        "–"
        if o is None
        else f"t={o['threshold']:.3f}: specificity "
        f"{o['specificity']:.3f} (recall {o['recall']:.3f})",
    ]


def external_summary_lines(report: dict) -> list[str]:
    """One line per experiment and external set, for the study command's last lines."""
    lines = []
    for s in report.get("external") or []:
        if s["entries"]:
            lines.append(
                f"images from elsewhere, {s['name']} (at each run's validation threshold):"
            )
        for e in s["entries"]:
            m = e["metrics"]
            auc = "" if m["auc"] is None else f"AUC {_ci(m['auc'], m['ci95'].get('auc'))}, "
            lines.append(f"  {e['name']}: {auc}specificity (recall) {_spec_recall(m)}")
    return lines


def _spec_recall(m) -> str:
    if not m:
        return "–"
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    spec = f"{m['specificity']:.3f}" if tn + fp else "–"
    recall = f"{m['recall']:.3f}" if fn + tp else "–"
    return f"{spec} ({recall})"


def target_table(report: dict) -> tuple[str, list[str], list[list[str]]]:
    """The study file's [target], line by line: what it asks, what the run folders say."""
    target = report["target"]
    rows = []
    for line in target["lines"]:
        if line["key"] == "minutes":
            wanted = f"at most {line['target']:g} min (all experiments)"
            value = "–" if line["value"] is None else f"{line['value']:.1f} min"
        else:
            wanted = f"at least {line['target']:g}"
            value = _ci(line["value"], line["ci95"])
        rows.append([line["key"], wanted, value, verdict_word(line["met"])])
    title = f"Target: {verdict_word(target['met'])} (reference {report['reference']} on test)"
    return title, ["figure", "target", "value [95% CI]", "verdict"], rows


def verdict_word(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not known yet"}[met]


def _operating_point(point) -> str:
    """The figure read on test at the validation threshold (and the other one), e.g.
    ``sensitivity 0.91 [0.88, 0.94]; specificity 0.80 [..] (t=0.512)``."""
    if not point:
        return "–"
    test, ci = point["test"], point.get("ci95", {})
    shown = [f"{k} {_ci(test[k], ci.get(k))}" for k in ("sensitivity", "specificity")]
    return "; ".join(shown) + f" (t={point['threshold']:.3f})"


def _markdown_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def markdown(report: dict, external_plots: dict | None = None) -> str:
    lines = [f"# Study report: {len(report['rows'])} experiments", ""]
    if report["missing"]:
        lines += [f"Not finished (no figures): {', '.join(report['missing'])}.", ""]
    for table in tables(report):
        lines += _markdown_table(*table)
    extra = external_tables(report)
    if extra:
        lines += [EXTERNAL_NOTE, ""]
    for table in extra:
        lines += _markdown_table(*table)
    for name, plots in (external_plots or {}).items():
        lines += [f"![{p.stem}](study-plots/{p.name})" for p in plots] + [""] if plots else []
    lines += [
        "The study's trainable-parameter counts are at 256 px: the head's first Dense layer "
        "grows with the input size, so other sizes differ by design (flagged).",
        "",
    ]
    lines += ["## Commands that reproduce each experiment", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in report["rows"]] + [""]
    return "\n".join(lines)


def _img(path: Path | None, alt: str, width: int | None = None) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{size}>'


def html_page(
    report: dict, roc: Path | None, reliability: Path | None, external_plots: dict | None = None
) -> str:
    parts = [f"<h1>Study report: {len(report['rows'])} experiments</h1>"]
    if report["missing"]:
        parts.append(f"<p>Not finished: {html.escape(', '.join(report['missing']))}</p>")
    main, extra = tables(report), external_tables(report)
    for i, (title, header, rows) in enumerate(main + extra):
        if extra and i == len(main):
            parts.append(f"<h2>Images from elsewhere</h2><p>{html.escape(EXTERNAL_NOTE)}</p>")
        parts.append(
            f"<h2>{html.escape(title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in rows
            )
            + "</table>"
        )
    for name, plots in (external_plots or {}).items():
        if plots:
            parts.append(
                f"<h2>ROC curves and calibration on {html.escape(name)}</h2><div class='row'>"
                + "".join(_img(p, p.stem, 520) for p in plots)
                + "</div>"
            )
    parts.append(
        "<h2>ROC curves and calibration on test</h2><div class='row'>"
        + _img(roc, "ROC curves", 520)
        + _img(reliability, "reliability", 520)
        + "</div>"
    )
    parts.append("<h2>Each experiment</h2>")
    for r in report["rows"]:
        plots = Path(r["_dir"]) / "plots"
        parts.append(
            f"<h3>{html.escape(r['name'])}</h3><p><code>{html.escape(r['command'])}"
            f"</code></p><div class='row'>"
            + _img(plots / "confusion_matrix.png", f"{r['name']} confusion matrix", 300)
            + _img(plots / "history.png", f"{r['name']} loss and accuracy", 600)
            + "</div>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:"
        "collapse;font-size:13px;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px"
        " 6px;text-align:left}th{background:#f0f0f0}.row{display:flex;flex-wrap:wrap;"
        "gap:12px;align-items:flex-start}code{font-size:12px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pneumojax study</title>"
        f"<style>{style}</style></head><body>" + "".join(parts) + "</body></html>\n"
    )


def plot_roc_overlay(curves: list[tuple], path, title: str = "ROC on test") -> Path:
    """ROC curves on one plot; ``curves``: (label, y, p, auc) per experiment."""
    fig, ax = _new_figure(6, 6)
    for label, y, p, auc in curves:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {auc:.3f})")
    _finish_square(
        ax,
        "false positive rate (1 - specificity)",
        "true positive rate (recall)",
        f"{title}, PNEUMONIA positive",
        "lower right",
    )
    return _save(fig, path)


def plot_reliability(curves: list[tuple], path, title: str = "Reliability on test") -> Path:
    """Reliability diagrams: observed PNEUMONIA frequency against mean predicted probability;
    ``curves``: (label, calibration) per experiment (``calibration``: brier, ece, reliability)."""
    fig, ax = _new_figure(6, 6)
    for label, calibration in curves:
        curve = calibration["reliability"]
        keep = [i for i, c in enumerate(curve["count"]) if c > 0]
        pred = [curve["mean_predicted"][i] for i in keep]
        obs = [curve["observed_frequency"][i] for i in keep]
        ax.plot(pred, obs, "o-", ms=3, lw=1, label=f"{label} (ECE {calibration['ece']:.3f})")
    _finish_square(
        ax,
        "mean predicted P(pneumonia)",
        "observed fraction PNEUMONIA",
        f"{title} (10 bins)",
        "upper left",
        diagonal="perfectly calibrated",
    )
    return _save(fig, path)


def _finish_square(ax, xlabel, ylabel, title, legend, diagonal=None):
    """The unit square's dotted diagonal (labelled ``diagonal``), labels, grid and legend."""
    ax.plot([0, 1], [0, 1], ":", color="gray", label=diagonal)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=7)
