"""pneumojax: chest X-ray pneumonia classifiers by transfer learning, in JAX/Flax."""

from pneumojax import xla_flags as _xla_flags

_xla_flags.apply()  # before any JAX computation: XLA reads XLA_FLAGS when its backend starts
