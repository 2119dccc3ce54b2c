"""Experiments and studies as small TOML files (the ``configs/`` folder).

An **experiment file** sets ``pneumojax train`` options under their TrainConfig names
(``backbone = "inception_v3"``, ``trainable = "conv2d_44:average_pooling2d_4"``,
``balance = "oversample"``), checked as the command line checks them (same types, ranges and
choices), plus three optional keys: ``name`` (default: the file stem), ``description`` and a
``[seed_reported]`` table with what the study reported (``trainable_params``, ``accuracy``,
``recall``, ``precision``, ``specificity``, ``f1``, ``auc``).

A **study file** lists experiments, by path relative to itself (``experiments = ["a.toml"]``)
and/or inline (``[[experiment]]`` tables, which need a ``name``), files first, each in order;
``reference`` names the experiment the others are compared with (default: the first);
``[shared]`` holds options for every experiment; and an optional ``[target]`` table states
what the reference experiment must reach on test (``auc``, ``recall``, ``specificity``,
``accuracy``, ``precision``, ``f1``: minimums at the validation-chosen threshold) and how long
the whole study may take (``minutes``: the sum of its run folders' wall times), which the
report checks; ``[[external]]`` tables (``name``, ``path``, optional ``adapt`` and
``description``) name folders of images from other sites that every experiment is scored on
(:mod:`pneumojax.external`).

Precedence, lowest first: TrainConfig's defaults < the study's ``[shared]`` < the experiment
file < the command line. An experiment's own keys (backbone, trainable, balance, ...) are what
make it that experiment, so ``[shared]`` cannot change them; options given on the command line
(``--data``, ``--image-size``, ``--epochs``, ``--weights`` ...) override everything.

Paths inside option values (``data``, ``weights``, ``augment``, ``out``) are taken as on the
command line, relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

import click

from pneumojax.config import TrainConfig
from pneumojax.io import write_text_atomic
from pneumojax.options import command_line, config_options  # noqa: F401 (command_line: re-exported)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SEED_STUDY = CONFIGS_DIR / "seed_study.toml"

# What a study reported, as metrics.json names it.
REPORTED_KEYS = ("trainable_params", "accuracy", "recall", "precision", "specificity", "f1", "auc")
_EXPERIMENT_KEYS = ("name", "description", "seed_reported")
_STUDY_KEYS = (
    "description",
    "experiments",
    "experiment",
    "reference",
    "shared",
    "target",
    "external",
)
# A study's [target]: minimum test figures of its reference experiment, and a time budget.
TARGET_FIGURES = ("auc", "recall", "specificity", "accuracy", "precision", "f1")
TARGET_KEYS = (*TARGET_FIGURES, "minutes")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names the run folder OUT/<name>/


class ExperimentError(ValueError):
    """An experiment or study file that cannot be used; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: its ``pneumojax train`` options as the file gives them (validated)."""

    name: str
    options: dict[str, Any]
    seed_reported: dict[str, int | float] = dataclasses.field(default_factory=dict)
    description: str = ""
    source: Path | None = None  # the experiment file, or the study file of an inline one

    def record(self) -> dict:
        """What a run folder's config.json keeps under ``"experiment"``."""
        return {
            "file": None if self.source is None else str(self.source),
            "name": self.name,
            "description": self.description,
            "seed_reported": dict(self.seed_reported),
        }


@dataclasses.dataclass(frozen=True)
class Study:
    """Experiments in order, the reference experiment's name, and the shared options."""

    experiments: tuple[Experiment, ...]
    reference: str
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    source: Path | None = None
    target: dict[str, float] = dataclasses.field(default_factory=dict)
    external: tuple = ()  # pneumojax.external.ExternalSet: images from elsewhere, scored only

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experiments]

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(f"the study has no experiment {name!r}{_nearest(name, self.names)}")

    def resolve(self, name: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """One experiment's configuration with this study's shared options and ``overrides``."""
        return resolve_options(self.experiment(name), self.shared, overrides)


def load_experiment(path: str | Path) -> Experiment:
    """Reads one experiment file; ExperimentError names the file and what is wrong."""
    path = Path(path)
    return _experiment(_read_toml(path, "experiment file"), path.stem, path, str(path))


def load_study(path: str | Path = SEED_STUDY) -> Study:
    """Reads a study file and every experiment file it lists (relative to the study file)."""
    path = Path(path)
    doc = _read_toml(path, "study file")
    for key in doc:
        if key not in _STUDY_KEYS:
            hint = (
                "; train options go in [shared] or in an experiment"
                if key in config_options()
                else _nearest(key, _STUDY_KEYS)
            )
            raise ExperimentError(f"{path}: unknown key {key!r}{hint}")
    files = doc.get("experiments", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ExperimentError(f"{path}: experiments must be an array of file paths (strings)")
    inline = doc.get("experiment", [])
    if not isinstance(inline, list) or not all(isinstance(t, dict) for t in inline):
        raise ExperimentError(f"{path}: experiment must be an array of tables ([[experiment]])")
    experiments = []
    for entry in files:
        file = path.parent / entry
        if not file.is_file():
            raise ExperimentError(
                f"{path}: experiment file {entry!r} does not exist (looked for {file})"
            )
        experiments.append(load_experiment(file))
    for i, table in enumerate(inline, 1):
        where = f"{path} [[experiment]] number {i}"
        if "name" not in table:
            raise ExperimentError(f"{where}: an inline experiment needs a name")
        experiments.append(_experiment(table, None, path, where))
    if not experiments:
        raise ExperimentError(
            f"{path}: lists no experiments (experiments = [...] or [[experiment]])"
        )
    seen: dict[str, Experiment] = {}
    for e in experiments:
        if e.name in seen:
            raise ExperimentError(
                f"{path}: two experiments are named {e.name!r} ({seen[e.name].source} and "
                f'{e.source}); set name = "..." in one of them'
            )
        seen[e.name] = e
    reference = doc.get("reference", experiments[0].name)
    if not isinstance(reference, str):
        raise ExperimentError(f"{path}: reference must be an experiment's name (a string)")
    if reference not in seen:
        raise ExperimentError(
            f"{path}: reference {reference!r} names no experiment of the study"
            f"{_nearest(reference, list(seen))} (the study's: {', '.join(seen)})"
        )
    shared = doc.get("shared", {})
    if not isinstance(shared, dict):
        raise ExperimentError(f"{path}: shared must be a table ([shared])")
    description = _string(doc, "description", str(path))
    shared = check_options(shared, f"{path} [shared]")
    target = _check_target(doc.get("target", {}), f"{path} [target]")
    from pneumojax.external import ExternalError, parse_external  # noqa: PLC0415

    try:
        external = parse_external(doc.get("external", []), str(path))
    except ExternalError as e:
        raise ExperimentError(str(e)) from None
    return Study(
        tuple(experiments), reference, shared, description, path.resolve(), target, external
    )


def resolve_options(
    experiment: Experiment,
    shared: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The TrainConfig to run: TrainConfig's defaults < ``shared`` (a study's [shared]) <
    the experiment's own options < ``overrides`` (the command line). Each layer is checked."""
    values: dict[str, Any] = {}
    where = str(experiment.source or experiment.name)
    for layer, label in (
        (shared, "shared options"),
        (experiment.options, where),
        (overrides, "command-line options"),
    ):
        values.update(check_options(layer or {}, label))
    return TrainConfig(**values)


def check_options(
    values: Mapping[str, Any], where: str, other_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Checks ``pneumojax train`` options given under their TrainConfig names, with the
    command line's own types, ranges and choices; returns them converted (an integer given for
    a float option becomes a float). ``where`` starts each error message."""
    params, hints, out = config_options(), _field_types(), {}
    for key, value in values.items():
        if key not in params:
            hint = _option_hint(key, other_keys)
            raise ExperimentError(f"{where}: unknown option {key!r}{hint}")
        value = _check_type(key, value, hints[key], where)
        try:
            out[key] = params[key].type.convert(value, params[key], None)
        except click.BadParameter as e:  # out of range, not one of the choices
            raise ExperimentError(f"{where}: {key} = {_toml(value)}: {e.message}") from None
    return out


def record_experiment(run_dir: str | Path, experiment: Experiment) -> bool:
    """Adds ``"experiment": {file, name, description, seed_reported}`` to a run folder's
    config.json; False (and nothing written) when the folder holds no config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    config["experiment"] = experiment.record()
    write_text_atomic(path, json.dumps(config, indent=2, default=str) + "\n")
    return True


def _experiment(table: dict, default_name: str | None, source: Path, where: str) -> Experiment:
    name = table.get("name", default_name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExperimentError(
            f"{where}: name {_toml(name)} must be letters, digits, '_', '-' or '.' (it names "
            "the run folder)"
        )
    options = {k: v for k, v in table.items() if k not in _EXPERIMENT_KEYS}
    reported = table.get("seed_reported", {})
    if not isinstance(reported, dict):
        raise ExperimentError(f"{where}: seed_reported must be a table ([seed_reported])")
    return Experiment(
        name,
        check_options(options, where, _EXPERIMENT_KEYS),
        _check_reported(reported, where),
        _string(table, "description", where),
        source.resolve(),
    )


def _check_reported(reported: dict, where: str) -> dict:
    for key, value in reported.items():
        if key not in REPORTED_KEYS:
            raise ExperimentError(
                f"{where}: unknown [seed_reported] key {key!r}{_nearest(key, REPORTED_KEYS)}"
                f" (valid: {', '.join(REPORTED_KEYS)})"
            )
        if key == "trainable_params":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ExperimentError(
                    f"{where}: seed_reported.trainable_params must be a non-negative integer, "
                    f"got {_kind(value)} {_toml(value)}"
                )
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ExperimentError(
                f"{where}: seed_reported.{key} must be a number from 0 to 1, got "
                f"{_kind(value)} {_toml(value)}"
            )
    return {k: (v if k == "trainable_params" else float(v)) for k, v in reported.items()}


def _check_target(target: Any, where: str) -> dict[str, float]:
    if not isinstance(target, dict):
        raise ExperimentError(f"{where}: target must be a table ([target])")
    for key, value in target.items():
        if key not in TARGET_KEYS:
            raise ExperimentError(
                f"{where}: unknown key {key!r}{_nearest(key, TARGET_KEYS)}"
                f" (valid: {', '.join(TARGET_KEYS)})"
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "minutes" and not (number and value > 0):
            raise ExperimentError(
                f"{where}: minutes must be a positive number, got {_kind(value)} {_toml(value)}"
            )
        if key != "minutes" and not (number and 0 <= value <= 1):
            raise ExperimentError(
                f"{where}: {key} must be a number from 0 to 1, got {_kind(value)} {_toml(value)}"
            )
    return {k: float(v) for k, v in target.items()}


def _string(table: dict, key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ExperimentError(f"{where}: {key} must be a string, got {_kind(value)}")
    return value


def _read_toml(path: Path, what: str) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ExperimentError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ExperimentError(f"{what} {path}: {e.strerror or e}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ExperimentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
        raise ExperimentError(f"{path}: not valid TOML: {e}") from None


@functools.cache
def _field_types() -> dict[str, tuple[type, ...]]:
    hints = typing.get_type_hints(TrainConfig)
    return {
        name: tuple(t for t in (typing.get_args(h) or (h,)) if t is not type(None))
        for name, h in hints.items()
    }


def _check_type(key: str, value: Any, types: tuple[type, ...], where: str) -> Any:
    if bool in types:
        ok, wanted = isinstance(value, bool), "true or false"
    elif int in types:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif float in types:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise ExperimentError(f"{where}: {key} must be {wanted}, got {_kind(value)} {_toml(value)}")
    return value


def _option_hint(key: str, other_keys: tuple[str, ...]) -> str:
    # The command line's spelling (image-size, --lr) gets its key; otherwise the nearest name.
    by_flag = {
        opt.lstrip("-"): name
        for name, p in config_options().items()
        for opt in (*p.opts, *p.secondary_opts)
    }
    if key.lstrip("-") in by_flag:
        return f"; the key for --{key.lstrip('-')} is {by_flag[key.lstrip('-')]!r}"
    hint = _nearest(key, [*config_options(), *other_keys])
    return hint or f" (pneumojax train options: {', '.join(config_options())})"


def _nearest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _kind(value: Any) -> str:
    for t, word in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, t):
            return word
    return "a date/time"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{...}"
    return repr(value)
