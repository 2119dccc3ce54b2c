"""The XLA:CPU options pneumojax sets for itself (pneumojax/xla_flags.py): they take effect,
they change no result beyond float32 rounding, and the user's own settings win."""

import json
import os
import subprocess
import sys

import numpy as np

from pneumojax import xla_flags

from conftest import REPO, TINY_CUT, TINY_MID

FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# A tiny classifier's logits, one train step's loss and updated parameters, and how many
# library (YNNPACK) fusions the compiled step holds.
SCRIPT = f"""
import json, re
import numpy as np
import pneumojax, jax
from pneumojax.backbones import get_backbone
from pneumojax.model import build_classifier, init_variables, make_plan
from pneumojax.optim import make_optimizer
from pneumojax.step import Steps, make_mesh
info = get_backbone("densenet121")
plan = make_plan(info, "{TINY_CUT}", "{TINY_MID}", 32)
model = build_classifier(info, plan.cut, plan.trainable_layers)
variables = init_variables(model, 32, 0, None)
steps = Steps(model, make_optimizer(variables["params"], plan.trainable_layers, 1e-3), make_mesh())
images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
labels = np.array([0, 1] * 4, np.int32)
logits = np.asarray(jax.jit(steps.predict)(variables, images))
state = steps.init_state([variables])
batch = steps.shard({{"image": images[None], "label": labels[None],
                     "weight": np.ones((1, 8), np.float32)}}, members=True)
hlo = steps.train.lower(state, batch, jax.random.key(0)[None]).compile().as_text()
state, metrics = steps.train(state, batch, jax.random.key(0)[None])
kernel = np.concatenate([np.ravel(a)[:64] for a in jax.tree.leaves(state.params)])
print(json.dumps({{"logits": logits.tolist(), "loss": float(metrics["loss"][0]),
                  "kernel": kernel.tolist(), "ynn": hlo.count("kind=kCustom"),
                  "flags": __import__("os").environ.get("XLA_FLAGS", "")}}))
"""


def _run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OPT_OUT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**full, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_option_takes_effect_and_changes_no_result():
    ours = _run()
    plain = _run(PNEUMOJAX_XLA_DEFAULTS="0")
    assert ours["flags"] == f"{FLAG}=-individual_convolution"
    assert plain["flags"] == ""
    # without the option, every convolution is a YNNPACK library fusion as well
    assert plain["ynn"] > ours["ynn"] + 8, (plain["ynn"], ours["ynn"])
    np.testing.assert_allclose(ours["logits"], plain["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["loss"], plain["loss"], rtol=1e-6)
    # One Adam step: where a gradient is near Adam's epsilon its update amplifies the kernels'
    # rounding differences (seen on an AMD EPYC: 1.5e-7 on one weight of 1,538; a step is
    # 1e-3), so the bound is a thousandth of a step.
    np.testing.assert_allclose(ours["kernel"], plain["kernel"], rtol=1e-5, atol=1e-6)


def test_the_users_own_setting_wins():
    mine = _run(XLA_FLAGS=f"{FLAG}= --xla_cpu_enable_fast_math=false")
    assert mine["flags"] == f"{FLAG}= --xla_cpu_enable_fast_math=false"


def test_default_flags_rules():
    v = "0.12.0.1"
    assert xla_flags.default_flags({}, v) == f"{FLAG}=-individual_convolution"
    assert (
        xla_flags.default_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, v)
        == f"--xla_force_host_platform_device_count=4 {FLAG}=-individual_convolution"
    )
    assert xla_flags.default_flags({"XLA_FLAGS": f"{FLAG}=+eltwise"}, v) is None
    for off in ("0", "false", "off"):
        assert xla_flags.default_flags({"PNEUMOJAX_XLA_DEFAULTS": off}, v) is None
    assert xla_flags.default_flags({}, "0.13.0") is None  # not measured there: left alone
