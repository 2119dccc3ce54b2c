"""The batches of one training epoch: how many (:func:`batches_per_epoch`), and each
member's order of its train indices drawn from (seed, epoch, member) alone, the batches
sharded with a member axis and prepared ahead in a background thread (:func:`epoch_batches`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from pneumojax.config import FitOptions
from pneumojax.runcheckpoints import Progress
from pneumojax.step import Steps


def batches_per_epoch(members: list[np.ndarray], batch_size: int, devices: int) -> int:
    """The steps of an epoch: as many full batches as the smallest member's train indices fill
    (the rest are left out that epoch)."""
    if batch_size % devices:
        raise ValueError(f"--batch-size {batch_size} is not a multiple of the {devices} devices")
    smallest = min(len(m) for m in members)
    if smallest < batch_size:
        raise ValueError(
            f"the train split has {smallest} images, fewer than one batch of {batch_size}"
        )
    return smallest // batch_size


def epoch_batches(
    steps: Steps,
    train: tuple,
    members: list[np.ndarray],
    opts: FitOptions,
    epoch: int,
    progress: Progress,
):
    """The epoch's remaining batches, sharded with a member axis, prepared ahead.

    Each member's order is drawn from (seed, epoch, member) alone, so a resumed epoch
    continues the same order."""
    inputs, labels, weights = train
    orders = [
        m[np.random.default_rng([opts.seed, epoch, i]).permutation(len(m))]
        for i, m in enumerate(members)
    ]

    def make_batch(b):
        idx = [np.sort(o[b * opts.batch_size : (b + 1) * opts.batch_size]) for o in orders]
        return steps.shard(
            {
                "image": jax.tree.map(lambda a: np.stack([np.asarray(a[i]) for i in idx]), inputs),
                "label": np.stack([labels[i] for i in idx]),
                "weight": np.stack([weights[i] for i in idx]).astype(np.float32),
            },
            members=True,
        )

    return prefetch(make_batch, range(progress.batch, progress.steps_per_epoch))


def prefetch(make: Callable[[int], Any], indices, depth: int = 2):
    """Yields ``make(i)`` for each index, preparing the next ones in a background thread so
    batch assembly and host-to-device copies overlap the running step."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    indices = list(indices)
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(make, i) for i in indices[:depth]]
        for n in range(len(indices)):
            if n + depth < len(indices):
                futures.append(pool.submit(make, indices[n + depth]))
            yield futures[n].result()
            futures[n] = None
