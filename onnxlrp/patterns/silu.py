"""SiLU (swish) as exporters write it:

    before:  s = Sigmoid(x);  y = Mul(x, s)  (either order)
    after:   y = SiLU(x)      (onnxlrp.pattern; an activation for the rules, not a product of two activations)
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match, producer

LABEL = "SiLU"


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for x, s in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        sigmoid = producer(g, s, "Sigmoid")
        if sigmoid is not None and g.nodes[sigmoid].input[0] == x and x in g.activations:
            return Match(helper.make_node("SiLU", [x], [node.output[0]], domain=PATTERN_DOMAIN),
                         [sigmoid, index], LABEL)
    return None
