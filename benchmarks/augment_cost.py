#!/usr/bin/env python
"""What ``--device-augment`` costs: the augmented train step against the plain one, in one
process, interleaved, several rounds (a shared machine slows every variant alike).

Four calls are timed in each round, one after the other, each on its own state:

* ``plain``: ``Steps.train`` of the full classifier on uint8 images, no augmentation;
* ``augmented``: the same step with the augmentation inside it (what a run with
  ``--device-augment`` trains with);
* ``augment alone``: the jitted :func:`pneumojax.augment.augment` of one batch;
* ``cached``: the trainable suffix's step on cached activations, what a run *without*
  augmentation trains with when its first layers are frozen (augmentation gives that up: the
  frozen prefix must see every augmented batch). Only where a frozen prefix exists.

Reported: each call's median seconds, the augmentation's share of the augmented step
((augmented - plain) / augmented, and augment alone / plain), the median of the per-round
ratios, the load average and the cores the process kept busy.

Usage: ``python benchmarks/augment_cost.py [--backbone inception_v3 --cut conv2d_86
--trainable conv2d_44:average_pooling2d_4] [--image-size 128] [--batch-size 32]
[--augment strong] [--rounds 5] [--steps 3] [--out benchmarks/results/augment-cost-cpu.json]``.
Random weights: a step's speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="inception_v3")
    p.add_argument("--cut", default="conv2d_86")
    p.add_argument("--trainable", default="conv2d_44:average_pooling2d_4")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="strong", help="a --device-augment value")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed calls per variant and round")
    p.add_argument("--out", type=Path, default=None, help="JSON output (markdown beside it)")
    return p.parse_args(argv)


def build(args):
    """The variants' callables, each closing over its own state (the steps donate it)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from pneumojax.augment import augment, parse_augment  # noqa: PLC0415
    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.features import cacheable_frontier  # noqa: PLC0415
    from pneumojax.runmodel import RunModel  # noqa: PLC0415
    from pneumojax.model import build_classifier, init_variables, make_plan  # noqa: PLC0415
    from pneumojax.optim import make_optimizer
    from pneumojax.step import Steps, make_mesh  # noqa: PLC0415

    spec = parse_augment(args.augment)
    info = get_backbone(args.backbone)
    plan = make_plan(info, args.cut, args.trainable, args.image_size)
    model = build_classifier(info, plan.cut, plan.trainable_layers)
    variables = init_variables(model, args.image_size, 0)
    mesh = make_mesh()
    tx = make_optimizer(variables["params"], plan.trainable_layers, 1e-3)
    rng = np.random.default_rng(0)
    n, size = args.batch_size, args.image_size
    images = rng.integers(0, 256, (1, n, size, size, 3), np.uint8)
    labels, weights = rng.integers(0, 2, (1, n)).astype(np.int32), np.ones((1, n), np.float32)
    keys = jax.random.key(0)[None]

    def stepper(steps, inputs):
        batch = steps.shard({"image": inputs, "label": labels, "weight": weights}, members=True)
        box = [steps.init_state([variables])]

        def call():
            box[0], metrics = steps.train(box[0], batch, keys)
            jax.block_until_ready(metrics)

        return call

    calls = {
        "plain": stepper(Steps(model, tx, mesh), images),
        "augmented": stepper(Steps(model, tx, mesh, augment=spec), images),
    }
    jitted = jax.jit(lambda k, x: augment(k, x, spec))
    one = jax.device_put(jnp.asarray(images[0]))
    calls["augment alone"] = lambda: jax.block_until_ready(jitted(jax.random.key(1), one))
    frontier = cacheable_frontier(info, plan.cut, plan.trainable_layers)
    if frontier:
        run_model = RunModel.build(
            info,
            plan.cut,
            plan.trainable_layers,
            "float32",
            frontier,
            "auto",
            size,
            variables,
            n,
            mesh,
            make_optimizer,
            1e-3,
        )
        acts = run_model.inputs(images[0])
        own = run_model.own_variables(variables)
        steps = run_model.steps
        batch = steps.shard(
            {"image": jax.tree.map(lambda a: a[None], acts), "label": labels, "weight": weights},
            members=True,
        )
        box = [steps.init_state([own])]

        def cached():
            box[0], metrics = steps.train(box[0], batch, keys)
            jax.block_until_ready(metrics)

        calls["cached"] = cached
    return plan, spec, frontier, calls


def measure(args) -> dict:
    import jax  # noqa: PLC0415

    plan, spec, frontier, calls = build(args)
    compile_s = {}
    for name, call in calls.items():  # first call: trace and compile; one more to warm up
        t = time.perf_counter()
        call()
        compile_s[name] = time.perf_counter() - t
        call()
    times = {name: [] for name in calls}
    load, cpu0, wall0 = [os.getloadavg()[0]], common.cpu_seconds(), time.perf_counter()
    for _ in range(args.rounds):
        for name, call in calls.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    cores = (common.cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    per_round = lambda name: np.median(  # noqa: E731
        np.asarray(times[name]).reshape(args.rounds, args.steps), axis=1
    )
    share = (per_round("augmented") - per_round("plain")) / per_round("augmented")
    return {
        "settings": {
            "backbone": args.backbone,
            "cut": plan.cut,
            "trainable": args.trainable,
            "trainable_params": plan.trainable_params,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "device_augment": str(spec),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "frozen_prefix_cached_without_augmentation": list(frontier),
        },
        "devices": f"{jax.device_count()} x {jax.default_backend()}",
        "hardware": common.hardware(),
        "versions": common.versions(),
        "load_average_1min": {"min": min(load), "max": max(load)},
        "cores_used": cores,
        "first_call_s": compile_s,
        "median_s": med,
        "augmentation_share_of_augmented_step": {
            "median_of_rounds": float(np.median(share)),
            "per_round": [float(x) for x in share],
        },
        "augment_alone_over_plain_step": med["augment alone"] / med["plain"],
        **({"cached_over_plain_step": med["cached"] / med["plain"]} if "cached" in med else {}),
    }


def markdown(r: dict) -> str:
    s = r["settings"]
    rows = [[name, f"{t:.3f}"] for name, t in r["median_s"].items()]
    lines = [
        f"# --device-augment cost: {s['backbone']} cut {s['cut']}, trainable {s['trainable']}, "
        f"{s['image_size']} px, batch {s['batch_size']}, {r['devices']}",
        "",
        f"Augmentation `{s['device_augment']}`; {s['rounds']} interleaved rounds of "
        f"{s['steps_per_round']} calls each; 1-min load average {r['load_average_1min']['min']:.2f}"
        f"-{r['load_average_1min']['max']:.2f} on {r['hardware'].get('cpu_count', '?')} cores "
        f"(shared with other work), the process kept {r['cores_used']:.2f} cores busy.",
        "",
        common.markdown_table(["call", "median s"], rows),
        "",
        "augmentation's share of the augmented step: "
        f"{100 * r['augmentation_share_of_augmented_step']['median_of_rounds']:.1f}% "
        "(median of rounds; per round "
        + ", ".join(
            f"{100 * x:.1f}%" for x in r["augmentation_share_of_augmented_step"]["per_round"]
        )
        + f"); augment alone / plain step: {100 * r['augment_alone_over_plain_step']:.1f}%",
    ]
    if "cached_over_plain_step" in r:
        lines += [
            "",
            f"without augmentation the run would train on cached activations of "
            f"{', '.join(s['frozen_prefix_cached_without_augmentation'])}: that step takes "
            f"{100 * r['cached_over_plain_step']:.0f}% of the plain full step",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    text = markdown(result)
    print(text)
    if args.out is not None:
        common.write_outputs(args.out, result, text)


if __name__ == "__main__":
    main()
