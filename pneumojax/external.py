"""Images from elsewhere in a study: external sets, how each experiment is scored on them, and
the figures of the report's "Images from elsewhere" section.

A carve of the training folder shares the training images' site, patients' ages and
preparation; only images from another hospital say how a model holds up away from them. A
study names such sets (``[[external]]`` tables in the study file, ``--eval-data`` on the command
line); every experiment is scored on every image of each (``evaluate --split all``) at its own
validation threshold, into ``RUN/eval-<name>/``, and, where a set says ``adapt = true``, also
adapted to it without labels (:mod:`pneumojax.adapt`) into ``OUT/adapted/<name>/<experiment>/``
and scored again. The section is made from those folders alone, like the rest of the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable


from pneumojax import stats
from pneumojax.io import write_text_atomic
from pneumojax.metrics import binary_metrics, choose_threshold
from pneumojax.predictions import read_predictions

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names the folder eval-<name>/
_KEYS = ("name", "path", "adapt", "description")


class ExternalError(ValueError):
    """An external set that cannot be used as given (name, path)."""


@dataclasses.dataclass(frozen=True)
class ExternalSet:
    """A folder of labelled images from another site (any layout pneumojax reads; every image
    is scored, none trained on)."""

    name: str
    path: str
    adapt: bool = False  # also adapt every experiment to its images (labels never read)
    description: str = ""

    @property
    def folder(self) -> Path:
        """The path with ``~`` and ``$VARIABLES`` expanded, relative to the working folder."""
        return Path(os.path.expandvars(os.path.expanduser(self.path)))

    def eval_dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / f"eval-{self.name}"

    def adapted_dir(self, out: Path, experiment: str) -> Path:
        return Path(out) / "adapted" / self.name / experiment


def parse_external(tables, where: str) -> tuple[ExternalSet, ...]:
    """A study file's ``[[external]]`` tables, checked."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ExternalError(f"{where}: external must be an array of tables ([[external]])")
    out = []
    for i, table in enumerate(tables, 1):
        at = f"{where} [[external]] number {i}"
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise ExternalError(f"{at}: unknown key {unknown[0]!r} (valid: {', '.join(_KEYS)})")
        for key in ("name", "path"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise ExternalError(f"{at}: {key} must be a non-empty string")
        if not isinstance(table.get("adapt", False), bool):
            raise ExternalError(f"{at}: adapt must be true or false")
        if not isinstance(table.get("description", ""), str):
            raise ExternalError(f"{at}: description must be a string")
        out.append(
            external_set(
                table["name"],
                table["path"],
                table.get("adapt", False),
                table.get("description", ""),
                at,
            )
        )
    return unique(out, where)


def parse_eval_data(values, adapt: bool = False) -> tuple[ExternalSet, ...]:
    """``--eval-data NAME=PATH`` (or a bare PATH, named after its folder), repeatable."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name or "external", value
        out.append(external_set(name, path, adapt, "", f"--eval-data {value}"))
    return unique(out, "--eval-data")


def external_set(name: str, path: str, adapt: bool, description: str, where: str) -> ExternalSet:
    if not _NAME.fullmatch(name):
        raise ExternalError(
            f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names the "
            "folder eval-<name>/)"
        )
    return ExternalSet(name, path, adapt, description)


def unique(sets, where: str) -> tuple[ExternalSet, ...]:
    seen = set()
    for s in sets:
        if s.name in seen:
            raise ExternalError(f"{where}: two external sets are named {s.name!r}")
        seen.add(s.name)
    return tuple(sets)


def merge(study_sets, command_line_sets) -> tuple[ExternalSet, ...]:
    """The study's sets and those of ``--eval-data`` (which replace a study set of their name)."""
    given = {s.name for s in command_line_sets}
    return tuple(s for s in study_sets if s.name not in given) + tuple(command_line_sets)


def score_on_externals(
    run_dir: Path,
    experiment: str,
    sets,
    out: Path,
    evaluate: Callable,
    adapt: Callable,
    log: Callable[[str], None],
) -> list[str]:
    """Scores a finished run on each external set (and its adapted copy where the set says
    so), skipping what its folders already hold; returns one line per set that failed (the
    study goes on, and the reason is kept in ``eval-<name>/error.txt`` for the report)."""
    failures = []
    for s in sets:
        targets = [(run_dir, s.eval_dir(run_dir))]
        try:
            if s.adapt:
                adapted = s.adapted_dir(out, experiment)
                if not _scored(adapted / "metrics.json", s):
                    adapt(run_dir, s.folder, adapted, overwrite=True, log=log)
                targets.append((adapted, s.eval_dir(adapted)))
            for run, folder in targets:
                if not _scored(folder / "metrics.json", s):
                    evaluate(run, str(s.folder), "all", folder / "metrics.json", log=log)
                (folder / "error.txt").unlink(missing_ok=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001  (reported; the study goes on)
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            folder = targets[-1][1]
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / "error.txt", f"{s.folder}: {message}\n")
            failures.append(f"{s.name}: {message}")
    return failures


def _scored(metrics: Path, s: ExternalSet) -> bool:
    """Whether ``metrics`` exists and was made from this set's folder (not an older path)."""
    if not metrics.exists():
        return False
    record = json.loads(metrics.read_text())
    target = record.get("data") or record.get("adaptation", {}).get("target")
    return target is not None and Path(target).absolute() == s.folder.absolute()


# --- the report's section ------------------------------------------------------------------------


def external_section(sets, rows: list[dict], reference: str, out: Path, target_recall) -> list:
    """Per external set: one entry per experiment (and per adapted experiment) with its
    figures at the validation threshold, calibration, the oracle threshold (chosen with the
    external labels: what the threshold would have had to be) and DeLong's test against the
    reference on the same images."""
    section = []
    for s in sets:
        entries, errors = [], []
        for row in rows:
            candidates = [(row["name"], Path(row["_dir"]), False)]
            if s.adapt:
                candidates.append(
                    (f"{row['name']} (adapted)", s.adapted_dir(out, row["name"]), True)
                )
            for name, run, adapted in candidates:
                folder = s.eval_dir(run)
                if (folder / "error.txt").exists():
                    errors.append(f"{name}: {(folder / 'error.txt').read_text().strip()}")
                elif (folder / "metrics.json").exists():
                    entries.append(_entry(name, row["name"], adapted, folder, target_recall))
        ref = next((e for e in entries if e["experiment"] == reference and not e["adapted"]), None)
        for e in entries:
            e["vs_reference"] = None if ref is None or e is ref else _delong(e, ref)
        counts = entries[0]["counts"] if entries else None
        section.append(
            {
                "name": s.name,
                "path": s.path,
                "description": s.description,
                "adapt": s.adapt,
                "counts": counts,
                "found": s.folder.is_dir(),
                "entries": entries,
                "errors": errors,
            }
        )
    return section


def _entry(name: str, experiment: str, adapted: bool, folder: Path, target_recall) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    paths, y, member_p = read_predictions(folder / "predictions.csv")
    p = member_p.mean(1)
    both = bool(y.any() and not y.all())
    recall = metrics.get("target_recall", target_recall)
    oracle = None
    if both:
        t = choose_threshold(y, p, recall)
        at = binary_metrics(y, p, t)
        oracle = {"threshold": t, "recall": at["recall"], "specificity": at["specificity"]}
    return {
        "name": name,
        "experiment": experiment,
        "adapted": adapted,
        "counts": [int((y == 0).sum()), int((y == 1).sum())],
        "metrics": metrics,
        "calibration": {
            "brier": stats.brier_score(y, p),
            "ece": stats.expected_calibration_error(y, p),
            "reliability": stats.reliability_curve(y, p),
        },
        "oracle": oracle,
        "_y": y,
        "_p": p,
        "_paths": paths,
    }


def _delong(entry: dict, ref: dict) -> dict | None:
    if entry["_paths"] != ref["_paths"] or not (entry["_y"].any() and not entry["_y"].all()):
        return None
    d = stats.delong_auc_test(entry["_y"], entry["_p"], ref["_p"])
    return {"auc_delta": d["auc_delta"], "auc_delta_ci95": d["auc_delta_ci95"], "delong_p": d["p"]}


def public(section: list) -> list:
    """The section without its in-memory arrays (what study.json holds)."""
    return [
        {
            **s,
            "entries": [
                {k: v for k, v in e.items() if not k.startswith("_")} for e in s["entries"]
            ],
        }
        for s in section
    ]


def one_class(entry: dict) -> str | None:
    """``NORMAL`` or ``PNEUMONIA`` when the set holds that class only, else None."""
    normal, pneumonia = entry["counts"]
    return "NORMAL" if not pneumonia else "PNEUMONIA" if not normal else None


def remember(out: Path, sets) -> tuple[ExternalSet, ...]:
    """``sets`` and those an earlier invocation of the study scored (``OUT/externals.json``),
    which the report keeps showing; the file is updated."""
    path = Path(out) / "externals.json"
    earlier = []
    if path.exists():
        earlier = [ExternalSet(**e) for e in json.loads(path.read_text())]
    given = {s.name for s in sets}
    merged = tuple(sets) + tuple(s for s in earlier if s.name not in given)
    if merged:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            path, json.dumps([dataclasses.asdict(s) for s in merged], indent=1) + "\n"
        )
    return merged
