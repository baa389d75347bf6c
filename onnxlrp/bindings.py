"""Binding a rule template to one node: which tensor feeds each formal input, and every attribute value.

The default binding covers most ops: ``X`` is the activation input being explained, ``Y`` the output whose
relevance ``R`` is redistributed, ``Other`` the other operand of a binary op, any other formal is the node's input
or output of that name in the op's schema; attributes come from the rule options, the node, or the schema's
default; attributes named ``lrp_<option>`` take the rule options. Ops whose templates need derived values (explicit pads, a transposed pass's output_padding, slice
offsets) have a small binder here, named in rules/ops.toml.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, helper

from .fusion import Fusion
from .graph import GraphView


class Unsupported(Exception):
    """This node cannot be bound (the message says why); collected into one UnsupportedError."""


class NoRelevance(Exception):
    """This input of the node receives no relevance under the rule (e.g. the gate of a product)."""


@dataclass
class BindContext:
    """One template application: node ``index``, explaining input ``x`` from output ``y``."""

    view: GraphView
    index: int
    x: int
    y: int
    add_constant: Callable[[str, np.ndarray], str]
    opset: int
    fusion: Fusion | None = None
    rule: str = ""
    add_node: Callable[[str, list[str], str], str] | None = None
    reference: dict[str, str] | None = None  # activation -> its value on the baseline (DeepLIFT)
    portable: bool = False  # choose only variants that every mainstream runtime runs (see PORTABLE_VARIANTS)

    @property
    def output(self) -> str:
        """The layer's output: the node's output ``y``, or the last output of a fused layer."""
        return self.fusion.output if self.fusion else self.node.output[self.y]

    def weight(self) -> str:
        """The weight the rules see (folded for fused layers)."""
        if self.fusion and self.fusion.weight is not None:
            return self.add_constant(f"{self.node.name}__folded_weight", self.fusion.weight)
        return self.node.input[1]

    def bias(self, units: int) -> str:
        """The bias the rules see: folded, the node's own, or zeros."""
        if self.fusion and self.fusion.bias is not None:
            return self.add_constant(f"{self.node.name}__folded_bias", self.fusion.bias)
        if len(self.node.input) > 2 and self.node.input[2]:
            return self.node.input[2]
        return self.add_constant(f"{self.node.name}__zero_bias", np.zeros([units], dtype=self.dtype(self.node.input[1])))

    @property
    def node(self) -> onnx.NodeProto:
        return self.view.nodes[self.index]

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def text(self, name: str, default: str) -> str:
        """A string attribute (stored as bytes in the proto) as str."""
        value = self.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def static_shape(self, tensor: str, start: int = 0, axis: int | None = None) -> list[int | None]:
        """The tensor's shape, requiring static sizes from axis ``start`` on (or just on ``axis``)."""
        shape = self.view.shape(tensor)
        needed = range(start, len(shape)) if shape is not None and axis is None else [axis]
        if shape is None or any(shape[a] is None for a in needed):
            what = f"axis {axis}" if axis is not None else f"axes {start}.." if start else "all axes"
            raise Unsupported(f"needs the static size of {tensor!r} ({what}), which shape inference could not "
                              f"determine")
        return list(shape)

    def rank(self, tensor: str) -> int:
        shape = self.view.shape(tensor)
        if shape is None:
            raise Unsupported(f"needs the rank of {tensor!r}, which shape inference could not determine")
        return len(shape)

    def dtype(self, tensor: str) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.view.info[tensor].elem_type or onnx.TensorProto.FLOAT)


#: Template attributes named lrp_<option> take the rule option <option> (epsilon, stabilizer, gamma, ...);
#: all others are the node's own attributes, so rule parameters never collide with op attributes (Gemm alpha).
RULE_PARAMETER_PREFIX = "lrp_"

Binding = tuple[dict[str, str], dict[str, Any]]  # formal input -> tensor, attribute -> value


def bind(ctx: BindContext, function: onnx.FunctionProto, attr_types: dict[str, int], options: dict,
         binder: str | None) -> tuple[list[str], list[AttributeProto]]:
    """Actual inputs (in formal order) and attributes of the call to ``function`` for this context."""
    extra_inputs, extra_attrs = BINDERS[binder](ctx) if binder else ({}, {})
    node = ctx.node
    try:  # recognised patterns (domain onnxlrp.pattern) and ops newer than the model's opset have none
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=ctx.opset, domain="")
    except onnx.defs.SchemaError:
        schema = None
    in_names = [p.name for p in schema.inputs] if schema else []
    out_names = [p.name for p in schema.outputs] if schema else []
    inputs = []
    for formal in function.input:
        if formal in extra_inputs:
            actual = extra_inputs[formal]
        elif formal == "X":
            actual = node.input[ctx.x]
        elif formal == "Y":
            actual = ctx.output
        elif formal == "R":
            actual = "__R__"  # filled in by the compiler
        elif formal in ("X_ref", "Y_ref"):
            name = node.input[ctx.x] if formal == "X_ref" else ctx.output
            if not ctx.reference or name not in ctx.reference:
                raise Unsupported(f"template {function.name} needs the reference value of {name!r}")
            actual = ctx.reference[name]
        elif formal == "Other":
            others = [n for k, n in enumerate(node.input) if k != ctx.x and n]
            if len(others) != 1:
                raise Unsupported("expects exactly one other operand")
            actual = others[0]
        elif formal in in_names and in_names.index(formal) < len(node.input):
            actual = node.input[in_names.index(formal)]
        elif formal in out_names and out_names.index(formal) < len(node.output):
            actual = node.output[out_names.index(formal)]
        else:
            actual = ""
        if not actual:
            raise Unsupported(f"template {function.name} needs input {formal!r}, which the node does not have")
        inputs.append(actual)
    inputs = [_unfused(ctx, name) for name in inputs]
    attributes = []
    for name in function.attribute:
        if name in extra_attrs:
            value = extra_attrs[name]
        elif name.startswith(RULE_PARAMETER_PREFIX) and name[len(RULE_PARAMETER_PREFIX):] in options:
            value = options[name[len(RULE_PARAMETER_PREFIX):]]
            if isinstance(value, (list, tuple)) and len(value) > 1:  # one value per channel (axis 1)
                shape = ctx.view.shape(node.input[ctx.x])
                channels = shape[1] if shape and len(shape) > 1 else None
                if channels != len(value):
                    raise Unsupported(f"{name[len(RULE_PARAMETER_PREFIX):]} has {len(value)} values, one per "
                                      f"channel, but input {node.input[ctx.x]!r} has "
                                      f"{channels if channels is not None else 'an unknown number of'} channels")
        elif ctx.attr(name) is not None:
            value = ctx.attr(name)
        elif schema and name in schema.attributes and schema.attributes[name].default_value.type:
            value = helper.get_attribute_value(schema.attributes[name].default_value)
        else:
            raise Unsupported(f"template {function.name} needs attribute {name!r}, which the node does not set")
        attributes.append(make_attribute(name, value, attr_types.get(name)))
    return inputs, attributes


#: ops that ONNX Runtime fuses with the Add producing their input into one kernel that rounds differently
#: (Add + LayerNormalization -> SkipLayerNormalization; Add + a written-out RMSNorm, which starts with Pow or Mul(x, x)
#: -> SkipSimplifiedLayerNormalization; bias Add + GELU -> BiasGelu). An extra reader of the Add's output would
#: stop the fusion.
_SKIP_NORM_READERS = {"LayerNormalization", "Pow"}


def _unfused(ctx: BindContext, tensor: str) -> str:
    """``tensor``, or a recomputed copy of it where reading it would stop one of ONNX Runtime's fusions and so
    change the original outputs in their last bits (Add is exact: the copy has the same value)."""
    if ctx.add_node is None or tensor not in ctx.view.activations:
        return tensor
    producers, readers = ctx.view.forward_index
    producer = producers.get(tensor)
    if producer is not None and producer.op_type == "Gemm" and \
            [n.op_type for n in readers.get(tensor, [])] in ([op] for op in _GEMM_ACTIVATIONS):
        return _recompute_gemm(ctx, tensor, producer)
    if producer is None or producer.op_type != "Add":
        return tensor
    if not any(n.op_type in _SKIP_NORM_READERS or (n.op_type == "Mul" and list(n.input) == [tensor, tensor])
               or _starts_gelu(n, readers) for n in readers.get(tensor, [])):
        return tensor
    return _recompute_add(ctx, tensor)


def _starts_gelu(node: onnx.NodeProto, readers: dict) -> bool:
    """A Div or Mul feeding an Erf: the start of a GELU, which ONNX Runtime fuses with the bias Add before it
    (BiasGelu)."""
    return node.op_type in ("Div", "Mul") and any(n.op_type == "Erf" for n in readers.get(node.output[0], []))


#: activations that ONNX Runtime folds into the Gemm before them (FusedGemm), computing them its own way. Relu is
#: not among them: max(z, 0) is the same float whichever kernel takes it, so the forward's Gemm output is read as
#: it is (on VGG-16 a recomputed MatMul would cost a second pass over 400 MB of weights and a transposed copy of
#: them; original outputs bit-identical: tests/test_zoo.py).
_GEMM_ACTIVATIONS = {"Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Elu", "Selu", "Softsign"}


def _recompute_gemm(ctx: BindContext, tensor: str, gemm: onnx.NodeProto) -> str:
    """The Gemm's output recomputed as MatMul (+ Add): for the rules only (close, not bit-identical), so that the
    forward's Gemm keeps its single reader and its fusion with the activation."""
    memo = ctx.view.__dict__.setdefault("_recomputed", {})
    if tensor in memo:
        return memo[tensor]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    a, b = gemm.input[0], gemm.input[1]
    if attrs.get("transA", 0):
        a = ctx.add_node("Transpose", [a], f"{a}__t")
    if attrs.get("transB", 0):
        b = ctx.add_node("Transpose", [b], f"{b}__t")
    out = ctx.add_node("MatMul", [a, b], f"{tensor}__recomputed_ab")
    dtype = ctx.dtype(tensor)
    if float(attrs.get("alpha", 1.0)) != 1.0:
        out = ctx.add_node("Mul", [out, ctx.add_constant(f"{gemm.name}__alpha", np.array(attrs["alpha"], dtype))],
                           f"{tensor}__recomputed_alpha")
    if len(gemm.input) > 2 and gemm.input[2]:
        c = gemm.input[2]
        if float(attrs.get("beta", 1.0)) != 1.0:
            c = ctx.add_node("Mul", [c, ctx.add_constant(f"{gemm.name}__beta", np.array(attrs["beta"], dtype))],
                             f"{tensor}__recomputed_beta")
        out = ctx.add_node("Add", [out, c], f"{tensor}__recomputed")
    memo[tensor] = out
    return out


def _recompute_add(ctx: BindContext, tensor: str) -> str:
    """A copy of ``tensor`` = Add(a, b), as a - (-b): bit for bit a + b, and no common-subexpression pass merges it
    back into the forward's Add (reading a and b themselves stops no fusion)."""
    producer = ctx.view.forward_index[0][tensor]
    memo = ctx.view.__dict__.setdefault("_recomputed", {})
    if tensor not in memo:
        a, b = producer.input
        memo[tensor] = ctx.add_node("Sub", [a, ctx.add_node("Neg", [b], f"{b}__negated")], f"{tensor}__recomputed")
    return memo[tensor]


def make_attribute(name: str, value: Any, attr_type: int | None) -> AttributeProto:
    """An attribute of the declared type (so 0 becomes 0.0 for floats and [] stays typed)."""
    if attr_type == AttributeProto.FLOAT:
        value = float(value)
    elif attr_type == AttributeProto.INT:
        value = int(value)
    elif attr_type == AttributeProto.INTS:
        value = [int(v) for v in value]
    elif attr_type == AttributeProto.FLOATS:
        value = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return helper.make_attribute(name, value, attr_type=attr_type)


# --- op binders ------------------------------------------------------------------------------------------------

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
        if add.input[k] == ctx.output:  # read this conv's output as (Add output - other summand), see above
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


def conv_variant(ctx: BindContext) -> str:
    """The fwd/bwd pair for a Conv: flat with one group has a template of its own (convflat_flat); stride-1
    convolutions take their transposed pass as a Conv (faster on ONNX Runtime's CPU kernels, and independent of
    the input size), grouped ones as a Conv on the stride-spread input
    (onnx.reference's ConvTranspose lacks groups), the rest ConvTranspose; strided convolutions whose spatial
    sizes are only known at run time use ConvTranspose cut to the input's size."""
    if ctx.rule == "flat" and int(ctx.attr("group", 1)) == 1:
        return "convflat"  # a one-channel form of flat, see rules/ops/convflat_flat.onnxtxt
    strides = ctx.attr("strides", None)
    if strides is None or all(int(s) == 1 for s in strides):
        return "convs1"
    shapes = [ctx.view.shape(ctx.node.input[0]), ctx.view.shape(ctx.node.output[0])]
    if any(s is None or None in s[2:] for s in shapes):
        return "convdyn"
    return "convgrouped" if int(ctx.attr("group", 1)) > 1 else "conv"


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


def maxpool_variant(ctx: BindContext) -> str | None:
    """"unpool" when the windows do not overlap and MaxUnpool's own output size is the input's (no padding or
    dilation, kernel <= strides, static sizes that the windows reach to the end): no winner can collect relevance
    from two windows, so nothing needs adding up."""
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    x_shape, y_shape = ctx.view.shape(ctx.node.input[0]), ctx.view.shape(ctx.node.output[0])
    if any(int(p) for p in ctx.attr("pads", [0] * 2 * n)) or any(int(d) != 1 for d in ctx.attr("dilations", [1] * n)):
        return None
    if ctx.text("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "") or any(k > s for k, s in zip(kernel, strides)):
        return None
    if x_shape is None or y_shape is None or None in x_shape[2:] or None in y_shape[2:]:
        return None
    reach = [(o - 1) * s + k for o, s, k in zip(y_shape[2:], strides, kernel)]
    return "unpool" if reach == list(x_shape[2:]) else None


def bind_lrn(ctx: BindContext) -> Binding:
    size = int(ctx.attr("size"))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    return {}, {"pads": [lo, 0, hi, 0], "pads_t": [hi, 0, lo, 0], "kernel": [1, 1, size, 1]}


def bind_transpose(ctx: BindContext) -> Binding:
    rank = ctx.rank(ctx.node.input[0])
    perm = list(ctx.attr("perm", list(range(rank))[::-1]))
    return {}, {"inverse_perm": [int(i) for i in np.argsort(perm)]}


def _axis(ctx: BindContext, tensor: str, default: int = 0) -> int:
    axis = int(ctx.attr("axis", default))
    return axis + ctx.rank(tensor) if axis < 0 else axis


def concat_variant(ctx: BindContext) -> str | None:
    """"runtime" when some input's size along the axis is unknown statically (dynamic sequence lengths)."""
    axis = _axis(ctx, ctx.node.output[0])
    shapes = [ctx.view.shape(name) for name in ctx.node.input]
    return "runtime" if any(s is None or s[axis] is None for s in shapes) else None


def bind_concat(ctx: BindContext) -> Binding:
    node = ctx.node
    axis = _axis(ctx, node.output[0])
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
    axis = _axis(ctx, node.input[0])
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
    return {}, {"axis": _axis(ctx, ctx.node.input[0])}


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


def pad_variant(ctx: BindContext) -> str | None:
    """"runtime" for pads computed in the graph (from shapes); they must be non-negative (no cropping)."""
    return "runtime" if ctx.view.constant_value(ctx.node.input[1]) is None else None


#: Ops with one activation input and constant other inputs that ONNX Runtime folds into the Conv before them
#: (ConvMulFusion, ConvAddFusion, ConvBNFusion: e.g. ConvNeXt's layer scale), so that the Add after them can
#: still fuse into that Conv.
_FOLDED_INTO_CONV = {"Mul", "Add", "BatchNormalization"}


def fused_summand(view: GraphView, add_index: int) -> int | None:
    """The input of a two-input Add that ONNX Runtime fuses into the Conv producing it (the first one that
    comes from a Conv read by nothing else, directly or through per-channel constant Mul/Add/BatchNormalization
    that ORT folds into the Conv). The relevance pass must not read that tensor: an extra reader stops the fusion
    and changes the original outputs in their last bits."""
    node = view.nodes[add_index]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for k, name in enumerate(node.input):
        while name in view.producer and len(view.consumers.get(name, [])) == 1:
            producer = view.nodes[view.producer[name][0]]
            if producer.op_type == "Conv":
                return k
            varying = [i for i in producer.input if i and view.constant_value(i) is None]
            if producer.op_type not in _FOLDED_INTO_CONV or len(varying) != 1:
                break
            name = varying[0]
    return None


def add_variant(ctx: BindContext) -> str | None:
    """"complement" (read x as y - other) for the summand that ONNX Runtime fuses into its Conv."""
    return "complement" if fused_summand(ctx.view, ctx.index) == ctx.x else None


def gelu_variant(ctx: BindContext) -> str | None:
    """"tanh" for GELU's tanh approximation (op attribute, or recognised by patterns/gelu.py)."""
    return "tanh" if ctx.text("approximate", "none") == "tanh" else None


VARIANTS: dict[str, Callable[[BindContext], str | None]] = {"conv": conv_variant, "add": add_variant,
                                                             "maxpool": maxpool_variant, "concat": concat_variant,
                                                             "pad": pad_variant, "gelu": gelu_variant}

#: Variants the portable form (compile --portable) may choose, per VARIANTS entry. Every one was run on
#: OpenVINO's ONNX front end and onnx.reference against ONNX Runtime (tests/test_runtimes.py). Left out:
#: maxpool "unpool" (MaxUnpool: OpenVINO's ONNX front end has no converter for it, and after it the rank of
#: the relevance is unknown, so the next Conv fails to validate; ORT has no CUDA kernel for it either).
PORTABLE_VARIANTS: dict[str, set[str | None]] = {
    "conv": {"conv", "convs1", "convgrouped", "convdyn", "convflat"},
    "add": {None, "complement"},
    "maxpool": {None},
    "concat": {None, "runtime"},  # Slice / Pad with sizes read at run time (Shape): standard ops everywhere
    "pad": {None, "runtime"},
    "gelu": {None, "tanh"},
}


def choose_variant(ctx: BindContext, variant: str) -> str | None:
    """The node's variant from VARIANTS; in the portable form, the op's own template where the chosen variant
    is not portable."""
    chosen = VARIANTS[variant](ctx)
    if ctx.portable and chosen not in PORTABLE_VARIANTS[variant]:
        return None
    return chosen

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
