"""What a trained run leaves: thresholds chosen on validation and the test figures, every
validation and test probability (:func:`finish_run`), the head scaled by ``--calibrate
temperature`` (:func:`calibrated`), the saved model (:func:`save_model`), then
``metrics.json``, the history plot, TensorBoard's test figures and the model card
(:func:`write_results`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax

from pneumojax import data
from pneumojax.checkpoint import save_variables
from pneumojax.config import TrainConfig
from pneumojax.features import merge_variables
from pneumojax.metrics import format_metrics
from pneumojax.modelcard import write_model_card
from pneumojax.plots import plot_history
from pneumojax.predictions import write_predictions
from pneumojax.runcheckpoints import Progress
from pneumojax.runmodel import RunModel, split_probabilities, stack_members
from pneumojax.scoring import combine_rule, score_split, validation_thresholds
from pneumojax.tensorboard import EventLog
from pneumojax.tta import run_tta
from pneumojax.workspace import write_json


def finish_run(
    run_dir: Path,
    cfg: TrainConfig,
    run_model: RunModel,
    inputs: dict,
    arrays: dict,
    splits: data.Splits,
    log: Callable[[str], None],
) -> dict:
    """Thresholds on validation, figures and plots on test; every validation and test
    probability saved (operating points and paired tests are recomputed from them).

    With ``--tta N`` both validation and test are scored with the same test-time
    augmentation, so the thresholds are chosen on the probabilities they are applied to. The
    members combine by the run's rule (:func:`pneumojax.scoring.combine_rule`)."""
    tta = run_tta(dataclasses.asdict(cfg))
    if tta is None:
        p_val = run_model.member_probabilities(inputs["val"])
        p_test = run_model.member_probabilities(inputs["test"], desc="predict test")
    else:
        log(f"test-time augmentation: validation and test scored with {tta.describe()}")
        p_val = split_probabilities(run_model, arrays["val"][0], None, tta, "val")
        p_test = split_probabilities(run_model, arrays["test"][0], None, tta, "test")
    if jax.process_index() != 0:  # process 0 alone writes the run folder
        return {}
    thresholds = validation_thresholds(
        arrays["val"][1], p_val, cfg.target_recall, combine_rule(cfg)
    )
    metrics = score_split(
        arrays["test"][1], p_test, thresholds, cfg.target_recall, run_dir / "plots", "test"
    )
    if tta is not None:
        metrics["tta"] = tta.record()
    write_predictions(run_dir / "predictions" / "val.csv", splits.val, p_val)
    write_predictions(run_dir / "predictions" / "test.csv", splits.test, p_test)
    return metrics


def calibrated(run_model: RunModel, best: list[dict], val_inputs, y_val, log) -> tuple:
    """``--calibrate temperature``: each member's head scaled by the T fitted on validation."""
    from pneumojax.calibration import fit_temperature, scale_head  # noqa: PLC0415
    from pneumojax.step import member_logits  # noqa: PLC0415

    z = member_logits(run_model.steps, run_model.variables, val_inputs, run_model.batch_size)
    temperature = fit_temperature(z[..., 1], y_val)
    log(
        f"temperature scaling: T = {temperature:.3f} fitted on validation (log loss of the "
        "PNEUMONIA probability), written into the head"
    )
    return [scale_head(b, temperature) for b in best], temperature


def save_model(
    folder: Path,
    member_vars: list[dict],
    best: list[dict],
    plan,
    image_size: int,
    thresholds: list[float],
):
    """The finished model: each member's trained part merged into its full variables (the
    frozen backbone as it was), stacked, with what scoring needs in the manifest."""
    full = stack_members([merge_variables(v, b) for v, b in zip(member_vars, best)])
    save_variables(
        folder,
        full,
        {
            "backbone": plan.backbone,
            "cut": plan.cut,
            "image_size": image_size,
            "members": len(best),
            "thresholds": thresholds,
        },
        overwrite=True,
    )


def write_results(
    run_dir: Path,
    cfg: TrainConfig,
    metrics: dict,
    progress: Progress,
    events: EventLog,
    log: Callable[[str], None],
) -> None:
    """A finished run's metrics.json, history plot, TensorBoard test figures and model card."""
    write_json(run_dir / "metrics.json", metrics)
    plot_history(progress.history, run_dir / "plots" / "history.png")
    events.finish(progress.history, metrics, dataclasses.asdict(cfg), run_dir / "plots")
    write_model_card(run_dir)
    log(format_metrics(metrics))
    log(f"run folder: {run_dir} (its model card: MODEL_CARD.md)")
