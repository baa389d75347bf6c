"""Products of two activations in attention (MatMul[a, a]), named by where they lead or come from:

    scores:  S = MatMul(q, kT) -> [Mul|Div(scale), Add|Where(mask), Cast, ...] -> Softmax
             after: S = AttentionScores(q, kT)
    values:  O = MatMul(P, v), P from a Softmax through [Cast, Dropout, Identity, Where(mask)]
             after: O = AttentionValues(P, v)
    other:   any other MatMul of two activations -> Bilinear(a, b)
(all in onnxlrp.pattern, same inputs and output as the MatMul: only the name changes, so the rules can tell
the attention probabilities from the values.)
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match

LABEL = "attention"
_TO_SOFTMAX = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Dropout", "Reshape", "Squeeze", "Unsqueeze"}
_FROM_SOFTMAX = {"Cast", "Identity", "Dropout", "Where", "Reshape"}


def _reaches_softmax(g, name: str) -> bool:
    """Whether ``name`` flows into a Softmax through elementwise ops with constant other operands."""
    for _ in range(8):
        consumers = g.consumers.get(name, [])
        if len(consumers) != 1:
            return False
        node = g.nodes[consumers[0]]
        if node.op_type == "Softmax":
            return True
        if node.op_type not in _TO_SOFTMAX or any(i in g.activations for i in node.input if i and i != name):
            return False
        name = node.output[0]
    return False


def _from_softmax(g, name: str) -> bool:
    for _ in range(8):
        if name not in g.producer:
            return False
        node = g.nodes[g.producer[name][0]]
        if node.op_type == "Softmax":
            return True
        active = [i for i in node.input if i in g.activations]
        if node.op_type not in _FROM_SOFTMAX or len(active) != 1:
            return False
        name = active[0]
    return False


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    if not all(i in g.activations for i in node.input):
        return None
    if _reaches_softmax(g, node.output[0]):
        op, label = "AttentionScores", "attention scores"
    elif _from_softmax(g, node.input[0]):
        op, label = "AttentionValues", "attention values"
    else:
        op, label = "Bilinear", "bilinear product"
    return Match(helper.make_node(op, list(node.input), list(node.output), domain=PATTERN_DOMAIN), [index], label)
