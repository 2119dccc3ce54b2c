"""Keras-named backbones: graphs, the Flax module that runs them, and the registry."""

from .graph import (
    KERAS_WEIGHTS,
    GraphBuilder,
    LayerSpec,
    ancestors,
    frozen_frontier,
    gradient_flow,
    keras_layer_order,
)
from .network import KerasGraph
from .registry import REGISTRY, BackboneInfo, get_backbone, preprocess
from .summary import backbone_model, init_shapes, layer_table

__all__ = [
    "KERAS_WEIGHTS",
    "GraphBuilder",
    "LayerSpec",
    "ancestors",
    "frozen_frontier",
    "gradient_flow",
    "keras_layer_order",
    "KerasGraph",
    "REGISTRY",
    "BackboneInfo",
    "get_backbone",
    "preprocess",
    "backbone_model",
    "init_shapes",
    "layer_table",
]
