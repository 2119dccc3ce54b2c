"""The ``pneumojax`` command line: a thin layer over library functions."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from pneumojax.backbones import get_backbone, layer_table
from pneumojax.config import (
    TrainConfig,
    resolve_optimisation,
)
from pneumojax.options import (
    BACKBONES,
    DTYPES,
    NON_NEGATIVE,
    POSITIVE,
    _AugmentSpecType,
    train_options,
)

# Options of the commands that use a finished run (evaluate, predict).
RUN_OPTION = click.option(
    "--run", "run_dir", required=True, help="A run folder made by `pneumojax train`."
)
EXPLAIN_METHODS = click.Choice(["gradcam", "gradcam++", "saliency"])
SCORING_TTA = (
    click.option(
        "--tta",
        "tta",
        default=None,
        type=click.IntRange(min=0),
        metavar="N",
        help="Test-time augmentation: average P(pneumonia) over N random views of each image; "
        "0 = none [default: the run's own]. Other than the run's own, the thresholds are "
        "re-derived on the run's validation split with the same TTA.",
    ),
    click.option(
        "--tta-augment",
        default=None,
        type=_AugmentSpecType(),
        help="The views' transforms, as --device-augment [default: the run's TTA spec, else "
        "its --device-augment, else light].",
    ),
)


def _scoring_tta(fn):
    for option in reversed(SCORING_TTA):
        fn = option(fn)
    return fn


SCORING_PRECISION = click.option(
    "--precision",
    default=None,
    type=DTYPES,
    help="Score in this precision instead of the run's own (the one it was trained "
    "and thresholded in) [default: the run's].",
)


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    import platform  # noqa: PLC0415
    from importlib import metadata  # noqa: PLC0415

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    click.echo(
        f"pneumojax {version('pneumojax')} (jax {version('jax')}, jaxlib "
        f"{version('jaxlib')}, flax {version('flax')}, Python {platform.python_version()})"
    )
    ctx.exit()


def _check_input_size(backbone: str, size: int, option: str) -> None:
    info = get_backbone(backbone)
    if size < info.min_input_size:
        raise click.BadParameter(
            f"{backbone} needs an input of at least {info.min_input_size} px, got {size}",
            param_hint=f"'{option}'",
        )


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the pneumojax, JAX and Flax versions and exit.",
)
def main():
    """Chest X-ray pneumonia classifiers by transfer learning, in JAX/Flax."""
    import logging  # noqa: PLC0415

    import pydicom.config  # noqa: PLC0415, F401  (it sets its logger's level when imported)

    # pydicom logs every frame it cannot decode as an ERROR with its traceback; pneumojax says
    # in one line which file it skipped and why, so the command shows only that.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


@main.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option(
    "--input-size", default=256, show_default=True, type=POSITIVE, help="Input side in px."
)
def layers(backbone: str, input_size: int):
    """List every layer as keras.Model.layers does: index, name, kind, output shape, params."""
    _check_input_size(backbone, input_size, "--input-size")
    info = get_backbone(backbone)
    try:
        rows = layer_table(info, input_size)
    except ValueError as e:
        _fail(str(e), 2)
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'index':>5}  {'name':<{width}}  {'kind':<18}  {'output shape':<22}  params")
    for r in rows:
        shape = "(" + ", ".join("None" if d is None else str(d) for d in r["output_shape"]) + ")"
        click.echo(
            f"{r['index']:>5}  {r['name']:<{width}}  {r['kind']:<18}  {shape:<22}  {r['params']:,}"
        )
    click.echo(
        f"{len(rows)} layers, {sum(r['params'] for r in rows):,} parameters "
        f"(BatchNorm statistics included, as Keras counts them)"
    )


@main.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet (Keras downloads them: needs internet), none (Keras's random "
    "init), or a Keras .h5 / .weights.h5 / .keras file.",
)
@click.option("--input-size", default=256, show_default=True, type=POSITIVE)
@click.option(
    "--out", default=None, help="Checkpoint folder [default: checkpoints/BACKBONE-SOURCE]."
)
@click.option(
    "--randomize",
    "randomize_seed",
    type=NON_NEGATIVE,
    default=None,
    metavar="SEED",
    help="Randomize every Keras variable (BatchNorm statistics too) before porting: "
    "a strict parity self-test.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint folder.")
def port(backbone, weights, input_size, out, randomize_seed, overwrite):
    """Port keras.applications weights into Flax, prove parity, save an orbax checkpoint."""
    _check_input_size(backbone, input_size, "--input-size")  # before TensorFlow loads
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from ports.keras_port import PortError, port_backbone  # noqa: PLC0415

    try:
        port_backbone(
            get_backbone(backbone),
            weights,
            input_size,
            out,
            randomize_seed,
            overwrite,
            echo=click.echo,
        )
    except (PortError, CheckpointError) as e:
        _fail(str(e))


@main.command()
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
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.model import TrainableSpecError, make_plan  # noqa: PLC0415
    from pneumojax.run import train_run  # noqa: PLC0415
    from pneumojax.train import Interrupted, NonFiniteLoss  # noqa: PLC0415

    cfg = TrainConfig(**options)
    if distributed:
        import jax  # noqa: PLC0415

        jax.distributed.initialize(coordinator, num_processes, process_id)
    if not resume:  # usage errors first, before any data is touched (exit status 2)
        try:
            plan = make_plan(get_backbone(cfg.backbone), cfg.cut, cfg.trainable, cfg.image_size)
        except (TrainableSpecError, KeyError, ValueError) as e:
            _fail(_text(e), 2)
        if cfg.ensemble_size is not None and cfg.balance != "ensemble":
            _fail("--ensemble-size needs --balance ensemble", 2)
        if cfg.seed_ensemble > 1 and cfg.balance == "ensemble":
            _fail(
                "--seed-ensemble cannot be combined with --balance ensemble (its members "
                "already differ in their data); use one or the other",
                2,
            )
        if cfg.tta_augment is not None and not cfg.tta:
            _fail("--tta-augment needs --tta N (the number of views, N >= 1)", 2)
        if cfg.augment != "cxr":  # a pipeline file: read now, not after the run has started
            from pneumojax.balance import augment_pipeline  # noqa: PLC0415

            try:
                augment_pipeline(cfg.augment)
            except ValueError as e:
                _fail(_text(e), 2)
        import jax  # noqa: PLC0415

        if cfg.batch_size % jax.device_count():
            _fail(
                f"--batch-size {cfg.batch_size} is not a multiple of the {jax.device_count()} "
                "devices: every device takes an equal share of each batch",
                2,
            )
        if dry_run:
            for line in plan.lines():
                click.echo(line)
            return
    if resume:
        from pneumojax.runconfig import check_resume_changes  # noqa: PLC0415

        try:
            check_resume_changes(Path(cfg.out), changes)
        except ValueError as e:
            _fail(_text(e), 2)
    # A run started here (not an existing one refused) gets the experiment's record.
    extra = {"experiment": experiment.record()} if experiment is not None else None
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
        from pneumojax.runfolder import read_status  # noqa: PLC0415

        status = read_status(Path(cfg.out)) or {}
        ours = status.get("pid") == os.getpid() and status.get("state") == "interrupted"
        click.echo(
            "interrupted"
            + (
                f"; continue with: pneumojax train --out {cfg.out} --resume"
                if ours
                else f" before the run started; {cfg.out} is as it was"
            ),
            err=True,
        )
        sys.exit(130)
    except FileExistsError as e:
        _fail(_text(e), 2)
    except (KeyError, ValueError, OSError, NonFiniteLoss, CheckpointError, DataError) as e:
        _fail(_describe_os_error(e) if isinstance(e, OSError) else _text(e))


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
        _fail(f"--resume: {Path(out).absolute()} holds no run to continue")
    try:
        config = json.loads(path.read_text())
        plan = make_plan(
            get_backbone(config["backbone"]),
            config["cut"],
            config["trainable"],
            config["image_size"],
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(f"{path} cannot be read as a run's config.json: {_text(e)}")
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
        _fail(str(e), 2)
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


def _describe_os_error(e: OSError) -> str:
    import errno  # noqa: PLC0415

    from pneumojax.io import NoSpaceError  # noqa: PLC0415

    if isinstance(e, NoSpaceError):  # a cache that does not fit: its partial files removed
        return str(e)
    if e.errno == errno.ENOSPC:
        return (
            f"disk full while writing {e.filename or 'the run folder'}: free space (or choose "
            "another --out) and continue with --resume; the previous checkpoint is intact"
        )
    return str(e)


@main.command()
@RUN_OPTION
@click.option("--data", default=None, help="Another data folder [default: the run's own].")
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["test", "val", "all"]),
    help="'all' takes every image of the folder (an external test set).",
)
@click.option(
    "--out",
    default=None,
    help="metrics.json path [default: RUN/eval-SPLIT/metrics.json on the run's own data; "
    "with --data of another folder RUN/eval-SPLIT-FOLDER/metrics.json, FOLDER being that "
    "folder's name, so the run's own evaluations are never replaced].",
)
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@click.option(
    "--explain",
    "explain_count",
    default=0,
    type=NON_NEGATIVE,
    help="Also write heat maps of the N most confident false positives and false negatives "
    "(explain/ and plots/errors.png).",
)
@click.option("--explain-method", default="gradcam", type=EXPLAIN_METHODS, show_default=True)
@click.option("--explain-layer", default=None, help="[default: the last block before the cut]")
@SCORING_PRECISION
@_scoring_tta
def evaluate(
    run_dir,
    data,
    split,
    out,
    strict,
    explain_count,
    explain_method,
    explain_layer,
    precision,
    tta,
    tta_augment,
):
    """Metrics (at the run's validation-chosen threshold) and plots on any data."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.tta import TTAUsageError  # noqa: PLC0415

    if explain_count:  # a bad --explain-layer is a usage error before any scoring
        from pneumojax.explain import LayerChoiceError, check_run_layer  # noqa: PLC0415

        try:
            check_run_layer(run_dir, explain_layer, explain_method)
        except LayerChoiceError as e:
            raise click.BadParameter(str(e), param_hint="'--explain-layer'") from None
        except (ValueError, OSError) as e:
            _fail(_text(e))
    from pneumojax.explain import evaluate_and_explain  # noqa: PLC0415

    try:
        evaluate_and_explain(
            run_dir,
            (explain_count, explain_method, explain_layer),
            log=click.echo,
            data=data,
            split=split,
            out=out,
            strict=strict,
            precision=precision,
            tta=tta,
            tta_augment=tta_augment,
        )
    except TTAUsageError as e:
        _fail(_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_text(e))


@main.command()
@RUN_OPTION
@click.option(
    "--data",
    required=True,
    help="The target images (any folder pneumojax reads, DICOM too); their labels are never read.",
)
@click.option("--out", required=True, help="The adapted run's folder (new).")
@click.option(
    "--bn/--no-bn",
    default=True,
    show_default=True,
    help="Re-estimate every BatchNorm layer's statistics on the target images (AdaBN).",
)
@click.option(
    "--prior/--no-prior",
    default=True,
    show_default=True,
    help="Re-estimate the PNEUMONIA prior on the target by EM (Saerens 2002) and move the "
    "model's probabilities to it.",
)
@click.option(
    "--threshold",
    default="target",
    show_default=True,
    type=click.Choice(["target", "keep"]),
    help="target: the most specific threshold whose recall, estimated on the target images "
    "with the adapted probabilities as soft labels, reaches the run's target recall; keep: "
    "the run's validation threshold.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def adapt(run_dir, data, out, bn, prior, threshold, overwrite):
    """Adapt a finished run to images from another site, without their labels."""
    from pneumojax.adapt import AdaptOptions, adapt_run  # noqa: PLC0415
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415

    if not bn and not prior and threshold == "keep":
        _fail("--no-bn --no-prior --threshold keep would change nothing", 2)
    try:
        adapt_run(run_dir, data, out, AdaptOptions(bn, prior, threshold), overwrite, log=click.echo)
    except FileExistsError as e:
        _fail(_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_describe_os_error(e) if isinstance(e, OSError) else _text(e))


@main.command()
@RUN_OPTION
@click.option("--json", "as_json", is_flag=True, help="JSON instead of CSV.")
@click.argument("paths", nargs=-1, required=True)
@SCORING_PRECISION
@_scoring_tta
def predict(run_dir, as_json, paths, precision, tta, tta_augment):
    """Pneumonia probability and label for images or folders of images."""
    import csv  # noqa: PLC0415
    import json  # noqa: PLC0415

    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.inference import predict_paths  # noqa: PLC0415
    from pneumojax.tta import TTAUsageError  # noqa: PLC0415

    try:
        rows = predict_paths(
            run_dir, list(paths), precision=precision, tta=tta, tta_augment=tta_augment
        )
    except TTAUsageError as e:
        _fail(_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_text(e))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        w = csv.DictWriter(sys.stdout, fieldnames=["path", "p_pneumonia", "label", "threshold"])
        w.writeheader()
        w.writerows(rows)


@main.command()
@RUN_OPTION
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the overlays."
)
@click.option(
    "--layer",
    default=None,
    help="Keras layer name up to the cut [default: the last block output before it].",
)
@click.option(
    "--method", default="gradcam", show_default=True, type=EXPLAIN_METHODS, help="Heat map."
)
@SCORING_PRECISION
def explain(run_dir, paths, out, layer, method, precision):
    """Heat maps of where the model looks: an overlay PNG per image and explain.csv."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.explain import LayerChoiceError, explain_paths  # noqa: PLC0415

    try:
        explain_paths(run_dir, list(paths), out, layer, method, precision, log=click.echo)
    except LayerChoiceError as e:
        raise click.BadParameter(str(e), param_hint="'--layer'") from None
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_text(e))


def _batch_sizes(_ctx, _param, value):
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected sizes like 1,4,8") from None
    if min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: every size must be at least 1")
    return sizes


@main.command()
@RUN_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch",
    default=None,
    type=click.IntRange(min=1),
    help="Images per device call [default: the largest batch size].",
)
@click.option(
    "--batch-window-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long a request waits for others to share its device call.",
)
@click.option(
    "--batch-sizes",
    default=None,
    callback=_batch_sizes,
    help="Padded batch sizes compiled at start, e.g. 1,4,8 [default: the run's batch size, "
    "which gives predict's probabilities bit for bit].",
)
@click.option(
    "--max-upload-mb",
    default=32.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="The largest request body.",
)
@click.option(
    "--max-files", default=16, show_default=True, type=click.IntRange(min=1), help="Per request."
)
@click.option("--no-explain", is_flag=True, help="No heat maps (nothing to compile for them).")
def serve(
    run_dir,
    host,
    port,
    max_batch,
    batch_window_ms,
    batch_sizes,
    max_upload_mb,
    max_files,
    no_explain,
):
    """A web page and API scoring images with a run: POST /predict, GET /model, GET /."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415

    try:
        from pneumojax.serve import ServeOptions, serve_run  # noqa: PLC0415
    except ImportError as e:
        _fail(f"pneumojax serve needs {e.name or 'FastAPI'}: pip install 'pneumojax[serve]'")
    options = ServeOptions(max_batch, batch_window_ms, max_upload_mb, max_files)
    try:
        serve_run(run_dir, host, port, options, batch_sizes, not no_explain, log=click.echo)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_text(e))


@main.command()
@RUN_OPTION
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["savedmodel", "onnx", "stablehlo"]),  # pneumojax.export.FORMATS
    help="TensorFlow SavedModel, ONNX, or serialized StableHLO (jax.export).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write (new)."
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export(run_dir, fmt, out, overwrite):
    """The run's whole scoring path as one model file: uint8 images [N, S, S, 3] ->
    P(pneumonia) [N], with the threshold in pneumojax-export.json beside it."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from pneumojax.data import DataError  # noqa: PLC0415
    from pneumojax.export import export_run  # noqa: PLC0415

    try:
        export_run(run_dir, fmt, out, overwrite, log=click.echo)
    except FileExistsError as e:
        _fail(_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        _fail(_text(e))


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="comparison.png", show_default=True, help="Bar chart PNG.")
@click.option(
    "--metrics-file",
    default="metrics.json",
    show_default=True,
    help="Which metrics file inside each run folder (e.g. eval-all/metrics.json).",
)
def compare(runs, out, metrics_file):
    """One table (and a bar chart) of several runs' test figures with 95% intervals."""
    from pneumojax.compare import comparison_rows, comparison_table  # noqa: PLC0415
    from pneumojax.plots import plot_comparison  # noqa: PLC0415

    try:
        rows = comparison_rows(runs, metrics_file)
    except (OSError, ValueError) as e:
        _fail(_text(e))
    click.echo(comparison_table(rows))
    try:
        click.echo(f"chart: {plot_comparison(rows, out)}")
    except OSError as e:
        _fail(f"cannot write the chart {out}: {e}")


@main.command()
@click.argument("study_file", required=False, type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Data folder every experiment trains on.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Study folder.")
@click.option("--weights", default=None, help="Overrides every experiment's --weights.")
@click.option("--image-size", default=None, type=POSITIVE, help="Overrides every experiment's.")
@click.option("--epochs", default=None, type=POSITIVE, help="Overrides every experiment's.")
@click.option(
    "--eval-data",
    multiple=True,
    metavar="[NAME=]PATH",
    help="Also score every experiment on this folder of images from elsewhere (every image, "
    "at each run's validation threshold; named after the folder unless NAME= is given); "
    "repeatable, and added to the study file's [[external]] sets.",
)
@click.option("--only", default=None, help="Comma-separated experiment names to run.")
@click.option("--report-only", is_flag=True, help="Remake the report from the run folders.")
def study(study_file, data, out, weights, image_size, epochs, eval_data, only, report_only):
    """Run every experiment of a study file (default: the seed study) and write its report."""
    from pneumojax import external  # noqa: PLC0415
    from pneumojax.experiments import ExperimentError, load_study  # noqa: PLC0415
    from pneumojax.report import write_study_files  # noqa: PLC0415
    from pneumojax.study import run_study, study_report  # noqa: PLC0415

    try:
        spec = load_study(Path(study_file)) if study_file else load_study()
        sets = external.merge(spec.external, external.parse_eval_data(eval_data))
    except (ExperimentError, external.ExternalError, OSError) as e:
        _fail(_text(e), 2)

    overrides = {
        k: v
        for k, v in (
            ("data", data),
            ("weights", weights),
            ("image_size", image_size),
            ("epochs", epochs),
        )
        if v is not None
    }
    chosen = [n.strip() for n in only.split(",") if n.strip()] if only else None
    out = Path(out)
    sets = external.remember(out, sets)
    for s in sets:
        if not s.folder.is_dir():
            click.echo(
                f"warning: external set {s.name}: no folder {s.folder}; the study runs without "
                "it (set its path in the study file or give --eval-data NAME=PATH)",
                err=True,
            )
    outcomes = []
    if not report_only:
        from pneumojax.train import Interrupted  # noqa: PLC0415

        try:
            found = tuple(s for s in sets if s.folder.is_dir())
            outcomes = run_study(spec, out, overrides, found, chosen, log=click.echo)
        except ValueError as e:
            _fail(_text(e), 2)
        except (Interrupted, KeyboardInterrupt) as e:  # (Ctrl-C outside the epochs: no message)
            click.echo(
                f"{e or 'interrupted'}\ncontinue with the same pneumojax study command", err=True
            )
            sys.exit(130)
    report = study_report(spec, out, outcomes, sets)
    for path in write_study_files(report, out):
        click.echo(f"wrote {path}")
    if report["target"] is not None:
        from pneumojax.report import target_table  # noqa: PLC0415

        title, _, rows = target_table(report)
        click.echo(title + "".join(f"\n  {k}: {v} (target {t}): {w}" for k, t, v, w in rows))
    from pneumojax.report import external_summary_lines  # noqa: PLC0415

    for line in external_summary_lines(report):
        click.echo(line)
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed or report["missing"]:
        click.echo(f"not finished: {', '.join(failed or report['missing'])}", err=True)
        sys.exit(1)


def _log_above_bars(line: str):
    from pneumojax.progress import write  # noqa: PLC0415

    write(line)


def _text(e: Exception) -> str:
    # KeyError's str() adds quotes around the message.
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


if __name__ == "__main__":
    main()
