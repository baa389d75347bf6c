"""LayerNorm written out (older exporters, tf2onnx, hand-written models):

    before:  m = ReduceMean(x, axes);  d = Sub(x, m);  v = ReduceMean(Pow(d, 2) | Mul(d, d), axes)
             s = Sqrt(Add(v, eps));    y = Div(d, s) | Mul(d, Reciprocal(s))
    after:   y = LayerNormalization(x)  <axis, epsilon>   (onnxlrp.pattern; no scale or bias: a following
             Mul(gamma) / Add(beta) stay affine nodes of their own; <axes> instead of <axis> when the
             normalised axes are not the trailing ones, e.g. the channels of NCHW)
"""
from __future__ import annotations

from onnx import helper

from . import PATTERN_DOMAIN, Match, producer, reduce_axes, root_mean_square, trailing_axis

LABEL = "layer norm"


def match(g, index: int) -> Match | None:
    node = g.nodes[index]
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Div", "Mul") or len(node.input) != 2:
        return None
    candidates = [(node.input[0], node.input[1], None)] if node.op_type == "Div" else [
        (node.input[0], node.input[1], "r"), (node.input[1], node.input[0], "r")]
    for d, s, reciprocal in candidates:
        absorbed = [index]
        if reciprocal:
            rec = producer(g, s, "Reciprocal")
            if rec is None:
                continue
            absorbed.append(rec)
            s = g.nodes[rec].input[0]
        found = root_mean_square(g, s, absorbed)
        sub = producer(g, d, "Sub")
        if found is None or found[0] != d or sub is None:
            continue
        x, m = g.nodes[sub].input
        mean = producer(g, m, "ReduceMean")
        if mean is None or g.nodes[mean].input[0] != x or reduce_axes(g, g.nodes[mean]) != found[1]:
            continue
        if any(a.name == "keepdims" and a.i == 0 for a in g.nodes[mean].attribute):
            continue
        if not found[1]:
            continue
        axis = trailing_axis(g, x, found[1])
        absorbed += [sub, mean]
        if axis is not None:
            virtual = helper.make_node("LayerNormalization", [x], [node.output[0]], domain=PATTERN_DOMAIN,
                                       axis=axis, epsilon=found[2])
        else:  # e.g. over the channels of NCHW (Hugging Face ConvNeXt's channels_first LayerNorm)
            virtual = helper.make_node("LayerNormalization", [x], [node.output[0]], domain=PATTERN_DOMAIN,
                                       axes=found[1], epsilon=found[2])
        return Match(virtual, absorbed, LABEL)
    return None
