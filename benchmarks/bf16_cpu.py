#!/usr/bin/env python
"""Does XLA:CPU compute in bfloat16 where the CPU can (AVX512-BF16, AMX-BF16)?

Three measurements in one process, on whatever CPU this runs on:

* one matrix product (2048 x 2048) and one 3x3 convolution (batch 32, 56 x 56 x 128 -> 128), in
  float32 and in bfloat16 (float32 accumulation), GFLOP/s as the median of timed calls;
* what the compiled programs do with bfloat16 operands: the dtype each convolution and dot
  runs in after XLA's passes, and whether it became a YNNPACK fusion;
* the same census for a whole pneumojax train step (``--config``, default 7, the no-ImageNet
  recipe's DenseNet121 with every layer trained, 64 px, batch 32) built in bfloat16.

Usage: ``python benchmarks/bf16_cpu.py [--config 7] [--image-size 64] [--batch-size 32]
[--quick] [--out benchmarks/results/bf16-cpu.json]`` (writes the JSON and a markdown table
beside it).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pneumojax  # noqa: E402, F401  (its XLA:CPU options, set before JAX starts, as pneumojax runs)

# "%name = f32[...]{...} convolution(%a, %b)" and its operands' declarations.
_OP = re.compile(r"%(\S+) = (\w+)\[[^\]]*\]\S* (convolution|dot)\((%[^,]+), (%[^)]+)\)")
_DECL = re.compile(r"%(\S+) = (\w+)\[")
DTYPES = ("float32", "bfloat16")
QUICK_CUT = {"densenet121": "conv2_block3_concat"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=int, default=7, help="throughput.py's configuration number")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    p.add_argument("--out", default=str(common.REPO / "benchmarks" / "results" / "bf16-cpu.json"))
    return p.parse_args(argv)


def median_seconds(fn, *args, calls: int) -> float:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def census(hlo: str) -> dict:
    """Every convolution and dot of a compiled module: how many, by the dtype of its first
    operand as XLA:CPU finally runs it, and the YNNPACK fusions and converts around them."""
    dtypes = dict(_DECL.findall(hlo))
    counts: dict[str, collections.Counter] = {"convolution": collections.Counter()}
    counts["dot"] = collections.Counter()
    for _, _, op, lhs, _ in _OP.findall(hlo):
        counts[op][dtypes.get(lhs.strip().lstrip("%"), "?")] += 1
    return {
        "convolutions_by_operand_dtype": dict(counts["convolution"]),
        "dots_by_operand_dtype": dict(counts["dot"]),
        "ynn_fusions": hlo.count('"kind":"__ynn_fusion"'),
        "converts": len(re.findall(r" convert\(", hlo)),
    }


def kernels(quick: bool) -> list[dict]:
    """GFLOP/s of one matmul and one convolution in each dtype, and their compiled census."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    n = 512 if quick else 2048
    batch, side, ch = (4, 16, 32) if quick else (32, 56, 128)
    calls = 3 if quick else 10
    key = jax.random.key(0)

    def matmul(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )  # fmt: skip

    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jax.random.normal(key, (n, n)).astype(dtype)
        x = jax.random.normal(key, (batch, side, side, ch)).astype(dtype)
        w = jax.random.normal(key, (3, 3, ch, ch)).astype(dtype)
        cases += [
            ("matmul", dtype, jax.jit(matmul), (a, a.T), 2 * n**3),
            ("conv 3x3", dtype, jax.jit(conv), (x, w), 2 * batch * side * side * ch * ch * 9),
        ]
    # Rounds over every case in turn, so a machine that slows down or speeds up during the run
    # (other processes) shifts every case alike; each case's figure is its median over rounds.
    seconds = collections.defaultdict(list)
    for _ in range(1 if quick else 5):
        for i, (_, _, fn, args, _) in enumerate(cases):
            seconds[i].append(median_seconds(fn, *args, calls=calls))
    rows = []
    for i, (name, dtype, fn, args, flops) in enumerate(cases):
        rows.append(
            {
                "kernel": name,
                "dtype": jnp.dtype(dtype).name,
                "gflops": flops / float(np.median(seconds[i])) / 1e9,
                "gflops_per_round": [flops / s / 1e9 for s in seconds[i]],
                **census(fn.lower(*args).compile().as_text()),
            }
        )
    return rows


def _train_step(cfg, image_size: int, batch_size: int, dtype):
    """(step function, its arguments) of pneumojax's train step computing in ``dtype``
    (float32 parameters and optimizer state either way, as ``--precision`` does)."""
    import jax  # noqa: PLC0415

    from throughput import fixed_batch, pneumojax_step  # noqa: PLC0415

    _, steps, variables = pneumojax_step(
        cfg.backbone, cfg.cut, cfg.trainable, image_size, 0, dtype=dtype
    )
    job = {"batch_size": batch_size, "image_size": image_size, "seed": 0, "class_weights": None}
    images, labels, weights = fixed_batch(job)
    batch = {"image": images[None], "label": labels[None], "weight": weights[None]}
    args = (steps.init_state([variables]), steps.shard(batch, members=True))
    return steps.train, (*args, jax.random.key(0)[None])


def train_steps(config: int, image_size: int, batch_size: int, rounds: int, quick=False) -> dict:
    """The train step in float32 and in bfloat16: images/s (median over interleaved rounds of
    a few calls each, the state fed back as training does) and the bfloat16 step's census."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from throughput import CONFIGS  # noqa: PLC0415

    cfg = CONFIGS[config]
    if quick:  # the backbone's first blocks only: the same kinds of layers, compiled in seconds
        cfg = dataclasses.replace(cfg, cut=QUICK_CUT.get(cfg.backbone, cfg.cut))
    steps = {d: _train_step(cfg, image_size, batch_size, getattr(jnp, d)) for d in DTYPES}
    state = {d: steps[d][1][0] for d in DTYPES}
    seconds = {d: [] for d in DTYPES}
    for _ in range(rounds + 1):  # the first round compiles and warms up; not counted
        for d in DTYPES:
            fn, (_, batch, keys) = steps[d]
            calls = []
            for _ in range(3):
                t = time.perf_counter()
                state[d], metrics = fn(state[d], batch, keys)
                jax.block_until_ready((state[d], metrics))
                calls.append(time.perf_counter() - t)
            seconds[d].append(float(np.median(calls)))
    fn, args = steps["bfloat16"]
    return {
        "config": config,
        "label": cfg.label + ("" if cfg.cut == CONFIGS[config].cut else f", cut at {cfg.cut}"),
        "image_size": image_size,
        "batch_size": batch_size,
        "images_per_s": {d: batch_size / float(np.median(seconds[d][1:])) for d in DTYPES},
        "images_per_s_per_round": {d: [batch_size / s for s in seconds[d][1:]] for d in DTYPES},
        **census(fn.lower(*args).compile().as_text()),
    }


def render_markdown(payload: dict) -> str:
    hw = payload["hardware"]
    lines = [
        "## bfloat16 on XLA:CPU: what runs in bfloat16",
        "",
        f"CPU: {hw['cpu']} ({hw['usable_cores']} usable cores); bfloat16 instructions: "
        f"{', '.join(payload['cpu_bf16_flags']) or 'none found'}. jaxlib "
        f"{payload['versions'].get('jaxlib', payload['versions'].get('jax'))}. Command: `{payload['command']}`.",
        "",
        "| kernel | dtype | GFLOP/s (median of rounds; each round) | convolutions / dots by operand dtype after compilation "
        "| YNNPACK fusions | converts |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["kernels"]:
        ops = {**r["convolutions_by_operand_dtype"], **r["dots_by_operand_dtype"]}
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['gflops']:.1f} "
            f"({', '.join(f'{g:.0f}' for g in r['gflops_per_round'])}) | "
            f"{', '.join(f'{k}: {v}' for k, v in ops.items())} | {r['ynn_fusions']} | "
            f"{r['converts']} |"
        )
    s = payload["train_step"]
    rate = {d: f"{s['images_per_s'][d]:.1f}" for d in DTYPES}
    rounds = {d: ", ".join(f"{r:.1f}" for r in s["images_per_s_per_round"][d]) for d in DTYPES}
    lines += [
        "",
        f"pneumojax's train step, configuration {s['config']} ({s['label']}, {s['image_size']} "
        f"px, batch {s['batch_size']}), images/s (median of interleaved rounds; each round): "
        f"float32 {rate['float32']} ({rounds['float32']}), bfloat16 {rate['bfloat16']} "
        f"({rounds['bfloat16']}); bfloat16 / float32 "
        f"{s['images_per_s']['bfloat16'] / s['images_per_s']['float32']:.2f}x.",
        "",
        "The bfloat16 step after compilation: convolutions by operand dtype "
        f"{s['convolutions_by_operand_dtype']}, dots {s['dots_by_operand_dtype']}, "
        f"{s['ynn_fusions']} YNNPACK fusions, {s['converts']} converts.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    size, batch = (32, 4) if args.quick else (args.image_size, args.batch_size)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    payload = {
        "benchmark": "bf16_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": common.hardware(),
        "cpu_bf16_flags": sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile)\b", flags))),
        "kernels": kernels(args.quick),
        "train_step": train_steps(args.config, size, batch, 1 if args.quick else 4, args.quick),
    }
    payload["versions"] = common.versions()  # after JAX is imported
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(payload))
    print(render_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
