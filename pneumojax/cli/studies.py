"""The commands over many runs: ``compare`` (several runs' test figures side by side) and
``study`` (every experiment of a study file, then its report)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pneumojax.cli.errors import error_text, fail
from pneumojax.options import POSITIVE


@click.command()
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
        fail(error_text(e))
    click.echo(comparison_table(rows))
    try:
        click.echo(f"chart: {plot_comparison(rows, out)}")
    except OSError as e:
        fail(f"cannot write the chart {out}: {e}")


@click.command()
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
        fail(error_text(e), 2)

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
            fail(error_text(e), 2)
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
