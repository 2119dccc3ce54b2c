"""XLA:CPU options pneumojax sets for its own process, chosen by measurement.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` makes XLA:CPU run
convolutions with its own kernels instead of YNNPACK's. On the 2-core Intel Xeon this project is
measured on, the real train step then ran 1.15-1.63x faster (InceptionV3 with its middle range
trainable 10.4 -> 17.0 img/s, ResNet50V2 13.7 -> 20.9; benchmarks/results/throughput-cpu.md),
with outputs equal within float32 rounding (tests/test_xla_flags.py).

They are added to ``XLA_FLAGS`` when pneumojax is imported, which works as long as no JAX
computation has run yet in the process (XLA reads the variable when it starts its CPU backend).
A flag the user already gives in ``XLA_FLAGS`` is left as the user set it;
``PNEUMOJAX_XLA_DEFAULTS=0`` turns all of this off. They are set only for the jaxlib versions
they were measured with (the option is experimental, and XLA aborts on an option it does not
know), and they affect only the CPU backend.
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
MEASURED_JAXLIB = ("0.12.",)  # version prefixes the options are known to exist in
OPT_OUT = "PNEUMOJAX_XLA_DEFAULTS"


def turned_off(environ, name: str) -> bool:
    """Whether the environment variable ``name`` turns a pneumojax default off (0/false/no/off)."""
    return environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def default_flags(environ=os.environ, jaxlib_version: str | None = None) -> str | None:
    """The ``XLA_FLAGS`` value to use, or None to leave the environment as it is."""
    if turned_off(environ, OPT_OUT):
        return None
    if jaxlib_version is None:
        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return None
    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return None
    flags = environ.get("XLA_FLAGS", "")
    given = {part.split("=", 1)[0] for part in flags.split()}
    extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    if not extra:
        return None
    return " ".join([flags.strip(), *extra]).strip()


def apply() -> None:
    flags = default_flags()
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags
