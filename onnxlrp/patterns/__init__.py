"""Structural recognisers: groups of forward nodes that the rules see as one concept (a LayerNorm, a GELU,
attention scores, ...).

Each pattern is one module with a before -> after docstring, a ``LABEL`` (what `inspect` calls it) and
``match(g, index) -> Match | None``. Patterns never change the forward graph: ``recognise`` returns the list of
nodes *the rules see*, where a matched group is replaced by one node in domain ``onnxlrp.pattern`` whose inputs
and outputs are tensors of the forward graph (so the rule templates read the forward's own values), and the
forward keeps every original node (its outputs stay bit-identical). ``lrn`` is the exception kept from before:
it rewrites the forward (see canonical.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from ..graph import GraphView

PATTERN_DOMAIN = "onnxlrp.pattern"


@dataclass
class Match:
    """``node`` (domain onnxlrp.pattern) stands for the forward nodes ``absorbed`` (indices in the current list);
    its outputs are outputs of the group, every other tensor of the group is read only inside it."""

    node: onnx.NodeProto
    absorbed: list[int]
    label: str


def _patterns():
    from . import attention, gated, gelu, layernorm, rmsnorm, silu
    return [gelu, silu, layernorm, rmsnorm, attention, gated]


def recognise(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], Counter]:
    """The nodes the rules see (recognised groups replaced) and how often each pattern label matched."""
    nodes = list(model.graph.node)
    found: Counter = Counter()
    for pattern in _patterns():
        g = GraphView(model, rule_nodes=nodes)
        matches, taken = [], set()
        for index in range(len(nodes)):
            if index in taken:
                continue
            match = pattern.match(g, index)
            if match is None or taken & set(match.absorbed) or not _self_contained(g, match):
                continue
            matches.append(match)
            taken.update(match.absorbed)
        if not matches:
            continue
        replaced = {}
        for match in matches:
            last = max(match.absorbed)
            name = g.nodes[last].name or f"{g.nodes[last].op_type}_{last}"
            match.node.name = name
            match.node.doc_string = match.label  # what `inspect` calls it
            replaced[last] = match.node
            found[match.label] += 1
        nodes = [replaced.get(i, node) for i, node in enumerate(nodes) if i in replaced or i not in taken]
    return nodes, found


#: what `inspect` calls a node of the rules' view that no pattern labelled (a recognised op of its own)
OP_LABELS = {"Softmax": "softmax", "LayerNormalization": "layer norm", "RMSNormalization": "RMS norm",
             "InstanceNormalization": "instance norm", "GroupNormalization": "group norm", "Gelu": "GELU"}


def recognised_labels(nodes: list[onnx.NodeProto], indices) -> Counter:
    """How many of the given nodes are each recognised concept (for `inspect`)."""
    found: Counter = Counter()
    for index in indices:
        node = nodes[index]
        label = node.doc_string if node.domain == PATTERN_DOMAIN else OP_LABELS.get(node.op_type)
        if label:
            found[label] += 1
    return found


def _self_contained(g: GraphView, match: Match) -> bool:
    """Every tensor made inside the group, except the group's outputs, is read only inside it (and is no graph
    output), so nothing outside needs the absorbed nodes' relevance."""
    inside = set(match.absorbed)
    graph_outputs = {o.name for o in g.model.graph.output}
    for index in inside:
        for out in g.nodes[index].output:
            if not out or out in match.node.output:
                continue
            if out in graph_outputs or any(c not in inside for c in g.consumers.get(out, [])):
                return False
    return True


# --- small helpers shared by the pattern modules ---------------------------------------------------------------

def producer(g: GraphView, name: str, ops: str | set[str]) -> int | None:
    """Index of the node producing ``name`` if its op is one of ``ops``."""
    ops = {ops} if isinstance(ops, str) else ops
    if name in g.producer:
        index = g.producer[name][0]
        if g.nodes[index].op_type in ops and g.nodes[index].domain in ("", "ai.onnx", PATTERN_DOMAIN):
            return index
    return None


def scalar(g: GraphView, name: str) -> float | None:
    """The value of a constant with one element, else None."""
    import numpy as np
    value = g.constant_value(name)
    if value is None or name in g.activations:
        return None
    value = np.asarray(value)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def reduce_axes(g: GraphView, node: onnx.NodeProto) -> list[int] | None:
    """The axes of a Reduce* node (attribute before opset 18, input from 18 on), None if not constant."""
    import numpy as np
    if len(node.input) > 1 and node.input[1]:
        value = g.constant_value(node.input[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    axes = attribute(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def trailing_axis(g: GraphView, tensor: str, axes: list[int] | None) -> int | None:
    """The first axis if ``axes`` are the trailing axes of ``tensor`` (as a negative axis), else None."""
    if not axes:
        return None
    shape = g.shape(tensor)
    rank = len(shape) if shape is not None else None
    if rank is None:
        return -1 if axes in ([-1],) else None
    normal = sorted(a % rank for a in axes)
    if normal != list(range(normal[0], rank)):
        return None
    return normal[0] - rank


def root_mean_square(g, name: str, absorbed: list[int]) -> tuple[str, list[int], float] | None:
    """(d, axes, eps) if ``name`` = Sqrt(Add(ReduceMean(d*d, axes), eps)) (d squared by Pow(d, 2) or Mul(d, d));
    its four nodes are added to ``absorbed``. Shared by the LayerNorm and RMSNorm recognisers."""
    sqrt = producer(g, name, "Sqrt")
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
            absorbed += [sqrt, add, mean, square]
            return sq.input[0], reduce_axes(g, g.nodes[mean]), eps
    return None
