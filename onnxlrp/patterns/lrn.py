"""Recognise PyTorch's decomposed LocalResponseNorm and rewrite it into one ONNX LRN op.

Both torch exporters spell ``nn.LocalResponseNorm(size, alpha, beta, k)`` as

    Div(x, Pow(Add(Mul(S, alpha), k), beta)),   S = AveragePool_[size,1,...](Pad(Reshape(Mul(x, x))))

with shape plumbing around the pool (Reshape/Squeeze/Unsqueeze; TorchScript adds an If that squeezes). The
pass walks back from every Div and, where the whole chain matches and the channel padding equals ONNX LRN's
window (odd sizes; even sizes pad differently in torch), replaces the Div by ``LRN(x)``; the dead chain is
removed by the optimizer that runs next.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_PLUMBING = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}


class _Graph:
    def __init__(self, graph: onnx.GraphProto, opsets) -> None:
        self.order = list(graph.node)
        self.opsets = list(opsets)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.tensors = {t.name: t for t in graph.initializer}  # read as arrays when a match needs them
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = n.attribute[0].t
        self.arrays: dict[str, np.ndarray] = {}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        if name not in self.arrays and name in self.tensors:
            self.arrays[name] = numpy_helper.to_array(self.tensors[name])
        return self.arrays.get(name)

    def node(self, name: str, op: str | set[str]) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        ops = {op} if isinstance(op, str) else op
        return n if n is not None and n.op_type in ops else None

    def scalar(self, name: str) -> float | None:
        value = self.constant(name) if name in self.tensors and _size(self.tensors[name]) == 1 else None
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def evaluate(self, name: str) -> np.ndarray | None:
        """Value of a tensor computed from constants only (onnx.reference on its ancestors), else None."""
        if name in self.tensors:
            return self.constant(name)
        nodes, todo, seen = [], [name], set()
        while todo:
            current = todo.pop()
            if current in seen or current in self.tensors or not current:
                continue
            seen.add(current)
            node = self.producer.get(current)
            if node is None or node.op_type == "If":
                return None
            nodes.append(node)
            todo.extend(node.input)
        order = {id(n): k for k, n in enumerate(self.order)}
        nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
        graph = helper.make_graph(
            nodes, "constant", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
            [numpy_helper.from_array(self.constant(k), k) for k in self.tensors
             if any(k in n.input for n in nodes)])
        try:
            from onnx.reference import ReferenceEvaluator
            return np.asarray(ReferenceEvaluator(helper.make_model(graph, opset_imports=self.opsets)).run(None, {})[0])
        except Exception:
            return None

    def through_plumbing(self, name: str) -> str:
        """Follow shape-only ops (and an If whose branches only squeeze/reshape one outer value) upstream."""
        while name in self.producer:
            n = self.producer[name]
            if n.op_type in _PLUMBING:
                name = n.input[0]
            elif n.op_type == "If":
                outer = {i for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                         for g in [a.g] for b in g.node if b.op_type in _PLUMBING for i in b.input[:1]}
                if len(outer) != 1:
                    return name
                name = outer.pop()
            else:
                return name
        return name


def _size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _match(g: _Graph, div: onnx.NodeProto) -> dict | None:
    """LRN attributes if ``div`` ends a decomposed LocalResponseNorm of its first input, else None."""
    x = div.input[0]
    power = g.node(div.input[1], "Pow")
    if power is None or g.scalar(power.input[1]) is None:
        return None
    add = g.node(power.input[0], "Add")
    if add is None:
        return None
    for mul_name, bias_name in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        mul = g.node(mul_name, "Mul")
        bias = g.scalar(bias_name)
        if mul is None or bias is None:
            continue
        for pooled, alpha_name in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            alpha = g.scalar(alpha_name)
            pool = g.node(g.through_plumbing(pooled), "AveragePool")
            if alpha is None or pool is None:
                continue
            size = _window(g, pool, x)
            if size is not None:
                return {"size": size, "alpha": alpha, "beta": g.scalar(power.input[1]), "bias": bias}
    return None


def _window(g: _Graph, pool: onnx.NodeProto, x: str) -> int | None:
    """The channel window size if ``pool`` averages x*x over channels with ONNX LRN's padding."""
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    if not kernel or any(k != 1 for k in kernel[1:]) or attrs.get("count_include_pad", 0) != 1:
        return None
    if any(s != 1 for s in attrs.get("strides", [])):
        return None
    size = int(kernel[0])
    pad = g.node(pool.input[0], "Pad")
    pads = g.evaluate(pad.input[1]) if pad is not None else None
    if pads is None:
        return None
    pads = pads.reshape(-1)
    rank = len(pads) // 2
    spatial_rank = len(kernel)
    channel_axis = rank - spatial_rank  # the pooled axis is the first of the pooled dims
    begin, end = int(pads[channel_axis]), int(pads[channel_axis + rank])
    if (begin, end) != ((size - 1) // 2, size - 1 - (size - 1) // 2) or np.count_nonzero(pads) != (begin > 0) + (end > 0):
        return None
    square = g.node(g.through_plumbing(pad.input[0]), {"Mul", "Pow"})
    if square is None:
        return None
    if square.op_type == "Mul" and list(square.input) == [x, x]:
        return size
    if square.op_type == "Pow" and square.input[0] == x and g.scalar(square.input[1]) == 2.0:
        return size
    return None


def recognise_lrn(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Replace every decomposed LocalResponseNorm by an LRN node (the chain becomes dead code)."""
    g = _Graph(model.graph, model.opset_import)
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Div":
            continue
        attrs = _match(g, node)
        if attrs is not None:
            lrn = helper.make_node("LRN", [node.input[0]], list(node.output), name=node.name or f"LRN_{i}", **attrs)
            model.graph.node[i].CopyFrom(lrn)
    return model
