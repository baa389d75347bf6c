"""Parallel linear branches on one input, summed (RepVGG's training form): fused into one convolution for the rules
only, the way the deployed RepVGG is written; the forward graph is left as it is.

    before:  y = Add(Add(BN(Conv3x3(x)), BN(Conv1x1(x))), BN(x))         (any number of branches, BN optional)
    after (rules only):  y = Conv3x3'(x), W' = sum of the branch kernels centred in the largest one (the identity
                         branch as a delta kernel), b' = sum of the branch biases

Without the fusion each branch would get its own rule and the sum the norm rule: with branches of opposite
sign the norm rule divides by a cancelling sum, and z+ sees the branches' positive parts apart instead of the
positive part of the layer the network computes."""
from __future__ import annotations

import numpy as np

from .fusion import Fusion, _attr
from .graph import GraphView


def find_branch_fusions(view: GraphView, path: list[int], fusions: dict[int, Fusion]) -> dict[int, Fusion]:
    """Fusions for sums of parallel branches on the path (replacing the Conv + BN fusions of their branches)."""
    on_path, found = set(path), {}
    absorbed_anywhere: set[int] = set()
    for index in reversed(path):  # outermost Add first
        if index in absorbed_anywhere or view.nodes[index].op_type != "Add":
            continue
        adds, tensors = _flatten_sum(view, index, on_path)
        branches = [_branch(view, t, fusions) for t in tensors]
        if len(branches) < 2 or any(b is None for b in branches):
            continue
        if len({b["x"] for b in branches}) != 1 or not any(b["conv"] is not None for b in branches):
            continue
        fused = _fuse(view, branches)
        if fused is None:
            continue
        producer, weight, bias = fused
        absorbed = sorted(set(adds) | {n for b in branches for n in b["nodes"]} - {producer})
        found[producer] = Fusion(producer, absorbed, view.nodes[index].output[0], weight, bias)
        absorbed_anywhere |= set(absorbed) | {producer}
    return found


def _flatten_sum(view: GraphView, index: int, on_path: set[int]) -> tuple[list[int], list[str]]:
    """The Add nodes of a sum tree rooted at ``index`` (inner sums read only by the next Add) and its summands."""
    node = view.nodes[index]
    adds, tensors = [index], []
    for name in node.input:
        producer = view.producer.get(name, (None,))[0]
        if producer is not None and producer in on_path and view.nodes[producer].op_type == "Add" \
                and len(view.consumers.get(name, [])) == 1:
            inner_adds, inner = _flatten_sum(view, producer, on_path)
            adds += inner_adds
            tensors += inner
        else:
            tensors.append(name)
    return adds, tensors


def _branch(view: GraphView, tensor: str, fusions: dict[int, Fusion]) -> dict | None:
    """A summand that is a linear map of an activation: Conv [+ folded BN] (its fusion), or BN(x) (identity)."""
    if tensor not in view.activations or tensor not in view.producer or len(view.consumers.get(tensor, [])) != 1:
        return None
    index = view.producer[tensor][0]
    node = view.nodes[index]
    for producer, fusion in fusions.items():
        if fusion.output == tensor and view.nodes[producer].op_type == "Conv":
            return _conv_branch(view, producer, [producer] + fusion.absorbed, fusion.weight, fusion.bias)
    if node.op_type == "Conv":
        return _conv_branch(view, index, [index], None, None)
    if node.op_type == "BatchNormalization" and len(node.output) == 1:
        params = [view.constant_value(n) for n in node.input[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
        return {"x": node.input[0], "conv": None, "nodes": [index], "scale": scale, "bias": beta - mean * scale}
    return None


def _conv_branch(view: GraphView, index: int, nodes: list[int], weight, bias) -> dict | None:
    node = view.nodes[index]
    weight = view.constant_value(node.input[1]) if weight is None else weight
    if weight is None:
        return None
    if bias is None:
        own = view.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and own is None:
            return None
        bias = np.zeros(weight.shape[0]) if own is None else own
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(
            int(d) != 1 for d in _attr(node, "dilations", [1] * (weight.ndim - 2))):
        return None
    return {"x": node.input[0], "conv": index, "nodes": nodes, "weight": np.asarray(weight, np.float64),
            "bias": np.asarray(bias, np.float64).reshape(-1)}


def _fuse(view: GraphView, branches: list[dict]):
    """(producer index, fused weight, fused bias), or None when the branches do not line up (strides, groups,
    centres, channel counts)."""
    convs = [b for b in branches if b["conv"] is not None]
    producer = max(convs, key=lambda b: int(np.prod(b["weight"].shape[2:])))
    node = view.nodes[producer["conv"]]
    shape = producer["weight"].shape
    rank = len(shape) - 2
    strides = list(_attr(node, "strides", [1] * rank))
    group = int(_attr(node, "group", 1))
    centre = _centre(node, shape[2:])
    weight, bias = np.zeros(shape), np.zeros(shape[0])
    for branch in branches:
        if branch["conv"] is None:  # identity through BN: a delta kernel, needs stride 1 and C_out = C_in
            per_group = shape[1]
            if any(s != 1 for s in strides) or shape[0] != per_group * group or centre is None \
                    or branch["scale"].size != shape[0]:
                return None
            for c in range(shape[0]):
                weight[(c, c % per_group) + tuple(centre)] += branch["scale"][c]
            bias += branch["bias"]
            continue
        other = view.nodes[branch["conv"]]
        w = branch["weight"]
        if list(_attr(other, "strides", [1] * rank)) != strides or int(_attr(other, "group", 1)) != group \
                or w.shape[:2] != shape[:2]:
            return None
        own_centre = _centre(other, w.shape[2:])
        if own_centre is None or centre is None:
            return None
        offset = [c - o for c, o in zip(centre, own_centre)]
        if any(o < 0 or o + k > K for o, k, K in zip(offset, w.shape[2:], shape[2:])):
            return None
        weight[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offset, w.shape[2:]))] += w
        bias += branch["bias"]
    dtype = np.float32
    return producer["conv"], weight.astype(dtype), bias.astype(dtype)


def _centre(node, kernel) -> list[int] | None:
    """The kernel position that reads the output position's own input pixel (pads must be symmetric)."""
    n = len(kernel)
    pads = list(_attr(node, "pads", [0] * 2 * n))
    if pads[:n] != pads[n:]:
        return None
    return list(pads[:n])
