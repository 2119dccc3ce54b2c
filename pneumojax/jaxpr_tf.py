"""A JAX function rewritten in plain TensorFlow ops, for converters that read TF graphs
(tf2onnx) but not jax2tf's output: jax 0.12's jax2tf serializes only natively (StableHLO
inside one ``XlaCallModule`` op), which tf2onnx cannot convert.

The function's jaxpr, traced with a symbolic batch dimension, is interpreted one primitive at
a time into TF ops with the same semantics. Only the primitives that pneumojax's scoring
path uses are translated (convolutions in NHWC/HWIO, pooling windows, BatchNorm arithmetic,
concatenation, dense layers, intensity ``standardize``); any other raises
:class:`UnsupportedPrimitive`, naming it.
"""

from __future__ import annotations

import jax
import jax.extend
import numpy as np


class UnsupportedPrimitive(ValueError):
    """The function uses a JAX primitive this interpreter does not translate."""


def tf_function_of(fn, example: jax.ShapeDtypeStruct):
    """``fn`` (one array in, one array out) as a function of a TF tensor built from plain TF
    ops. ``example``'s shape may hold one symbolic dimension (the batch), which becomes
    dynamic. Raises :class:`UnsupportedPrimitive` when tracing finds a primitive it cannot
    translate, before any TF op is built."""
    closed = jax.make_jaxpr(fn)(example)
    _check_supported(closed.jaxpr)
    symbolic = [i for i, d in enumerate(example.shape) if not isinstance(d, int)]

    def run(x):
        import tensorflow as tf  # noqa: PLC0415

        dims = {example.shape[i]: tf.shape(x)[i] for i in symbolic}
        consts = [tf.constant(np.asarray(c)) for c in closed.consts]
        (out,) = _interpret(closed.jaxpr, consts, [x], dims)
        return out

    return run


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        if hasattr(value, "jaxpr") and hasattr(value, "consts"):
            yield value.jaxpr
        elif hasattr(value, "eqns"):
            yield value


def _check_supported(jaxpr) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in CALLS:
            for sub in _sub_jaxprs(eqn):
                _check_supported(sub)
        elif name not in RULES:
            raise UnsupportedPrimitive(
                f"the model uses the JAX operation {name!r}, which the TF-ops rewrite for "
                "ONNX does not translate"
            )


def _interpret(jaxpr, consts, args, dims):
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, value in zip(jaxpr.constvars, consts):
        env[v] = value
    for v, value in zip(jaxpr.invars, args):
        env[v] = value
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in CALLS:
            sub = eqn.params[CALLS[name]]
            closed_consts = [_const(c) for c in getattr(sub, "consts", [])]
            outs = _interpret(getattr(sub, "jaxpr", sub), closed_consts, inputs, dims)
        else:
            outs = RULES[name](inputs, eqn, dims)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, value in zip(eqn.outvars, outs):
            env[v] = value
    return [read(v) for v in jaxpr.outvars]


def _const(c):
    import tensorflow as tf  # noqa: PLC0415

    return tf.constant(np.asarray(c))


CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


# --- the rules: (inputs, eqn, dims) -> output (a list for multiple results) ----------------


def _tf():
    import tensorflow as tf  # noqa: PLC0415

    return tf


def _tf_dtype(dtype):
    return _tf().as_dtype(np.dtype(dtype))


def _tensor(x, aval):
    """A literal (Python or numpy scalar) as a TF tensor of its jaxpr type."""
    tf = _tf()
    return x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.constant(x, _tf_dtype(aval.dtype))


def _shape(shape, dims):
    """A jaxpr shape as a TF shape: symbolic dimensions become their runtime sizes."""
    if all(isinstance(d, int) for d in shape):
        return list(shape)
    return _tf().stack([d if isinstance(d, int) else dims[d] for d in shape])


def _binary(op_name):
    def rule(inputs, eqn, dims):
        a, b = (_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars))
        return getattr(_tf().math, op_name)(a, b)

    return rule


def _unary(op):
    def rule(inputs, eqn, dims):
        return op(_tf())(_tensor(inputs[0], eqn.invars[0].aval))

    return rule


def _identity(inputs, eqn, dims):
    outs = [_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars)]
    return outs if eqn.primitive.multiple_results else outs[0]


def _convert(inputs, eqn, dims):
    return _tf().cast(_tensor(inputs[0], eqn.invars[0].aval), _tf_dtype(eqn.params["new_dtype"]))


def _integer_pow(inputs, eqn, dims):
    x, y = _tensor(inputs[0], eqn.invars[0].aval), eqn.params["y"]
    out = x
    for _ in range(abs(y) - 1):
        out = out * x
    return 1 / out if y < 0 else (_tf().ones_like(x) if y == 0 else out)


def _broadcast_in_dim(inputs, eqn, dims):
    tf = _tf()
    x = _tensor(inputs[0], eqn.invars[0].aval)
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = eqn.invars[0].aval.shape
    expanded = [1] * len(shape)
    for src, dst in enumerate(kept):
        expanded[dst] = operand[src]
    x = tf.reshape(x, _shape(expanded, dims))
    return tf.broadcast_to(x, _shape(shape, dims))


def _reshape(inputs, eqn, dims):
    if eqn.params.get("dimensions") not in (None, ()):
        raise UnsupportedPrimitive("reshape with dimensions")
    sizes = eqn.params["new_sizes"]
    symbolic = [d for d in sizes if not isinstance(d, int)]
    target = [-1 if not isinstance(d, int) else d for d in sizes] if len(symbolic) == 1 else sizes
    return _tf().reshape(inputs[0], _shape(target, dims))


def _squeeze(inputs, eqn, dims):
    return _tf().squeeze(inputs[0], axis=list(eqn.params["dimensions"]))


def _concatenate(inputs, eqn, dims):
    tensors = [_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars)]
    return _tf().concat(tensors, axis=eqn.params["dimension"])


def _stack(inputs, eqn, dims):
    tensors = [_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars)]
    return _tf().stack(tensors, axis=eqn.params["axis"])


def _pad(inputs, eqn, dims):
    tf = _tf()
    x, value = inputs[0], _tensor(inputs[1], eqn.invars[1].aval)
    config = eqn.params["padding_config"]
    if any(interior or lo < 0 or hi < 0 for lo, hi, interior in config):
        raise UnsupportedPrimitive("pad with interior or negative padding")
    return tf.pad(x, [[lo, hi] for lo, hi, _ in config], constant_values=value)


def _slice(inputs, eqn, dims):
    tf = _tf()
    shape = eqn.invars[0].aval.shape
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    begin, end, mask = [], [], 0
    for i, (s, lim, d) in enumerate(zip(starts, limits, shape)):
        symbolic = not isinstance(lim, int) or not isinstance(d, int)
        if symbolic and not (s == 0 and lim == d and strides[i] == 1):
            raise UnsupportedPrimitive("slice of a symbolic dimension")
        begin.append(s)
        end.append(0 if symbolic else lim)
        mask |= (1 << i) if symbolic else 0
    return tf.strided_slice(inputs[0], begin, end, strides, end_mask=mask)


def _transpose(inputs, eqn, dims):
    return _tf().transpose(inputs[0], perm=list(eqn.params["permutation"]))


def _reduce(op_name):
    def rule(inputs, eqn, dims):
        return getattr(_tf().math, op_name)(inputs[0], axis=list(eqn.params["axes"]))

    return rule


def _select_n(inputs, eqn, dims):
    tf = _tf()
    which, *cases = [_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars)]
    if len(cases) != 2:
        raise UnsupportedPrimitive("select_n with more than two cases")
    if which.dtype != tf.bool:
        which = tf.cast(which, tf.bool)
    return tf.where(which, cases[1], cases[0])


def _clamp(inputs, eqn, dims):
    lo, x, hi = (_tensor(x, v.aval) for x, v in zip(inputs, eqn.invars))
    return _tf().clip_by_value(x, lo, hi)


def _dot_general(inputs, eqn, dims):
    tf = _tf()
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = inputs
    ra, rb_ = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    out_dtype = _tf_dtype(eqn.outvars[0].aval.dtype)
    if not lb and not rb and ra == 2 and rb_ == 2 and tuple(lc) == (1,) and tuple(rc) == (0,):
        return tf.cast(tf.matmul(a, b), out_dtype)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    sa = [next(letters) for _ in range(ra)]
    sb = [next(letters) for _ in range(rb_)]
    for i, j in zip(list(lc) + list(lb), list(rc) + list(rb)):
        sb[j] = sa[i]
    batch = [sa[i] for i in lb]
    free_a = [sa[i] for i in range(ra) if i not in lc and i not in lb]
    free_b = [sb[j] for j in range(rb_) if j not in rc and j not in rb]
    spec = f"{''.join(sa)},{''.join(sb)}->{''.join(batch + free_a + free_b)}"
    return tf.cast(tf.einsum(spec, a, b), out_dtype)


NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs (HWIO), out in lax's terms


def _conv(inputs, eqn, dims):
    tf = _tf()
    p = eqn.params
    numbers = p["dimension_numbers"]
    layout = (tuple(numbers.lhs_spec), tuple(numbers.rhs_spec), tuple(numbers.out_spec))
    if layout != NHWC or p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
        raise UnsupportedPrimitive("conv_general_dilated other than NHWC/HWIO, undilated input")
    if p["feature_group_count"] != 1 or len(p["window_strides"]) != 2:
        raise UnsupportedPrimitive("grouped or non-2D conv_general_dilated")
    x, kernel = inputs
    x = tf.pad(x, [[0, 0], *[list(pad) for pad in p["padding"]], [0, 0]])
    out = tf.nn.conv2d(
        x,
        kernel,
        strides=[1, *p["window_strides"], 1],
        padding="VALID",
        dilations=[1, *p["rhs_dilation"], 1],
    )
    return tf.cast(out, _tf_dtype(eqn.outvars[0].aval.dtype))


def _pool(kind):
    def rule(inputs, eqn, dims):
        tf = _tf()
        p = eqn.params
        window, strides = p["window_dimensions"], p["window_strides"]
        if (
            len(window) != 4
            or window[0] != 1
            or window[3] != 1
            or strides[0] != 1
            or strides[3] != 1
            or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
        ):
            raise UnsupportedPrimitive(f"reduce_window_{kind} other than 2D NHWC windows")
        x = _tensor(inputs[0], eqn.invars[0].aval)
        fill = -np.inf if kind == "max" else 0.0
        x = tf.pad(x, [list(pad) for pad in p["padding"]], constant_values=fill)
        args = dict(ksize=list(window[1:3]), strides=list(strides[1:3]), padding="VALID")
        if kind == "max":
            return tf.nn.max_pool2d(x, **args)
        return tf.nn.avg_pool2d(x, **args) * float(window[1] * window[2])

    return rule


RULES = {
    "add": _binary("add"),
    "sub": _binary("subtract"),
    "mul": _binary("multiply"),
    "div": _binary("divide"),
    "max": _binary("maximum"),
    "min": _binary("minimum"),
    "pow": _binary("pow"),
    "eq": _binary("equal"),
    "ne": _binary("not_equal"),
    "lt": _binary("less"),
    "le": _binary("less_equal"),
    "gt": _binary("greater"),
    "ge": _binary("greater_equal"),
    "and": _binary("logical_and"),
    "or": _binary("logical_or"),
    "neg": _unary(lambda tf: tf.math.negative),
    "exp": _unary(lambda tf: tf.math.exp),
    "log": _unary(lambda tf: tf.math.log),
    "logistic": _unary(lambda tf: tf.math.sigmoid),
    "tanh": _unary(lambda tf: tf.math.tanh),
    "rsqrt": _unary(lambda tf: tf.math.rsqrt),
    "sqrt": _unary(lambda tf: tf.math.sqrt),
    "abs": _unary(lambda tf: tf.math.abs),
    "sign": _unary(lambda tf: tf.math.sign),
    "floor": _unary(lambda tf: tf.math.floor),
    "ceil": _unary(lambda tf: tf.math.ceil),
    "not": _unary(lambda tf: tf.math.logical_not),
    "square": _unary(lambda tf: tf.math.square),
    "integer_pow": _integer_pow,
    "stop_gradient": _identity,
    "optimization_barrier": _identity,
    "copy": _identity,
    "copy_p": _identity,
    "convert_element_type": _convert,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "concatenate": _concatenate,
    "stack": _stack,
    "pad": _pad,
    "slice": _slice,
    "transpose": _transpose,
    "reduce_sum": _reduce("reduce_sum"),
    "reduce_max": _reduce("reduce_max"),
    "reduce_min": _reduce("reduce_min"),
    "select_n": _select_n,
    "clamp": _clamp,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "reduce_window_max": _pool("max"),
    "reduce_window_sum": _pool("sum"),
}
