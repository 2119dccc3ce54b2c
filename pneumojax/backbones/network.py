"""One Flax module that runs any Keras-named layer graph up to the requested outputs."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .graph import LayerSpec, ancestors

# Keras initializers, so that an untrained pneumojax model starts like an untrained Keras one.
_KERNEL_INIT = nn.initializers.glorot_uniform()


class KerasGraph(nn.Module):
    """Runs ``layers`` (in Keras order) and returns the outputs of the layers named ``outputs``.

    Only the layers that ``outputs`` depend on are built, so a cut model has no variables
    beyond its cut. Each parametric layer is a submodule named as in Keras.

    ``trainable`` names the layers Keras would train. Frozen BatchNorm runs in inference mode;
    trainable BatchNorm uses batch statistics when ``train`` is true. Outputs that depend on
    no trainable layer are cut off from autodiff, so the frozen prefix costs a forward pass.

    With ``given`` set, the call takes ``{layer_name: value}`` for those layers instead of
    images and computes only what lies after them (training on cached activations).

    ``deltas`` (``{layer_name: array}``) are added to those layers' outputs, and gradients flow
    from them even through frozen layers: the gradient of any output with respect to a zero
    delta is its gradient with respect to that layer's activation (Grad-CAM).
    """

    layers: tuple[LayerSpec, ...]
    outputs: tuple[str, ...]
    trainable: frozenset[str] = frozenset()
    dtype: Any = jnp.float32
    given: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, train: bool = False, deltas=None) -> dict[str, jax.Array]:
        deltas = deltas or {}
        need = ancestors(self.layers, self.outputs, self.given)
        values: dict[str, jax.Array] = {}
        grad_flows: dict[str, bool] = {}
        fan_out = _fan_out(self.layers, need)
        for spec in self.layers:
            if spec.name not in need:
                continue
            if spec.name in self.given:
                values[spec.name], grad_flows[spec.name] = x[spec.name].astype(self.dtype), False
                continue
            inputs = [values[i] for i in spec.inputs]
            if spec.kind == "InputLayer":
                y = x.astype(self.dtype)
            else:
                y = self._apply(spec, inputs, train and spec.name in self.trainable)
            grad_flows[spec.name] = spec.name in self.trainable or any(
                grad_flows[i] for i in spec.inputs
            )
            if not grad_flows[spec.name]:
                y = jax.lax.stop_gradient(y)
            if spec.name in deltas:
                y, grad_flows[spec.name] = y + deltas[spec.name].astype(y.dtype), True
            if fan_out[spec.name] > 1:
                # Materialize tensors read by several layers. Otherwise XLA:CPU fuses a
                # residual block's elementwise output into each consumer and recomputes
                # the whole residual stream in every block (ResNet152 ran at half speed).
                y = jax.lax.optimization_barrier(y)
            values[spec.name] = y
        return {name: values[name] for name in self.outputs}

    def _apply(self, spec: LayerSpec, inputs: Sequence[jax.Array], train: bool) -> jax.Array:
        c = spec.cfg
        kind = spec.kind
        if kind == "Conv2D":
            return nn.Conv(
                c["filters"],
                c["kernel"],
                strides=c["strides"],
                padding=c["padding"].upper(),
                use_bias=c["use_bias"],
                kernel_init=_KERNEL_INIT,
                dtype=self.dtype,
                name=spec.name,
            )(inputs[0])
        if kind == "BatchNormalization":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=c["momentum"],
                epsilon=c["epsilon"],
                use_scale=c["scale"],
                use_bias=c["center"],
                dtype=self.dtype,
                name=spec.name,
            )(inputs[0])
        if kind == "Activation":
            return getattr(nn, c["activation"])(inputs[0])
        if kind == "ZeroPadding2D":
            (t, b), (l, r) = c["padding"]
            return jnp.pad(inputs[0], ((0, 0), (t, b), (l, r), (0, 0)))
        if kind == "MaxPooling2D":
            return nn.max_pool(inputs[0], c["pool"], c["strides"], c["padding"].upper())
        if kind == "AveragePooling2D":
            # Keras averages over the real cells only when padding is 'same'.
            return nn.avg_pool(
                inputs[0], c["pool"], c["strides"], c["padding"].upper(), count_include_pad=False
            )
        if kind == "Add":
            return sum(inputs[1:], inputs[0])
        if kind == "Concatenate":
            return jnp.concatenate(inputs, axis=-1)
        raise ValueError(f"layer {spec.name}: unsupported kind {kind}")


def _fan_out(layers: Sequence[LayerSpec], need: set[str]) -> dict[str, int]:
    """How many of the needed layers read each needed layer's output."""
    counts = dict.fromkeys(need, 0)
    for spec in layers:
        if spec.name in need:
            for i in spec.inputs:
                if i in counts:  # a given layer's inputs are not computed
                    counts[i] += 1
    return counts
