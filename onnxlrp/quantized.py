"""The float twin: quantized models and scikit-learn's linear ai.onnx.ml ops (sklearn_ops.py) are explained on
a copy of the graph in standard float ops, computed beside the untouched forward.

Quantized models (ONNX Runtime's quantize_static in QDQ and QOperator format, quantize_dynamic): the rules run
on a float *twin* of the quantized graph, computed beside it; the quantized forward is left untouched, so its
outputs stay bit-identical and ONNX Runtime keeps fusing it into its integer kernels.

The twin reads only the model inputs and constants of its own. Its weights are dequantized at compile time; its
activations stay the quantized model's (every QuantizeLinear / DequantizeLinear pair on an activation is kept, so
the twin computes the int8 model's dequantized activations in float). The rules see float Conv / MatMul / Gemm /
Add / ... nodes and pass relevance through QuantizeLinear and DequantizeLinear (rules/ops.toml: category
``affine``, rule ``pass``: the straight-through convention). Rewrites, each node of the quantized graph -> twin:

    DequantizeLinear(int8 constant W, scale, zp)   ->  constant (W - zp) * scale             (per tensor or axis)
    QLinearConv(x, xs, xz, W, ws, wz, ys, yz, B)   ->  QuantizeLinear(Conv(DQ(x, xs, xz), W_f, B*xs*ws), ys, yz)
    QLinearMatMul / QGemm / QLinearAdd / QLinearMul / QLinearConcat / QLinearGlobalAveragePool / QLinearAveragePool
    / QLinearLeakyRelu / QLinearSigmoid            ->  DQ inputs, the float op, QuantizeLinear (QGemm without
                                                       y_scale: float output)
    ConvInteger / MatMulInteger(x, W, xz, wz) -> Cast -> Mul(., Mul(xs, ws)) [-> Add(bias), for ConvInteger]
                                                   ->  Conv / MatMul(DQ(x, xs, xz), W_f [, bias])
    anything else                                  ->  a copy reading twin tensors

The explained output's twin is explained; its start relevance is the twin's value of that output (the int8
model's output up to float rounding).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxlrpError
from .load import infer_shapes

PREFIX = "q2f/"
MS = "com.microsoft"

#: Ops whose presence makes a model quantized (default domain and com.microsoft).
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid"}

# QOperator ops -> (float op, positions of the (x, scale, zero point) triplets, position of (y_scale, y_zp))
_ELEMENTWISE = {
    "QLinearAdd": ("Add", [0, 3], 6),
    "QLinearMul": ("Mul", [0, 3], 6),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [0], 3),
    "QLinearAveragePool": ("AveragePool", [0], 3),
    "QLinearLeakyRelu": ("LeakyRelu", [0], 3),
    "QLinearSigmoid": ("Sigmoid", [0], 3),
}


#: Rewrites of other formats into the twin, by op type (sklearn_ops.py registers the ai.onnx.ml ones): each gets
#: the twin, the node and a name hint, emits the node's twin and returns the names of further nodes it replaced.
REWRITES: dict[str, object] = {}
ML_DOMAIN = "ai.onnx.ml"


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


def needs_twin(model: onnx.ModelProto) -> bool:
    """Quantized models, and models with an ai.onnx.ml op that has a rewrite (LinearClassifier, Scaler, ...)."""
    from . import sklearn_ops  # noqa: F401  (registers its rewrites)
    return is_quantized(model) or any(n.op_type in REWRITES and n.domain == ML_DOMAIN for n in model.graph.node)


class _Twin:
    """Builds the twin's nodes and initializers; tensor names are prefixed, model inputs shared."""

    def __init__(self, model: onnx.ModelProto, source: str):
        self.model, self.source = model, source
        graph = model.graph
        self.inputs = {vi.name for vi in graph.input}
        self.init = {t.name: t for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}  # twin name -> value (dequantized weights, copies)
        self.nodes: list[onnx.NodeProto] = []
        self.taken = {n for node in graph.node for n in list(node.input) + list(node.output) + [node.name]}
        self.taken |= self.inputs | set(self.init) | {o.name for o in graph.output}
        producers = {o: n for n in graph.node for o in n.output if o}
        self.producer = producers
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)

    # --- names and constants ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name, k = PREFIX + hint, 0
        while name in self.taken:
            k += 1
            name = f"{PREFIX}{hint}_{k}"
        self.taken.add(name)
        return name

    def tw(self, name: str) -> str:
        """The twin of a tensor: model inputs and empty names are shared, everything else prefixed (constants
        are copied, so the forward's initializers get no new readers)."""
        if not name or name in self.inputs:
            return name
        twin = PREFIX + name
        if name in self.init and twin not in self.constants:
            self.constants[twin] = numpy_helper.to_array(self.init[name])
        self.taken.add(twin)
        return twin

    def value(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        if node is not None and node.op_type == "DequantizeLinear" and all(self.value(i) is not None
                                                                            for i in node.input if i):
            return self.dequantize(node.input, _attr(node, "axis", 1), node)
        return None

    def need(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        value = self.value(name)
        if value is None:
            raise OnnxlrpError(f"{self.source}: node {node.name} ({node.op_type}): its {what} {name!r} is not a "
                               f"constant (only constant quantized weights are supported)")
        return value

    def dequantize(self, inputs, axis: int, node: onnx.NodeProto) -> np.ndarray:
        """(x - zero_point) * scale in float32, per tensor or per slice along ``axis``."""
        x = self.need(inputs[0], node, "quantized weight").astype(np.float64)
        scale = self.need(inputs[1], node, "scale").astype(np.float64)
        zero = self.need(inputs[2], node, "zero point").astype(np.float64) if len(inputs) > 2 and inputs[2] \
            else np.zeros_like(scale)
        if _attr(node, "block_size", 0):
            raise OnnxlrpError(f"{self.source}: node {node.name} ({node.op_type}): blocked quantization is not "
                               f"supported")
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((x - zero) * scale).astype(np.float32)

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.constants[name] = np.asarray(value)
        return name

    def emit(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(name), domain=domain, **attrs))

    def copy(self, node: onnx.NodeProto, hint: str) -> None:
        """The node itself, reading and writing twin tensors."""
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = self.fresh(hint)
        del twin.input[:], twin.output[:]
        twin.input.extend(self.tw(i) for i in node.input)
        twin.output.extend(self.tw(o) for o in node.output)
        self.nodes.append(twin)

    def dq(self, x: str, scale: str, zero: str, hint: str) -> str:
        """A DequantizeLinear of the twin of quantized activation ``x`` (a constant is dequantized now)."""
        value = self.value(x)
        if value is not None:
            node = helper.make_node("DequantizeLinear", [x, scale, zero], ["_"], name=hint)
            return self.constant(f"{hint}_const", self.dequantize([x, scale, zero], 1, node))
        out = self.fresh(f"{hint}_dq")
        self.emit("DequantizeLinear", [self.tw(x), self.tw(scale), self.tw(zero)], [out], f"{hint}_dq")
        return out

    def requantize(self, y: str, scale: str, zero: str, output: str, hint: str) -> None:
        self.emit("QuantizeLinear", [y, self.tw(scale), self.tw(zero)], [self.tw(output)], f"{hint}_q")


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _attrs(node: onnx.NodeProto, drop=("channels_last",)) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def float_twin(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model with the float twin added beside it, and forward tensor -> its twin (for every tensor the twin
    also computes); (model, {}) when no twin is needed."""
    if not needs_twin(model):
        return model, {}
    t = _Twin(model, source)
    skip: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.name and node.name in skip:
            continue
        hint = node.name or f"{node.op_type}_{index}"
        if node.op_type == "DequantizeLinear" and t.value(node.output[0]) is not None:
            t.constants[t.tw(node.output[0])] = t.value(node.output[0])
        elif node.op_type == "QLinearConv":
            _qlinear_linear(t, node, hint, "Conv", 0, 3, 8, 6)
        elif node.op_type == "QLinearMatMul":
            _qlinear_linear(t, node, hint, "MatMul", 0, 3, None, 6)
        elif node.op_type == "QGemm" and node.domain == MS:
            _qlinear_linear(t, node, hint, "Gemm", 0, 3, 6, 7)
        elif node.op_type in _ELEMENTWISE and node.domain == MS:
            op, triplets, out = _ELEMENTWISE[node.op_type]
            if node.op_type in ("QLinearGlobalAveragePool", "QLinearAveragePool") and _attr(node, "channels_last", 0):
                raise OnnxlrpError(f"{source}: node {hint} ({node.op_type}): channels_last is not supported")
            xs = [t.dq(*node.input[k:k + 3], f"{hint}_in{k}") for k in triplets]
            y = t.fresh(f"{hint}_float")
            t.emit(op, xs, [y], hint, **_attrs(node))
            t.requantize(y, node.input[out], node.input[out + 1], node.output[0], hint)
        elif node.op_type == "QLinearConcat" and node.domain == MS:
            xs = [t.dq(*node.input[k:k + 3], f"{hint}_in{k}") for k in range(2, len(node.input), 3)]
            y = t.fresh(f"{hint}_float")
            t.emit("Concat", xs, [y], hint, axis=_attr(node, "axis", 0))
            t.requantize(y, node.input[0], node.input[1], node.output[0], hint)
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            skip |= _integer_linear(t, node, hint)
        elif node.op_type in REWRITES and node.domain == ML_DOMAIN:
            skip |= REWRITES[node.op_type](t, node, hint) or set()
        else:
            t.copy(node, hint)
    combined = onnx.ModelProto()
    combined.CopyFrom(model)
    combined.graph.node.extend(t.nodes)
    combined.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in t.constants.items())
    combined = infer_shapes(combined, source)
    produced = {o for n in t.nodes for o in n.output}
    return combined, {o: PREFIX + o for n in model.graph.node for o in n.output if PREFIX + o in produced}


def _qlinear_linear(t: _Twin, node: onnx.NodeProto, hint: str, op: str, x: int, w: int, bias: int | None,
                    out: int) -> None:
    """QLinearConv / QLinearMatMul / QGemm -> DQ(x) -> float op with dequantized weight and bias -> Q."""
    inputs = list(node.input) + [""] * 9
    if t.value(inputs[x]) is not None or t.value(inputs[w]) is None:
        raise OnnxlrpError(f"{t.source}: node {hint} ({node.op_type}): only a constant quantized weight as the "
                           f"second operand is supported")
    axis = 0 if op == "Conv" or (op == "Gemm" and _attr(node, "transB", 0)) else 1
    weight = t.dequantize(inputs[w:w + 3], axis, node)
    x_f = t.dq(*inputs[x:x + 3], f"{hint}_x")
    float_inputs = [x_f, t.constant(f"{hint}_weight", weight)]
    if bias is not None and inputs[bias]:
        scale = (t.need(inputs[x + 1], node, "input scale").astype(np.float64)
                 * t.need(inputs[w + 1], node, "weight scale").astype(np.float64)).reshape(-1)
        b = t.need(inputs[bias], node, "bias").astype(np.float64).reshape(-1) * scale
        float_inputs.append(t.constant(f"{hint}_bias", b.astype(np.float32)))
    attrs = _attrs(node)
    if op == "Gemm":
        attrs.pop("beta", None)
        attrs["beta"] = 1.0  # the bias is dequantized to its float value
    if not inputs[out]:  # QGemm without y_scale: float output
        t.emit(op, float_inputs, [t.tw(node.output[0])], hint, **attrs)
        return
    y = t.fresh(f"{hint}_float")
    t.emit(op, float_inputs, [y], hint, **attrs)
    t.requantize(y, inputs[out], inputs[out + 1], node.output[0], hint)


def _integer_linear(t: _Twin, node: onnx.NodeProto, hint: str) -> set[str]:
    """quantize_dynamic's ConvInteger/MatMulInteger -> Cast -> Mul(scale) [-> Add(bias)] as one float layer.
    Returns the names of the nodes it replaced besides ``node`` (canonicalisation names every node)."""
    def only_consumer(name: str, op: str):
        readers = t.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op else None

    fail = OnnxlrpError(f"{t.source}: node {hint} ({node.op_type}): not the Cast -> Mul(scale) form that "
                        f"quantize_dynamic writes")
    inputs = list(node.input) + [""] * 4
    quantizer = t.producer.get(inputs[0])
    cast = only_consumer(node.output[0], "Cast")
    mul = cast and only_consumer(cast.output[0], "Mul")
    if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or mul is None:
        raise fail
    scales = t.producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
    if scales is None or scales.op_type != "Mul" or quantizer.output[1] not in scales.input:
        raise fail
    w_scale = scales.input[1] if scales.input[0] == quantizer.output[1] else scales.input[0]
    conv = node.op_type == "ConvInteger"
    w_zero = inputs[3] or None
    fake = helper.make_node("DequantizeLinear", [inputs[1], w_scale] + ([w_zero] if w_zero else []), ["_"],
                            name=hint)
    weight = t.dequantize(fake.input, 0 if conv else 1, fake)
    x_f = t.dq(inputs[0], quantizer.output[1], quantizer.output[2] if not inputs[2] else inputs[2], f"{hint}_x")
    float_inputs = [x_f, t.constant(f"{hint}_weight", weight)]
    replaced, output = {cast.name, mul.name}, mul.output[0]
    add = only_consumer(output, "Add")
    if conv and add is not None:  # fold the bias Add into the Conv, as in the float model
        other = add.input[1] if add.input[0] == output else add.input[0]
        bias = t.value(other)
        if bias is not None and bias.size == weight.shape[0]:
            float_inputs.append(t.constant(f"{hint}_bias", bias.reshape(-1).astype(np.float32)))
            replaced.add(add.name)
            output = add.output[0]
    attrs = _attrs(node) if conv else {}
    t.emit("Conv" if conv else "MatMul", float_inputs, [t.tw(output)], hint, **attrs)
    return replaced
