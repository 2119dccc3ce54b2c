"""The commands that use a finished run (``--run``): ``evaluate`` it on data, ``adapt`` it to
another site, score images with it (``predict``, and ``serve`` over HTTP), ``explain`` where it
looks, and ``export`` its scoring path as one model file."""

from __future__ import annotations

import sys

import click

from pneumojax.cli.errors import describe_os_error, error_text, fail
from pneumojax.options import DTYPES, NON_NEGATIVE, _AugmentSpecType


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


@click.command()
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
            fail(error_text(e))
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
        fail(error_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        fail(error_text(e))


@click.command()
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
        fail("--no-bn --no-prior --threshold keep would change nothing", 2)
    try:
        adapt_run(run_dir, data, out, AdaptOptions(bn, prior, threshold), overwrite, log=click.echo)
    except FileExistsError as e:
        fail(error_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        fail(describe_os_error(e) if isinstance(e, OSError) else error_text(e))


@click.command()
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
        fail(error_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        fail(error_text(e))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        w = csv.DictWriter(sys.stdout, fieldnames=["path", "p_pneumonia", "label", "threshold"])
        w.writeheader()
        w.writerows(rows)


@click.command()
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
        fail(error_text(e))


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


@click.command()
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
        fail(f"pneumojax serve needs {e.name or 'FastAPI'}: pip install 'pneumojax[serve]'")
    options = ServeOptions(max_batch, batch_window_ms, max_upload_mb, max_files)
    try:
        serve_run(run_dir, host, port, options, batch_sizes, not no_explain, log=click.echo)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        fail(error_text(e))


@click.command()
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
        fail(error_text(e), 2)
    except (ValueError, OSError, CheckpointError, DataError) as e:
        fail(error_text(e))
