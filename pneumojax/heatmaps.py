"""Where a run's model looks: Grad-CAM, Grad-CAM++ and saliency heat maps of a batch of
images, and the layer they are taken at by default. :mod:`pneumojax.explain` makes them for
image files (and checks a ``--layer`` asked for), :mod:`pneumojax.overlays` draws them;
``pneumojax serve`` and the benchmarks use them too.

Maps are gradients of the PNEUMONIA logit (before the sigmoid) in inference mode: every
BatchNorm with its moving statistics, no dropout. They come from the same classifier and best
weights a run scores with, run from images in float32, and a zero ``delta`` added to the chosen
layer's output (see :class:`pneumojax.backbones.KerasGraph`) is what the gradient is taken with
respect to, so frozen layers do not stop it. One jitted function computes a whole batch; a
folder compiles once.

- Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_c mean_ij(dy/dA_ijc) * A_ijc)``.
- Grad-CAM++ (Chattopadhay et al. 2018), in the closed form of its paper and of
  pytorch-grad-cam: ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)``, channel weights
  ``sum_ij(alpha * ReLU(g))``.
- Saliency (Simonyan et al. 2014): ``max_channel |dy/dpixel|`` of the raw image.

An ensemble's map is the mean of its members' maps. Layer maps are upsampled bilinearly to the
model's input here, and to each image's own size when drawn (:mod:`pneumojax.overlays`; images
were squashed, not cropped, to the input, so the same stretch maps them back).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pneumojax.backbones import ancestors, get_backbone, preprocess
from pneumojax.backbones.registry import BackboneInfo
from pneumojax.scoring import LoadedRun, run_intensity
from pneumojax.model import build_classifier
from pneumojax.step import Steps, make_mesh

METHODS = ("gradcam", "gradcam++", "saliency")
_MERGES = ("Add", "Concatenate")


def input_layer(info: BackboneInfo) -> str:
    return next(s.name for s in info.layers if s.kind == "InputLayer")


def default_layer(info: BackboneInfo, cut: str) -> str:
    """The last block output at or before the cut: the last merge layer (Add or Concatenate,
    or the activation right after one, as ResNet's ``_out``) that every path from the input to
    the cut goes through. For the four default cuts: conv5_block2_out (ResNet152),
    conv5_block3_out (ResNet50V2), conv5_block14_concat (DenseNet121), mixed9 (InceptionV3)."""
    by_name = {s.name: s for s in info.layers}
    need = ancestors(info.layers, [cut])
    first = input_layer(info)
    for spec in reversed(info.layers[: info.layer_index[cut] + 1]):
        if spec.name not in need:
            continue
        merge = spec.kind in _MERGES or (
            spec.kind == "Activation"
            and len(spec.inputs) == 1
            and by_name[spec.inputs[0]].kind in _MERGES
        )
        if merge and first not in ancestors(info.layers, [cut], given=[spec.name]):
            return spec.name
    return cut  # a cut inside the stem: its own output


@dataclasses.dataclass
class Explainer:
    """Heat maps of a classifier (``backbone`` cut at ``cut``; ``variables``: every member's
    whole classifier, stacked on a leading axis) for batches of uint8 images at its input
    size. :meth:`of_run` makes one for a run's model."""

    backbone: str
    cut: str
    variables: dict
    method: str
    layer: str  # the Keras layer the map is taken at ('' for saliency: the raw image)
    batch_size: int = 16
    intensity: str = "none"  # the run's --intensity (saliency: gradients w.r.t. its output)

    @classmethod
    def of_run(cls, run: LoadedRun, method: str, layer: str, batch_size: int = 16):
        config = run.config
        return cls(
            config["backbone"],
            config["cut"],
            run.full_variables,
            method,
            layer,
            batch_size,
            run_intensity(config),
        )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        info = get_backbone(self.backbone)
        probe = input_layer(info) if self.method == "saliency" else self.layer
        self.model = build_classifier(
            info,
            self.cut,
            frozenset(),
            jnp.float32,
            intermediates=(probe,),
            intensity=self.intensity,
        )
        self._probe, self._mode = probe, info.preprocess_mode
        self._steps = Steps(self.model, optax.identity(), make_mesh())
        shared, differ, self._structure = _shared_and_member_variables(self.variables)
        # placed once: every maps() call would otherwise copy the whole model to the devices
        self._variables = jax.device_put((shared, differ), self._steps.replicated)
        self.members = int(jax.tree.leaves(self.variables)[0].shape[0])

    def maps(
        self, images: np.ndarray, desc: str | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, S, S) float32 maps (>= 0; ensembles: the members' mean), for uint8 (n, S, S, 3),
        in padded batches of ``batch_size`` (default: the explainer's own)."""
        out = np.zeros(images.shape[:3], np.float32)

        def sink(start, stop, maps):
            out[start:stop] = maps

        size = batch_size or self.batch_size
        self._steps.map(self._batch_maps, self._variables, images, size, sink, desc)
        return out

    @functools.cached_property
    def _batch_maps(self):
        return functools.partial(
            heat_maps, self.model, self._probe, self.method, self._mode, self._structure
        )


def _shared_and_member_variables(stacked: dict):
    """Splits K members' stacked variables into the leaves they share (one copy, so the frozen
    backbone runs once for all members) and the leaves that differ (kept stacked)."""
    leaves, treedef = jax.tree.flatten(stacked)
    same = tuple(bool(np.all(leaf == leaf[:1])) for leaf in leaves)
    shared = [leaf[0] for leaf, s in zip(leaves, same) if s]
    differ = [leaf for leaf, s in zip(leaves, same) if not s]
    return shared, differ, (treedef, same)


def _member_tree(shared, differ, structure):
    treedef, same = structure
    s, d = iter(shared), iter(differ)
    return jax.tree.unflatten(treedef, [next(s) if x else next(d) for x in same])


def heat_maps(model, probe: str, method: str, mode: str, structure, variables, images):
    """The batch's maps, (n, S, S), averaged over members; pure and jittable."""
    shared, differ = variables
    x = images.astype(jnp.float32)

    def logit_and_activation(delta, member_differ):
        member = _member_tree(shared, member_differ, structure)
        logits, inter = model.apply(member, x, deltas={probe: delta})
        return logits[:, 1].sum(), inter[probe]

    first = [d[0] for d in differ]
    shape = jax.eval_shape(logit_and_activation, 0.0, first)[1]
    zero = jnp.zeros(shape.shape, shape.dtype)
    grad = jax.grad(logit_and_activation, has_aux=True)
    if differ:
        g, a = jax.vmap(grad, in_axes=(None, 0))(zero, differ)
    else:
        g, a = jax.tree.map(lambda t: t[None], grad(zero, []))
    if method == "saliency":
        # g is the gradient at the input layer, after preprocessing: take it back to pixels.
        _, back = jax.vjp(lambda im: preprocess(im, mode), x)
        maps = jnp.abs(jax.vmap(lambda gi: back(gi)[0])(g)).max(-1)
    else:
        maps = jax.vmap(functools.partial(_cam, plus=method == "gradcam++"))(g, a)
        maps = jax.image.resize(maps, (*maps.shape[:2], *images.shape[1:3]), "bilinear")
    return jnp.maximum(maps, 0).mean(0)


def _cam(g, a, plus: bool):
    """Grad-CAM (or ++) of one member: g, a (n, h, w, C) -> (n, h, w)."""
    if plus:
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum((1, 2), keepdims=True) * g3 + 1e-7)
        alpha = jnp.where(g != 0, alpha, 0.0)
        weights = (alpha * jnp.maximum(g, 0)).sum((1, 2))
    else:
        weights = g.mean((1, 2))
    return jnp.maximum(jnp.einsum("nhwc,nc->nhw", a, weights), 0)
