"""RMSNorm, always written out (Llama-style models; both torch exporters):

    before:  v = ReduceMean(Pow(x, 2) | Mul(x, x), [-1]);  s = Sqrt(Add(v, eps))
             r = Div(1, s) | Reciprocal(s);               y = Mul(x, r)   (either order)
    after:   y = RMSNormalization(x)  <axis, epsilon>   (onnxlrp.pattern; the Mul by the weight that follows
             stays an affine node; a float Cast before x is a node of its own)
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match, producer, reduce_axes, scalar, trailing_axis

LABEL = "RMS norm"


def _inverse_rms(g, name: str, absorbed: list[int]) -> tuple[str, list[int], float] | None:
    """(x, axes, eps) if ``name`` = 1 / Sqrt(ReduceMean(x*x, axes) + eps)."""
    index = producer(g, name, {"Reciprocal", "Div"})
    if index is None:
        return None
    node = g.nodes[index]
    if node.op_type == "Div" and scalar(g, node.input[0]) != 1.0:
        return None
    sqrt = producer(g, node.input[-1], "Sqrt")
    add = producer(g, g.nodes[sqrt].input[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    a = g.nodes[add]
    for v, e in ((a.input[0], a.input[1]), (a.input[1], a.input[0])):
        eps, mean = scalar(g, e), producer(g, v, "ReduceMean")
        if eps is None or mean is None:
            continue
        square = producer(g, g.nodes[mean].input[0], {"Pow", "Mul"})
        if square is None:
            continue
        sq = g.nodes[square]
        if (sq.op_type == "Pow" and scalar(g, sq.input[1]) == 2.0) or (
                sq.op_type == "Mul" and sq.input[0] == sq.input[1]):
            absorbed += [index, sqrt, add, mean, square]
            return sq.input[0], reduce_axes(g, g.nodes[mean]), eps
    return None


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for x, r in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        absorbed = [index]
        found = _inverse_rms(g, r, absorbed)
        if found is None or found[0] != x:
            continue
        axis = trailing_axis(g, x, found[1])
        if axis is None:
            continue
        virtual = helper.make_node("RMSNormalization", [x], [node.output[0]], domain=PATTERN_DOMAIN,
                                   axis=axis, epsilon=found[2])
        return Match(virtual, absorbed, LABEL)
    return None
