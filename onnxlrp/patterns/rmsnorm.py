"""RMSNorm, always written out (Llama-style models; both torch exporters):

    before:  v = ReduceMean(Pow(x, 2) | Mul(x, x), [-1]);  s = Sqrt(Add(v, eps))
             r = Div(1, s) | Reciprocal(s);               y = Mul(x, r)   (either order)
    after:   y = RMSNormalization(x)  <axis, epsilon>   (onnxlrp.pattern; the Mul by the weight that follows
             stays an affine node; a float Cast before x is a node of its own)
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match, producer, root_mean_square, scalar, trailing_axis

LABEL = "RMS norm"


def _inverse_rms(g, name: str, absorbed: list[int]) -> tuple[str, list[int], float] | None:
    """(x, axes, eps) if ``name`` = 1 / Sqrt(ReduceMean(x*x, axes) + eps)."""
    index = producer(g, name, {"Reciprocal", "Div"})
    if index is None:
        return None
    node = g.nodes[index]
    if node.op_type == "Div" and scalar(g, node.input[0]) != 1.0:
        return None
    found = root_mean_square(g, node.input[-1], absorbed)
    if found is not None:
        absorbed.append(index)
    return found


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
