"""benchmarks/input_share.py: the wait for each batch is timed, the rest of the epoch is not."""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import input_share  # noqa: E402


def test_the_clock_counts_the_wait_for_batches_not_the_work_between_them():
    def slow_batches(n, delay):
        for i in range(n):
            time.sleep(delay)  # the input side: assembling the batch
            yield i

    clock = input_share.WaitClock()
    epoch = clock.wrap(slow_batches)
    for _ in epoch(3, 0.05):
        time.sleep(0.1)  # the step: not waiting for input
    (record,) = clock.epochs
    assert record["batches"] == 3 and clock.batches == 3
    assert 0.15 <= record["wait_s"] < 0.3 <= record["loop_s"]
    assert clock.wait_s == record["wait_s"]


def test_the_table_gives_each_epochs_share():
    payload = {
        "hardware": {"cpu": "test CPU", "usable_cores": 2},
        "command": "python benchmarks/input_share.py",
        "experiment": "recipe",
        "config": {
            "backbone": "densenet121",
            "trainable": "all",
            "image_size": 64,
            "batch_size": 32,
            "seed_ensemble": 2,
            "device_augment": "blur=1.5",
            "intensity": "equalize",
            "epochs": 1,
        },  # fmt: skip
        "epochs": [{"batches": 10, "wait_s": 0.5, "loop_s": 50.0}],
        "input_wait_s": 0.5,
        "epoch_loops_s": 50.0,
        "input_share_of_epochs": 0.01,
        "train_run_s": 80.0,
    }
    table = input_share.render_markdown(payload)
    assert "| 1 | 10 | 50.0 | 0.50 | 1.0% |" in table
    assert "0.50 s of 50.0 s" in table


def test_an_epoch_whose_loop_stops_asking_is_still_counted():
    """fit zips the batches with its progress bar, so the iterator is never exhausted."""
    clock = input_share.WaitClock()
    epoch = clock.wrap(lambda: iter(range(10)))
    for _ in zip(range(4), epoch()):
        pass
    assert clock.batches == 4 and len(clock.epochs) == 1
