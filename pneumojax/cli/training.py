"""The ``train`` command: its options from the command line or an experiment file, what
``--resume`` may change, the usage errors found before any data is read, and the run itself."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from pneumojax.backbones import get_backbone
from pneumojax.cli.errors import describe_os_error, error_text, fail
from pneumojax.config import TrainConfig, resolve_optimisation
from pneumojax.options import train_options


@click.command()
@train_options
@click.pass_context
def train(
    ctx,
    config_file,
    resume,
    overwrite,
    dry_run,
    distributed,
    coordinator,
    num_processes,
    process_id,
    **options,
):
    """Train and evaluate a classifier; everything lands in the run folder."""
    experiment = None
    if config_file is not None:
        experiment, options = _options_from_file(ctx, config_file, resume, options)
    changes = _resume_options(ctx) if resume else None
    if resume and dry_run:
        _print_stored_plan(options["out"], changes)
        return
    _check_train_options(options, distributed, coordinator, num_processes, process_id)
    cfg = TrainConfig(**options)
    if distributed:
        import jax  # noqa: PLC0415

        jax.distributed.initialize(coordinator, num_processes, process_id)
    if resume:
        _check_resume_changes(cfg, changes)
    else:  # usage errors first, before any data is touched (exit status 2)
        plan = _check_new_run(cfg)
        if dry_run:
            for line in plan.lines():
                click.echo(line)
            return
    # A run started here (not an existing one refused) gets the experiment's record.
    extra = {"experiment": experiment.record()} if experiment is not None else None
    _run_training(cfg, resume, overwrite, changes, extra)


def _check_new_run(cfg: TrainConfig):
    """The usage errors of a new run that need the backbone, a file or the devices (exit status
    2); its plan (the layers it trains) when there are none."""
    from pneumojax.model import TrainableSpecError, make_plan  # noqa: PLC0415

    try:
        plan = make_plan(get_backbone(cfg.backbone), cfg.cut, cfg.trainable, cfg.image_size)
    except (TrainableSpecError, KeyError, ValueError) as e:
        fail(error_text(e), 2)
    if cfg.ensemble_size is not None and cfg.balance != "ensemble":
        fail("--ensemble-size needs --balance ensemble", 2)
    if cfg.seed_ensemble > 1 and cfg.balance == "ensemble":
        fail(
            "--seed-ensemble cannot be combined with --balance ensemble (its members "
            "already differ in their data); use one or the other",
            2,
        )
    if cfg.tta_augment is not None and not cfg.tta:
        fail("--tta-augment needs --tta N (the number of views, N >= 1)", 2)
    if cfg.augment != "cxr":  # a pipeline file: read now, not after the run has started
        from pneumojax.balance import augment_pipeline  # noqa: PLC0415

        try:
            augment_pipeline(cfg.augment)
        except ValueError as e:
            fail(error_text(e), 2)
    import jax  # noqa: PLC0415

    if cfg.batch_size % jax.device_count():
        fail(
            f"--batch-size {cfg.batch_size} is not a multiple of the {jax.device_count()} "
            "devices: every device takes an equal share of each batch",
            2,
        )
    return plan


def _check_resume_changes(cfg: TrainConfig, changes: dict) -> None:
    """--resume: the changes asked for are ones the run in --out can take (exit status 2)."""
    from pneumojax.runconfig import check_resume_changes  # noqa: PLC0415

    try:
        check_resume_changes(Path(cfg.out), changes)
    except ValueError as e:
        fail(error_text(e), 2)


def _run_training(cfg: TrainConfig, resume, overwrite, changes, extra) -> None:
    """The run itself; an interruption says how to continue (exit status 130), any other
    failure is one line."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.run import train_run  # noqa: PLC0415
    from pneumojax.train import Interrupted, NonFiniteLoss  # noqa: PLC0415

    try:
        train_run(
            cfg,
            resume=resume,
            overwrite=overwrite,
            log=_log_above_bars,
            changes=changes,
            config_extra=extra,
        )
    except Interrupted as e:
        click.echo(f"{e}\ncontinue with: pneumojax train --out {cfg.out} --resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # outside the epochs (reading data, scoring): nothing saved
        click.echo(_interrupted_outside_the_epochs(cfg.out), err=True)
        sys.exit(130)
    except FileExistsError as e:
        fail(error_text(e), 2)
    except (KeyError, ValueError, OSError, NonFiniteLoss, CheckpointError, DataError) as e:
        fail(describe_os_error(e) if isinstance(e, OSError) else error_text(e))


def _interrupted_outside_the_epochs(out: str) -> str:
    """Ctrl-C while reading data or scoring: whether this process had started the run in --out
    (it can be continued) or not (the folder is as it was)."""
    from pneumojax.runfolder import read_status  # noqa: PLC0415

    status = read_status(Path(out)) or {}
    ours = status.get("pid") == os.getpid() and status.get("state") == "interrupted"
    return "interrupted" + (
        f"; continue with: pneumojax train --out {out} --resume"
        if ours
        else f" before the run started; {out} is as it was"
    )


def _resume_options(ctx) -> dict:
    """--resume: the options given that a resumed run takes (--epochs, --patience). Any other
    option given is a usage error naming it (the run keeps its own config.json), unless it
    only repeats the run's own value (the command that started the run, plus --resume)."""
    import json  # noqa: PLC0415

    from click.core import ParameterSource  # noqa: PLC0415

    from pneumojax.runconfig import RESUME_CHANGES  # noqa: PLC0415

    defaulted = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    params = {p.name: p for p in ctx.command.params}
    given = [  # in the order given (click processes them so)
        params[name]
        for name in ctx.params
        if name not in ("resume", "out", "dry_run")
        and ctx.get_parameter_source(name) not in defaulted
    ]
    try:
        stored = json.loads((Path(ctx.params["out"]) / "config.json").read_text())
    except (OSError, ValueError):  # no run: the error says so (train_run)
        return {p.name: ctx.params[p.name] for p in given if p.name in RESUME_CHANGES}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def own(name: str, value) -> bool:  # the value the run was started with
        requested = stored.get("requested") or {}
        return name in fields and (
            stored.get(name, object()) == value or requested.get(name, object()) == value
        )

    refused = [
        p for p in given if p.name not in RESUME_CHANGES and not own(p.name, ctx.params[p.name])
    ]
    if refused:

        def shown(p) -> str:
            value = ctx.params[p.name]
            if isinstance(value, bool):
                text = p.secondary_opts[0] if p.secondary_opts and not value else p.opts[0]
            else:
                text = f"{p.opts[0]} {value}"
            return text + (f" (the run's: {stored[p.name]})" if p.name in stored else "")

        raise click.UsageError(
            "--resume continues the run in --out with its own config.json: "
            f"{', '.join(map(shown, refused))} cannot change (only --epochs and --patience "
            "can); drop " + ("it" if len(refused) == 1 else "them")
        )
    return {p.name: ctx.params[p.name] for p in given if p.name in RESUME_CHANGES}


def _print_stored_plan(out: str, changes: dict) -> None:
    """--resume --dry-run: the plan the run in --out was started with, and what changes."""
    import json  # noqa: PLC0415

    from pneumojax.model import make_plan  # noqa: PLC0415

    path = Path(out) / "config.json"
    if not path.is_file():
        fail(f"--resume: {Path(out).absolute()} holds no run to continue")
    try:
        config = json.loads(path.read_text())
        plan = make_plan(
            get_backbone(config["backbone"]),
            config["cut"],
            config["trainable"],
            config["image_size"],
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path} cannot be read as a run's config.json: {error_text(e)}")
    for line in plan.lines():
        click.echo(line)
    settings = ", ".join(
        f"--{k} {changes.get(k, config.get(k))}"
        + (f" (was {config.get(k)})" if k in changes and changes[k] != config.get(k) else "")
        for k in ("epochs", "patience")
    )
    click.echo(f"--resume would continue {path.parent} with its config.json: {settings}")


def _options_from_file(ctx, path, resume, options) -> tuple:
    """--config: the experiment file's options, overridden by those given on the command line
    (defaults < file < command line); --out defaults to runs/NAME."""
    from click.core import ParameterSource  # noqa: PLC0415

    from pneumojax.experiments import (  # noqa: PLC0415
        ExperimentError,
        command_line,
        load_experiment,
        resolve_options,
    )

    if resume:  # a resumed run reads its own config.json; a file could only contradict it
        raise click.BadOptionUsage(
            "config",
            "--resume continues the run in --out with its own config.json: drop --config "
            "(pneumojax train --out RUN_DIR --resume)",
        )
    defaulted = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) not in defaulted}
    try:
        experiment = load_experiment(path)
        if "out" not in given and "out" not in experiment.options:
            given["out"] = f"runs/{experiment.name}"
        cfg = resolve_options(experiment, overrides=given)
    except ExperimentError as e:
        fail(str(e), 2)
    click.echo(f"experiment {experiment.name} ({path}): {command_line(cfg)}")
    return experiment, dataclasses.asdict(cfg)


def _check_train_options(options, distributed, coordinator, num_processes, process_id) -> None:
    # What click's per-option types cannot see: options that only make sense together.
    if options["val_fraction"] + options["test_fraction"] >= 1.0:
        raise click.BadOptionUsage(
            "test_fraction",
            "--val-fraction plus --test-fraction must be "
            f"below 1 (got {options['val_fraction']} + "
            f"{options['test_fraction']}): nothing would be left to train",
        )
    try:  # --weight-decay without adamw, --warmup-epochs without warmup-cosine, ...
        resolve_optimisation(TrainConfig(**options))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not distributed:
        for name, value in (
            ("--coordinator", coordinator),
            ("--num-processes", num_processes),
            ("--process-id", process_id),
        ):
            if value is not None:
                raise click.BadOptionUsage(name, f"{name} needs --distributed")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise click.BadParameter(
            f"{process_id} is not below --num-processes {num_processes}",
            param_hint="'--process-id'",
        )


def _log_above_bars(line: str):
    from pneumojax.progress import write  # noqa: PLC0415

    write(line)
