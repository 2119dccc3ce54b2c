#!/usr/bin/env python
"""Where one pneumojax train step spends its time, by kind of operation and by layer.

Runs a study configuration's real train step (``Steps.train``, no feature cache; the
weights' values do not change its speed, so Keras-style random ones are used), records an XLA
profile of a few steps and attributes every executed XLA:CPU operation to a kind:
convolution forward, convolution input gradient, convolution weight gradient, pooling,
matrix products, layout copies, and elementwise fusions (BatchNorm, ReLU, Adam, ...).
This is the profile behind the throughput tables: it shows whether a gap to Keras comes from
the convolution kernels themselves or from work around them.

Usage: ``python benchmarks/profile_step.py --config 4 [--batch-size 32] [--image-size 256]
[--steps 3] [--out benchmarks/results/profile-config4-cpu.json]``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # this process only, before JAX starts (not when imported)
    # Per-operation trace events on CPU.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()
    # Convolutions: YNNPACK's, not XLA's own (the option pneumojax sets, pneumojax/xla_flags.py).
    # XLA's own run asynchronously on its thread pool, so their trace events time only the
    # launch and the profile would miss most of the step; YNNPACK's run inside their events.
    # On the AMD EPYC machine the two steps are within 4% (results/levers-amd-cpu.md); on the
    # Intel Xeon XLA's own were 1.06-1.38x faster, so there this profiles the slower kernels.
    # PNEUMOJAX_XLA_DEFAULTS=1 profiles the default anyway.
    os.environ.setdefault("PNEUMOJAX_XLA_DEFAULTS", "0")


def convolutions() -> str:
    """Which convolution kernels the profiled step ran."""
    if os.environ.get("PNEUMOJAX_XLA_DEFAULTS", "1") != "0":
        return "XLA's own (asynchronous: most of their time is missing below)"
    return (
        "YNNPACK's (PNEUMOJAX_XLA_DEFAULTS=0: pneumojax's default, XLA's own, cannot be timed "
        "per operation)"
    )


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from throughput import (
    CONFIGS,
    fixed_batch,
    pneumojax_step,  # noqa: E402
    study_class_weights,
)

KINDS = (
    "convolution forward",
    "convolution input gradient",
    "convolution weight gradient",
    "pooling",
    "matrix products",
    "layout copies",
    "elementwise fusions and other",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=int, choices=sorted(CONFIGS), required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up)")
    p.add_argument("--top", type=int, default=12, help="slowest operations to list")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output, markdown beside it (default benchmarks/results/profile-config<N>.json)",
    )
    return p.parse_args(argv)


def hlo_operations(hlo_text: str) -> dict[str, dict]:
    """Every instruction of the optimized HLO module: its opcode, result shape, op_name and,
    for fusions, the operations inside the fused computation."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = []
        elif current is not None and line.startswith("  "):
            bodies[current].append(line)
    ops = {}
    for lines in bodies.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(", line)
            if not m:
                continue
            name, _, dims, opcode = m.groups()
            called = re.search(r"calls=%?([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[name] = {
                "opcode": opcode,
                "shape": [int(d) for d in dims.split(",") if d],
                "op_name": op_name.group(1) if op_name else "",
                "inner": bodies.get(called.group(1), []) if called else [],
            }
    return ops


def classify(op: dict, batch: int) -> tuple[str, str]:
    """(kind, layer) of one executed instruction."""
    lines = [f' = {op["shape"]} {op["opcode"]}( op_name="{op["op_name"]}"'] + op["inner"]
    text = "\n".join(lines)
    conv = next((line for line in op["inner"] if " convolution(" in line), None)
    if op["opcode"] == "convolution":
        conv = f"%x = f32[{','.join(map(str, op['shape']))}] convolution( {text}"
    layer = _layer(conv or text)
    if conv:
        # A weight gradient contracts over the batch: its result is kernel-shaped.
        out = re.search(r"= \w+\[([\d,]*)\]", conv)
        first = int(out.group(1).split(",")[0]) if out and out.group(1) else batch
        if first != batch:
            return "convolution weight gradient", layer
        return (
            "convolution input gradient" if "transpose(" in conv else "convolution forward"
        ), layer
    if re.search(r" (reduce-window|select-and-scatter)\(", text):
        return "pooling", layer
    if re.search(r" dot\(", text):
        return "matrix products", layer
    moves = [
        bool(re.search(r" (parameter|copy|transpose|bitcast)\(", line))
        for line in op["inner"]
        if " = " in line
    ]
    if op["opcode"] in ("copy", "transpose") or (op["opcode"] == "fusion" and moves and all(moves)):
        return "layout copies", layer
    return "elementwise fusions and other", layer


def _layer(text: str) -> str:
    names = re.findall(r"/(?:backbone\._apply/)?([A-Za-z][\w]*?)/[\w\-]+\"", text)
    names = [n for n in names if n not in ("backbone", "Classifier", "jvp", "transpose")]
    return collections.Counter(names).most_common(1)[0][0] if names else "-"


def profile(args) -> dict:
    import jax  # noqa: PLC0415

    cfg = CONFIGS[args.config]
    n = args.batch_size
    _, steps, variables = pneumojax_step(
        cfg.backbone, cfg.cut, cfg.trainable, args.image_size, seed=0
    )
    images, labels, weights = fixed_batch(
        {
            "batch_size": n,
            "image_size": args.image_size,
            "seed": 0,
            "class_weights": study_class_weights() if cfg.class_weights else None,
        }
    )
    batch = steps.shard(
        {"image": images[None], "label": labels[None], "weight": weights[None]}, members=True
    )
    keys = jax.random.key(0)[None]
    state = steps.init_state([variables])
    hlo = steps.train.lower(state, batch, keys).compile().as_text()
    ops = hlo_operations(hlo)
    for _ in range(2):
        state, _ = steps.train(state, batch, keys)
        jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, _ = steps.train(state, batch, keys)
            jax.block_until_ready(state)
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps  # ms per step
    kinds = collections.Counter()
    rows = []
    for name, ms in per_op.items():
        kind, layer = classify(ops[name], n)
        kinds[kind] += ms
        rows.append(
            {
                "op": name,
                "kind": kind,
                "layer": layer,
                "ms": round(ms, 2),
                "shape": ops[name]["shape"],
            }
        )
    rows.sort(key=lambda r: -r["ms"])
    total = sum(kinds.values())
    return {
        "config": args.config,
        "label": cfg.label,
        "batch_size": n,
        "image_size": args.image_size,
        "steps": args.steps,
        "wall_ms_per_step": round(wall * 1e3, 1),
        "images_per_s": round(n / wall, 2),
        "op_ms_per_step": round(total, 1),
        "kinds": {k: round(kinds[k], 1) for k in KINDS},
        "convolutions": convolutions(),
        "top": rows[: args.top],
        "hardware": common.hardware(),
        "versions": common.versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def render_markdown(p: dict) -> str:
    total = p["op_ms_per_step"] or 1.0
    lines = [
        f"## Profile of one train step: config {p['config']} ({p['label']})",
        "",
        f"{p['batch_size']} images of {p['image_size']} px, float32, "
        f"{p['steps']} profiled steps: {p['wall_ms_per_step']} ms per step "
        f"({p['images_per_s']} img/s). XLA:CPU operations ran for {p['op_ms_per_step']} ms "
        "per step in all (operations on different cores overlap, so this can exceed the "
        "wall time).",
        "",
        f"Convolutions: {p.get('convolutions', 'YNNPACK' + chr(39) + 's')}.",
        "",
        f"Command: `{p['command']}`",
        "",
        common.markdown_table(
            ["kind of operation", "ms per step", "share"],
            [[k, f"{v:.1f}", f"{v / total:.0%}"] for k, v in p["kinds"].items()],
        ),
        "",
        "Slowest operations:",
        "",
        common.markdown_table(
            ["operation", "kind", "layer", "result shape", "ms per step"],
            [
                [
                    r["op"],
                    r["kind"],
                    f"`{r['layer']}`",
                    "×".join(map(str, r["shape"])),
                    f"{r['ms']:.1f}",
                ]
                for r in p["top"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"profile-config{args.config}.json"
    payload = profile(args)
    markdown = render_markdown(payload)
    common.write_outputs(out, payload, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
