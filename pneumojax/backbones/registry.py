"""Backbones registered by their CLI name."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Callable

import jax.numpy as jnp

from .densenet import densenet121
from .graph import LayerSpec
from .inception_v3 import inception_v3
from .resnet import resnet50v2, resnet152


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What pneumojax needs to know about one keras.applications backbone."""

    name: str
    build: Callable[[], tuple[LayerSpec, ...]]
    keras_constructor: str  # attribute of keras.applications
    keras_module: str  # keras.applications.<module>.preprocess_input
    preprocess_mode: str  # 'caffe' | 'torch' | 'tf', as in keras imagenet_utils
    default_cut: str
    min_input_size: int

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The layers in ``keras.Model.layers`` order."""
        return self.build()

    @functools.cached_property
    def layer_index(self) -> dict[str, int]:
        return {s.name: i for i, s in enumerate(self.layers)}

    def check_layer(self, name: str) -> str:
        """Returns ``name`` if it is a layer of this backbone; otherwise a clear KeyError."""
        if name not in self.layer_index:
            raise KeyError(self.no_layer(name))
        return name

    def no_layer(self, name: str, cutoff: float = 0.5, nearest: str = "Nearest") -> str:
        """The message for a layer name this backbone lacks: the nearest names (difflib, at
        ``cutoff``) and the command that lists them all."""
        close = difflib.get_close_matches(name, list(self.layer_index), n=3, cutoff=cutoff)
        hint = f" {nearest}: {', '.join(close)}." if close else ""
        return (
            f"{self.name} has no layer {name!r}.{hint} "
            f"List them with: pneumojax layers --backbone {self.name}"
        )


REGISTRY: dict[str, BackboneInfo] = {
    b.name: b
    for b in (
        BackboneInfo(
            "resnet152", resnet152, "ResNet152", "resnet", "caffe", "conv5_block3_1_relu", 32
        ),
        BackboneInfo("resnet50v2", resnet50v2, "ResNet50V2", "resnet_v2", "tf", "post_relu", 32),
        BackboneInfo(
            "densenet121",
            densenet121,
            "DenseNet121",
            "densenet",
            "torch",
            "conv5_block15_1_relu",
            32,
        ),
        BackboneInfo(
            "inception_v3", inception_v3, "InceptionV3", "inception_v3", "tf", "conv2d_86", 75
        ),
    )
}


def get_backbone(name: str) -> BackboneInfo:
    """Looks a backbone up by CLI name, with the valid names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}") from None


_IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess(images, mode: str, dtype=jnp.float32):
    """``keras.applications.<module>.preprocess_input`` for RGB images in [0, 255], in JAX.

    Runs on the device, so batches travel as uint8.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if mode == "tf":
        x = x / 127.5 - 1.0
    elif mode == "torch":
        x = (x / 255.0 - jnp.array(_TORCH_MEAN)) / jnp.array(_TORCH_STD)
    elif mode == "caffe":
        x = x[..., ::-1] - jnp.array(_IMAGENET_MEAN_BGR)
    else:
        raise ValueError(f"unknown preprocess mode {mode!r}")
    return x.astype(dtype)
