"""Per-op binders: the derived inputs and attributes an op's templates need (explicit pads, a transposed pass's
output_padding, slice offsets, normalised axes, the gate of a product). BINDERS is the registry that
rules/ops.toml names (``binder``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .bind_context import BindContext, Binding, NoRelevance, Unsupported, axis_attribute
from .ort_fusions import fused_summand
from .variants import concat_variant, conv_variant, pad_variant


def _explicit_pads(ctx: BindContext, in_spatial: list[int], kernel: list[int], strides: list[int],
                   dilations: list[int]) -> list[int]:
    """The node's pads with auto_pad resolved against the static input size."""
    auto_pad = ctx.text("auto_pad", "NOTSET")
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return list(ctx.attr("pads", [0] * 2 * n))
    if auto_pad == "VALID":
        return [0] * 2 * n
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(large if auto_pad == "SAME_LOWER" else small)
        ends.append(small if auto_pad == "SAME_LOWER" else large)
    return begins + ends


def _transpose_padding(in_spatial, out_spatial, kernel, strides, dilations, pads) -> list[int]:
    """output_padding so that the transposed pass has exactly the input's spatial size."""
    n = len(kernel)
    result = []
    for a in range(n):
        full = (out_spatial[a] - 1) * strides[a] - pads[a] - pads[a + n] + dilations[a] * (kernel[a] - 1) + 1
        extra = in_spatial[a] - full
        if extra < 0 or extra >= max(strides[a], dilations[a]):
            raise Unsupported(f"cannot invert the spatial geometry on axis {a + 2}")
        result.append(extra)
    return result


def bind_conv(ctx: BindContext) -> Binding:
    node = ctx.node
    if ctx.x != 0:
        raise Unsupported("the Conv weight is an activation (only constant weights are supported)")
    w_shape = ctx.static_shape(node.input[1])
    kernel = w_shape[2:]
    n = len(kernel)
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    variant = conv_variant(ctx)
    inputs = {"W": ctx.weight(), "B": ctx.bias(w_shape[0])}
    consumers = ctx.view.consumers.get(ctx.output, [])
    if ctx.fusion is None and len(consumers) == 1 and fused_summand(ctx.view, consumers[0]) is not None:
        add = ctx.view.nodes[consumers[0]]
        k = fused_summand(ctx.view, consumers[0])
        if add.input[k] == ctx.output:  # read this conv's output as (Add output - other summand), see fused_summand
            inputs["Y"] = ctx.add_node("Sub", [add.output[0], add.input[1 - k]], f"{ctx.output}__recomputed")
    if variant == "convs1":  # with stride 1 nothing depends on the input size
        pads = _explicit_pads(ctx, [max(kernel)] * n, kernel, strides, dilations)
        extra = [0] * n
    elif variant in ("convdyn", "convflat"):  # ConvTranspose cut to the input's size at run time
        x_shape = ctx.view.shape(node.input[0])
        if x_shape is not None and None not in x_shape[2:]:
            pads = _explicit_pads(ctx, list(x_shape[2:]), kernel, strides, dilations)
        elif ctx.text("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
            raise Unsupported("auto_pad SAME with a strided Conv needs the static input size")
        else:
            pads = _explicit_pads(ctx, [None] * n, kernel, strides, dilations)
        attrs = {"strides": strides, "dilations": dilations, "pads": pads, "group": ctx.attr("group", 1),
                 "output_padding": [max(s, d) - 1 for s, d in zip(strides, dilations)],
                 "spatial_axes": list(range(2, 2 + n)), "channel_sum_shape": [1, -1] + [1] * n}
        return inputs, attrs
    else:
        x_shape, y_shape = ctx.static_shape(node.input[0], 2), ctx.static_shape(node.output[0], 2)
        pads = _explicit_pads(ctx, x_shape[2:], kernel, strides, dilations)
        extra = _transpose_padding(x_shape[2:], y_shape[2:], kernel, strides, dilations, pads)
    attrs = {"strides": strides, "dilations": dilations, "pads": pads, "group": ctx.attr("group", 1)}
    if variant == "conv":
        attrs["output_padding"] = extra
        return inputs, attrs
    attrs.update(_flipped_weight(w_shape, int(ctx.attr("group", 1))))
    begin = [(kernel[a] - 1) * dilations[a] - pads[a] for a in range(n)]
    end = [(kernel[a] - 1) * dilations[a] - pads[a + n] + extra[a] for a in range(n)]
    if min(begin + end) < 0:
        raise Unsupported("pads larger than the kernel's reach are not supported")
    attrs["bwd_pads"] = begin + end
    if variant == "convgrouped":
        out = ctx.static_shape(node.output[0], 2)[2:]
        up_pads = [0] * (2 * (2 + 2 * n))
        for a in range(n):
            up_pads[(2 + 2 * n) + 3 + 2 * a] = strides[a] - 1
        attrs.update({"up_axes": [3 + 2 * a for a in range(n)], "up_pads": up_pads,
                      "up_shape": [0, 0] + [out[a] * strides[a] for a in range(n)],
                      "up_ends": [(out[a] - 1) * strides[a] + 1 for a in range(n)],
                      "spatial_axes": list(range(2, 2 + n))})
    return inputs, attrs


def _flipped_weight(w_shape: list[int], group: int) -> dict[str, Any]:
    """Attributes that turn W [M, C/g, k...] into the transposed pass's kernel [C, M/g, k...], flipped in space."""
    m, cg, kernel = w_shape[0], w_shape[1], w_shape[2:]
    n = len(kernel)
    return {"w_group_shape": [group, m // group, cg] + list(kernel), "w_perm": [0, 2, 1] + list(range(3, 3 + n)),
            "w_shape": [group * cg, m // group] + list(kernel), "flip_axes": list(range(2, 2 + n)),
            "flip_starts": [-1] * n, "flip_ends": [-(2 ** 63)] * n, "flip_steps": [-1] * n}



GATES = {"Sigmoid", "HardSigmoid", "Softmax", "Tanh"}
_SHAPE_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten"}


def gate_index(ctx: BindContext) -> int:
    """Which operand of a product of two activations is the gate: the one produced by a squashing function
    (Sigmoid, HardSigmoid, Softmax, Tanh), else the one that is broadcast (smaller)."""
    view, node = ctx.view, ctx.node
    candidates = []
    for k, name in enumerate(node.input):
        while name in view.producer and view.nodes[view.producer[name][0]].op_type in _SHAPE_ONLY:
            name = view.nodes[view.producer[name][0]].input[0]
        if name in view.producer and view.nodes[view.producer[name][0]].op_type in GATES:
            candidates.append(k)
    if len(candidates) == 1:
        return candidates[0]
    shapes = [view.shape(n) for n in node.input]
    if all(s is not None and None not in s for s in shapes):
        sizes = [int(np.prod(s)) for s in shapes]
        if sizes[0] != sizes[1]:
            return int(np.argmin(sizes))
    raise Unsupported("product of two activations where neither operand is recognisably the gate")


def bind_product(ctx: BindContext) -> Binding:
    if ctx.rule == "gate" and len(ctx.view.activation_inputs(ctx.index)) > 1 and ctx.x == gate_index(ctx):
        raise NoRelevance()
    return {}, {}


def bind_gemm(ctx: BindContext) -> Binding:
    node = ctx.node
    if ctx.x != 0:
        raise Unsupported("the Gemm weight (input B) is an activation (only constant weights are supported)")
    if ctx.attr("transA", 0):
        raise Unsupported("transA=1 is not supported")
    folded = ctx.fusion is not None and ctx.fusion.weight is not None
    if not folded and (ctx.attr("alpha", 1.0) != 1.0 or ctx.attr("beta", 1.0) != 1.0):
        raise Unsupported("alpha/beta != 1 with a non-constant B or C")
    trans_b = int(ctx.attr("transB", 0))
    w_shape = ctx.static_shape(node.input[1])
    units = w_shape[0] if trans_b else w_shape[1]
    scales = {"alpha": 1.0, "beta": 1.0} if folded else {}
    return {"W": ctx.weight(), "B": ctx.bias(units)}, {"transB": trans_b, "transB_bwd": 1 - trans_b, **scales}


def bind_matmul(ctx: BindContext) -> Binding:
    node = ctx.node
    if ctx.x != 0 or node.input[1] in ctx.view.activations:
        raise Unsupported("MatMul of two activations (only a constant right-hand weight is supported)")
    w_shape = ctx.static_shape(node.input[1])
    if len(w_shape) != 2:
        raise Unsupported(f"MatMul weight must be 2-D, got shape {w_shape}")
    return {"W": ctx.weight(), "B": ctx.bias(w_shape[1])}, {}


def bind_batchnorm(ctx: BindContext) -> Binding:
    return {}, {"channel_shape": [-1] + [1] * (ctx.rank(ctx.node.input[0]) - 2)}


def bind_averagepool(ctx: BindContext) -> Binding:
    node = ctx.node
    x_shape, y_shape = ctx.static_shape(node.input[0], 1), ctx.static_shape(node.output[0], 2)
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    dilations = list(ctx.attr("dilations", [1] * n))
    if any(d != 1 for d in dilations):
        raise Unsupported("dilated AveragePool is not supported")
    strides = list(ctx.attr("strides", [1] * n))
    pads = _explicit_pads(ctx, x_shape[2:], kernel, strides, dilations)
    sum_pads = list(pads)
    for a in range(n):  # ceil_mode windows that run past the end: pad the window sum far enough to reach them
        reach = (y_shape[2 + a] - 1) * strides[a] + kernel[a] - (x_shape[2 + a] + pads[a] + pads[a + n])
        sum_pads[a + n] += max(0, reach)
    return {}, {
        "kernel_shape": kernel, "strides": strides, "pads": pads, "sum_pads": sum_pads,
        "output_padding": _transpose_padding(x_shape[2:], y_shape[2:], kernel, strides, dilations, sum_pads),
        "channels": x_shape[1],
    }


def bind_maxpool(ctx: BindContext) -> Binding:
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides, dilations = list(ctx.attr("strides", [1] * n)), list(ctx.attr("dilations", [1] * n))
    in_spatial = ctx.static_shape(ctx.node.input[0], 2)[2:] if ctx.text("auto_pad", "NOTSET") not in ("NOTSET", "") \
        else [None] * n
    return {}, {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
                "pads": _explicit_pads(ctx, in_spatial, kernel, strides, dilations),
                "ceil_mode": int(ctx.attr("ceil_mode", 0))}



def bind_lrn(ctx: BindContext) -> Binding:
    size = int(ctx.attr("size"))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    return {}, {"pads": [lo, 0, hi, 0], "pads_t": [hi, 0, lo, 0], "kernel": [1, 1, size, 1]}


def bind_transpose(ctx: BindContext) -> Binding:
    rank = ctx.rank(ctx.node.input[0])
    perm = list(ctx.attr("perm", list(range(rank))[::-1]))
    return {}, {"inverse_perm": [int(i) for i in np.argsort(perm)]}


def bind_concat(ctx: BindContext) -> Binding:
    node = ctx.node
    axis = axis_attribute(ctx, node.output[0])
    if concat_variant(ctx) == "runtime":
        sizes = []
        if ctx.x:
            index = ctx.add_constant(f"{node.name}__axis", np.array([axis], dtype=np.int64))
            sizes = [ctx.add_node("Gather", [ctx.add_node("Shape", [name], f"{name}__shape"), index],
                                  f"{name}__size") for name in node.input[: ctx.x]]
        offset = (ctx.add_constant(f"{node.name}__zero", np.array([0], dtype=np.int64)) if not sizes else
                  sizes[0] if len(sizes) == 1 else ctx.add_node("Sum", sizes, f"{node.name}__offset_{ctx.x}"))
        return {"Offset": offset}, {"axes": [axis]}
    sizes = [ctx.static_shape(name, axis=axis)[axis] for name in node.input]
    start = sum(sizes[: ctx.x])
    return {}, {"starts": [start], "ends": [start + sizes[ctx.x]], "axes": [axis]}


def bind_split(ctx: BindContext) -> Binding:
    node = ctx.node
    axis = axis_attribute(ctx, node.input[0])
    x_shape = ctx.static_shape(node.input[0], axis=axis)
    sizes = [ctx.static_shape(out, axis=axis)[axis] for out in node.output]
    start = sum(sizes[: ctx.y])
    pads = [0] * (2 * len(x_shape))
    pads[axis] = start
    pads[axis + len(x_shape)] = x_shape[axis] - start - sizes[ctx.y]
    return {}, {"pads": pads}


def bind_slice(ctx: BindContext) -> Binding:
    """Slice's optional axes/steps, made explicit (their length is that of starts)."""
    node = ctx.node
    starts_shape = ctx.view.shape(node.input[1])
    if starts_shape is None or len(starts_shape) != 1 or starts_shape[0] is None:
        raise Unsupported("needs the length of Slice's starts")
    count = starts_shape[0]
    extra = {}
    if len(node.input) < 4 or not node.input[3]:
        extra["axes"] = ctx.add_constant(f"{node.name}__axes", np.arange(count, dtype=np.int64))
    if len(node.input) < 5 or not node.input[4]:
        extra["steps"] = ctx.add_constant(f"{node.name}__steps", np.ones([count], dtype=np.int64))
    return extra, {}


def bind_gather(ctx: BindContext) -> Binding:
    if ctx.x != 0:
        raise Unsupported("relevance for Gather indices is undefined")
    return {}, {"axis": axis_attribute(ctx, ctx.node.input[0])}


def bind_pad(ctx: BindContext) -> Binding:
    node = ctx.node
    mode = ctx.text("mode", "constant")
    if mode != "constant":
        raise Unsupported(f"Pad mode {mode!r} (only constant padding is supported)")
    if len(node.input) > 3 and node.input[3]:
        raise Unsupported("Pad with an axes input is not supported")
    if pad_variant(ctx) == "runtime":
        return {}, {}
    pads = ctx.view.constant_value(node.input[1])
    pads = [int(p) for p in np.asarray(pads).ravel()]
    if any(p < 0 for p in pads):
        raise Unsupported("Pad with negative pads (cropping) is not supported")
    return {}, {"starts": pads[: len(pads) // 2]}


def bind_normalization(ctx: BindContext) -> Binding:
    """LayerNormalization / RMSNormalization (op or recognised pattern), InstanceNormalization, GroupNormalization:
    the normalised axes (groups), epsilon, and the scale broadcast against the input (1 when there is none)."""
    node, x = ctx.node, ctx.node.input[0]
    if ctx.x != 0:
        raise Unsupported("relevance for a normalisation's scale or bias is undefined (they must be constants)")
    rank = ctx.rank(x)
    scale = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if node.op_type == "GroupNormalization":
        groups, channels = int(ctx.attr("num_groups")), ctx.static_shape(x, axis=1)[1]
        value = ctx.view.constant_value(scale)
        if value is None:
            raise Unsupported("GroupNormalization with a non-constant scale")
        value = np.asarray(value).reshape(-1)
        if value.size == groups and groups != channels:  # opset 18: one scale per group
            value = np.repeat(value, channels // groups)
        scale = ctx.add_constant(f"{node.name}__scale", value.reshape([-1] + [1] * (rank - 2)))
        return {"Scale": scale}, {"group_shape": [0, groups, -1], "epsilon": float(ctx.attr("epsilon", 1e-5))}
    if node.op_type == "InstanceNormalization":
        axes = list(range(2, rank))
        value = ctx.view.constant_value(scale)
        if value is None:
            raise Unsupported("InstanceNormalization with a non-constant scale")
        scale = ctx.add_constant(f"{node.name}__scale", np.asarray(value).reshape([-1] + [1] * (rank - 2)))
        epsilon = ctx.attr("epsilon", 1e-5)
    elif ctx.attr("axes") is not None:  # a recognised LayerNorm over other than the trailing axes
        axes = sorted(int(a) % rank for a in ctx.attr("axes"))
        epsilon = ctx.attr("epsilon", 1e-5)
    else:
        axis = int(ctx.attr("axis", -1)) % rank
        axes = list(range(axis, rank))
        epsilon = ctx.attr("epsilon", 1e-5)
    if node.op_type == "RMSNormalization":  # its weight is a Mul node of its own (patterns/rmsnorm.py)
        return {}, {"axes": axes, "epsilon": float(epsilon)}
    if scale is None:
        scale = ctx.add_constant(f"{node.name}__unit_scale", np.ones([], dtype=ctx.dtype(x)))
    return {"Scale": scale}, {"axes": axes, "epsilon": float(epsilon)}


def bind_softmax(ctx: BindContext) -> Binding:
    """The softmax axis as a one-element list (a constant the templates' shape inference can read)."""
    if ctx.opset < 13:
        raise Unsupported("Softmax before opset 13 (flattening semantics) is not supported")
    return {}, {"axes": [int(ctx.attr("axis", -1))]}


def bind_bilinear(ctx: BindContext) -> Binding:
    """MatMul of two activations: the permutation that swaps the other operand's last two axes; batch axes must
    not broadcast (exporters expand grouped-query heads explicitly)."""
    a, b = (ctx.view.shape(n) for n in ctx.node.input[:2])
    if a is None or b is None:
        raise Unsupported("needs the ranks of both MatMul operands")
    if len(a) != len(b) or len(a) < 2 or any(p is not None and q is not None and p != q
                                             for p, q in zip(a[:-2], b[:-2])):
        raise Unsupported(f"MatMul of activations shaped {a} and {b}: broadcasting batch axes is not supported")
    rank = len(a)
    return {}, {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]}



BINDERS: dict[str, Callable[[BindContext], Binding]] = {
    "conv": bind_conv,
    "gemm": bind_gemm,
    "matmul": bind_matmul,
    "product": bind_product,
    "batchnorm": bind_batchnorm,
    "averagepool": bind_averagepool,
    "lrn": bind_lrn,
    "maxpool": bind_maxpool,
    "transpose": bind_transpose,
    "concat": bind_concat,
    "split": bind_split,
    "slice": bind_slice,
    "gather": bind_gather,
    "pad": bind_pad,
    "normalization": bind_normalization,
    "bilinear": bind_bilinear,
    "softmax": bind_softmax,
}
