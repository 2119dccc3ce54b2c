#!/usr/bin/env python
"""How much of a training epoch is not the step: the time the training loop waits for its
next batch.

Runs one experiment of a study file (default: the no-ImageNet recipe, every layer trained, so
nothing is cached past the decoded images) for ``--epochs`` epochs with ``train_run``, exactly
as ``pneumojax study`` would, with one addition: the iterator of each epoch's batches
(``batches.epoch_batches``: assembled and copied to the device in a background thread) is
wrapped so that the time the loop spends waiting on it is summed. That wait is the input side
the step does not hide; the rest of the epoch is the step and the loop's own bookkeeping.

Usage: ``python benchmarks/input_share.py --data ../shared/data/chest_xray_train224
[--study configs/no_imagenet.toml] [--experiment recipe] [--epochs 1]
[--out benchmarks/results/input-share-cpu.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pneumojax  # noqa: E402, F401  (its XLA:CPU options, set before JAX starts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data folder to train on")
    p.add_argument("--study", default=str(common.REPO / "configs" / "no_imagenet.toml"))
    p.add_argument("--experiment", default="recipe", help="the study's experiment to run")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="[default: the experiment's]")
    p.add_argument(
        "--out", default=str(common.REPO / "benchmarks" / "results" / "input-share-cpu.json")
    )
    return p.parse_args(argv)


class WaitClock:
    """Wraps each epoch's batch iterator and sums the time spent waiting for a batch."""

    def __init__(self):
        self.epochs: list[dict] = []

    def wrap(self, make_batches):
        def epoch_batches(*args, **kwargs):
            # Updated at every batch: the loop may stop asking (zip with its progress bar)
            # without exhausting the iterator. loop_s runs to the request of the last batch,
            # so it leaves out that batch's step.
            record = {"batches": 0, "wait_s": 0.0, "loop_s": 0.0}
            self.epochs.append(record)
            started = time.perf_counter()
            for batch in _timed(make_batches(*args, **kwargs), record, started):
                yield batch

        return epoch_batches

    @property
    def wait_s(self) -> float:
        return sum(e["wait_s"] for e in self.epochs)

    @property
    def batches(self) -> int:
        return sum(e["batches"] for e in self.epochs)


def _timed(iterator, record: dict, started: float):
    iterator = iter(iterator)
    while True:
        t = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        now = time.perf_counter()
        record["wait_s"] += now - t
        record["batches"] += 1
        record["loop_s"] = now - started
        yield batch


def run(args) -> dict:
    from pneumojax import train as train_module  # noqa: PLC0415
    from pneumojax.experiments import load_study, resolve_options  # noqa: PLC0415
    from pneumojax.run import train_run  # noqa: PLC0415

    study = load_study(args.study)
    experiment = next((e for e in study.experiments if e.name == args.experiment), None)
    if experiment is None:
        names = ", ".join(e.name for e in study.experiments)
        raise SystemExit(f"{args.study} has no experiment {args.experiment!r} (it has {names})")
    clock = WaitClock()
    train_module.epoch_batches = clock.wrap(train_module.epoch_batches)
    with tempfile.TemporaryDirectory(prefix="pneumojax-input-share-") as tmp:
        overrides = {"data": args.data, "epochs": args.epochs, "out": str(Path(tmp) / "run")}
        if args.image_size:
            overrides["image_size"] = args.image_size
        cfg = resolve_options(experiment, study.shared, overrides)
        t0 = time.perf_counter()
        metrics = train_run(cfg, log=lambda m: None)
        total_s = time.perf_counter() - t0
    loop_s = sum(e["loop_s"] for e in clock.epochs)
    return {
        "benchmark": "input_share",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": common.hardware(),
        "versions": common.versions(),
        "experiment": experiment.name,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "backbone",
                "trainable",
                "image_size",
                "batch_size",
                "seed_ensemble",
                "device_augment",
                "intensity",
                "epochs",
            )
        },  # fmt: skip
        "epochs": clock.epochs,
        "batches": clock.batches,
        "input_wait_s": clock.wait_s,
        "epoch_loops_s": loop_s,
        "input_share_of_epochs": clock.wait_s / loop_s if loop_s else None,
        "train_run_s": total_s,
        "test_auc": metrics.get("auc"),
    }


def render_markdown(p: dict) -> str:
    hw, c = p["hardware"], p["config"]
    share = p["input_share_of_epochs"]
    return "\n".join(
        [
            "## The input side of a training epoch",
            "",
            f"CPU: {hw['cpu']} ({hw['usable_cores']} usable cores). Command: `{p['command']}`.",
            f"Experiment `{p['experiment']}`: {c['backbone']}, trainable {c['trainable']}, "
            f"{c['image_size']} px, batch {c['batch_size']}, {c['seed_ensemble']} member(s), "
            f"device augmentation `{c['device_augment']}`, intensity `{c['intensity']}`, "
            f"{c['epochs']} epoch(s).",
            "",
            "| epoch | batches | epoch loop s | waiting for a batch s | share |",
            "|---|---|---|---|---|",
            *(
                f"| {i + 1} | {e['batches']} | {e['loop_s']:.1f} | {e['wait_s']:.2f} | "
                f"{e['wait_s'] / e['loop_s']:.1%} |"
                for i, e in enumerate(p["epochs"])
            ),
            "",
            f"In all: {p['input_wait_s']:.2f} s of {p['epoch_loops_s']:.1f} s of epoch loops "
            f"waiting for input ({share:.1%}); the whole `train_run` took {p['train_run_s']:.1f} s "
            "(decoding or loading the decoded images, the splits, scoring and saving included).",
            "",
        ]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(render_markdown(payload))
    print(render_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
