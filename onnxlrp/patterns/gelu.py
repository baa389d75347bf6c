"""GELU in its Erf form, as exporters write it below opset 20 (any order of the factors):

    before:  t = Div(x, 1.4142) | Mul(x, 0.7071);  e = Erf(t);  a = Add(e, 1)
             y = Mul(Mul(x, a), 0.5)  (TorchScript)   or   Mul(x, Mul(0.5, a))  (dynamo)   or ...
    after:   y = Gelu(x)            (onnxlrp.pattern; the rules treat it as the activation it is)

and its tanh approximation (GPT-2's gelu_new, nn.GELU(approximate="tanh")):

    before:  i = Add(x, Mul(Pow(x, 3), 0.044715));  a = Add(Tanh(Mul(i, 0.79788)), 1);  y = 0.5 * x * a
    after:   y = Gelu(x) <approximate = "tanh">
"""
from __future__ import annotations

import math

from onnx import helper

from . import PATTERN_DOMAIN, Match, producer, scalar

LABEL = "GELU"


def _factors(g, index: int, absorbed: list[int]) -> list[str]:
    """The leaves of the product tree under Mul node ``index`` (Muls read only by the tree are opened)."""
    leaves = []
    for name in g.nodes[index].input:
        inner = producer(g, name, "Mul")
        if inner is not None and len(g.consumers.get(name, [])) == 1:
            absorbed.append(inner)
            leaves += _factors(g, inner, absorbed)
        else:
            leaves.append(name)
    return leaves


def _erf_branch(g, name: str, absorbed: list[int]) -> str | None:
    """x if ``name`` = Add(Erf(x / sqrt 2), 1), else None."""
    add = producer(g, name, "Add")
    if add is None:
        return None
    node = g.nodes[add]
    for erf_name, one in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        erf = producer(g, erf_name, "Erf")
        if erf is None or scalar(g, one) != 1.0:
            continue
        scale = producer(g, g.nodes[erf].input[0], {"Div", "Mul"})
        if scale is None:
            continue
        s = g.nodes[scale]
        wanted = math.sqrt(2.0) if s.op_type == "Div" else 1.0 / math.sqrt(2.0)
        for x, c in ((s.input[0], s.input[1]), (s.input[1], s.input[0]) if s.op_type == "Mul" else (None, None)):
            value = scalar(g, c) if c else None
            if x and value is not None and abs(value - wanted) < 1e-4 * wanted:
                absorbed += [add, erf, scale]
                return x
    return None


def _close(value: float | None, wanted: float) -> bool:
    return value is not None and abs(value - wanted) < 1e-4 * abs(wanted)


def _tanh_branch(g, name: str, absorbed: list[int]) -> str | None:
    """x if ``name`` = Add(Tanh(sqrt(2/pi) * (x + 0.044715 x^3)), 1), else None."""
    add = producer(g, name, "Add")
    if add is None:
        return None
    node = g.nodes[add]
    for tanh_name, one in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        tanh = producer(g, tanh_name, "Tanh")
        if tanh is None or scalar(g, one) != 1.0:
            continue
        scale = producer(g, g.nodes[tanh].input[0], "Mul")
        if scale is None:
            continue
        s = g.nodes[scale]
        for inner_name, k in ((s.input[0], s.input[1]), (s.input[1], s.input[0])):
            inner = producer(g, inner_name, "Add")
            if inner is None or not _close(scalar(g, k), math.sqrt(2.0 / math.pi)):
                continue
            i = g.nodes[inner]
            for x, cubic in ((i.input[0], i.input[1]), (i.input[1], i.input[0])):
                mul = producer(g, cubic, "Mul")
                if mul is None:
                    continue
                m = g.nodes[mul]
                for p, c in ((m.input[0], m.input[1]), (m.input[1], m.input[0])):
                    power = producer(g, p, "Pow")
                    if power is not None and g.nodes[power].input[0] == x and scalar(g, g.nodes[power].input[1]) == 3.0 \
                            and _close(scalar(g, c), 0.044715):
                        absorbed += [add, tanh, scale, inner, mul, power]
                        return x
    return None


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return None
    absorbed = [index]
    leaves = _factors(g, index, absorbed)
    if len(leaves) != 3:
        return None
    halves = [k for k, leaf in enumerate(leaves) if scalar(g, leaf) == 0.5]
    if len(halves) != 1:
        return None
    rest = [leaf for k, leaf in enumerate(leaves) if k != halves[0]]
    for x, branch in ((rest[0], rest[1]), (rest[1], rest[0])):
        inner = list(absorbed)
        if x in g.activations and _erf_branch(g, branch, inner) == x:
            return Match(helper.make_node("Gelu", [x], [node.output[0]], domain=PATTERN_DOMAIN), inner, LABEL)
        inner = list(absorbed)
        if x in g.activations and _tanh_branch(g, branch, inner) == x:
            return Match(helper.make_node("Gelu", [x], [node.output[0]], domain=PATTERN_DOMAIN, approximate="tanh"),
                         inner, LABEL)
    return None
