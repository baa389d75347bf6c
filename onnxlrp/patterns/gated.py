"""Products of two activations where one operand is an activation function's output (the gate):

    gated MLP:  h = Mul(act(g), u)   act = GELU, SiLU, Relu, ... (either order)
    gate:       y = Mul(x, Sigmoid(s))  (squeeze-excitation; HardSigmoid likewise)
    after:      GatedProduct(gate, other)   (onnxlrp.pattern, the gate first)
AttnLRP splits such products half and half (its uniform rule), CP-LRP and the Zennit composites treat the gate
as a constant. Casts and shape-only ops between the activation and the Mul are looked through.
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match

LABEL = "gated product"
SQUASHING = {"Sigmoid", "HardSigmoid"}
ACTIVATIONS = SQUASHING | {"Gelu", "SiLU", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Tanh",
                           "HardSwish", "Mish"}
_LOOK_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten"}


def _activation(g, name: str) -> str | None:
    """The op producing ``name`` (through a Cast or shape-only ops) if it is an activation function."""
    for _ in range(6):
        if name not in g.producer:
            return None
        node = g.nodes[g.producer[name][0]]
        if node.op_type in _LOOK_THROUGH:
            name = node.input[0]
            continue
        return node.op_type if node.op_type in ACTIVATIONS else None
    return None


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if not all(i in g.activations for i in node.input):
        return None
    acts = [_activation(g, name) for name in node.input]
    gates = [k for k, a in enumerate(acts) if a is not None]
    if len(gates) == 2:  # both are activations: the squashing one is the gate, else the first
        squash = [k for k in gates if acts[k] in SQUASHING]
        gates = squash if len(squash) == 1 else [0]
    if len(gates) != 1:
        return None
    k = gates[0]
    shapes = [g.shape(name) for name in node.input]
    if acts[k] not in SQUASHING and (None in shapes or shapes[0] != shapes[1]):
        return None  # a non-squashing gate only where both operands have one shape (act(g) * u)
    label = "gate" if acts[k] in SQUASHING else LABEL
    virtual = helper.make_node("GatedProduct", [node.input[k], node.input[1 - k]], list(node.output),
                               domain=PATTERN_DOMAIN)
    return Match(virtual, [index], label)
