"""Layers that span several nodes: a linear node followed by the BatchNormalization or bias Add that belongs to
it. The forward graph is left as it is (so the original outputs stay bit-identical); the rule templates see one
linear layer with the folded weight and bias (what Zennit's SequentialMergeBatchNorm canonizer and a Linear
layer give), and its output is the last node's output."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from .graph import GraphView

LINEAR_OPS = {"Conv", "Gemm", "MatMul"}


@dataclass
class Fusion:
    """Node ``producer`` and the nodes ``absorbed`` after it form one linear layer with output ``output``."""

    producer: int
    absorbed: list[int]
    output: str
    weight: np.ndarray | None = None  # folded weight (None: the node's own)
    bias: np.ndarray | None = None    # folded bias (None: the node's own, or zeros)


def find_fusions(view: GraphView, path: list[int]) -> dict[int, Fusion]:
    """Fusions keyed by producer index, for linear nodes on the path with constant weights."""
    fusions: dict[int, Fusion] = {}
    on_path = set(path)
    outputs = {o.name for o in view.model.graph.output}
    for index in path:
        node = view.nodes[index]
        if node.op_type not in LINEAR_OPS or node.input[1] in view.activations:
            continue
        consumers = view.consumers.get(node.output[0], [])
        follower = view.nodes[consumers[0]].op_type if len(consumers) == 1 else None
        scaled = node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0)
        if follower not in ("BatchNormalization", "Add") and not scaled:
            continue  # nothing to fold: skip reading the weights
        weight = view.constant_value(node.input[1])
        bias = view.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or (len(node.input) > 2 and node.input[2] and bias is None):
            continue
        fusion = Fusion(index, [], node.output[0])
        weight, bias, scaled = _gemm_scales(view, index, weight, bias)
        if scaled:
            fusion.weight, fusion.bias = weight, bias
        while True:
            consumers = view.consumers.get(fusion.output, [])
            if len(consumers) != 1 or fusion.output in outputs or consumers[0] not in on_path:
                break
            follower = view.nodes[consumers[0]]
            folded = _fold(view, node, follower, fusion.output, weight, bias)
            if folded is None:
                break
            weight, bias = folded
            fusion.weight, fusion.bias = weight, bias
            fusion.absorbed.append(consumers[0])
            fusion.output = follower.output[0]
        if fusion.absorbed or fusion.weight is not None:
            fusions[index] = fusion
    from .branches import find_branch_fusions  # parallel branches summed (RepVGG): one conv for the rules
    for producer, fusion in find_branch_fusions(view, path, fusions).items():
        for absorbed in fusion.absorbed:
            fusions.pop(absorbed, None)
        fusions[producer] = fusion
    return fusions


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _units(node, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return weight.shape[0]
    return weight.shape[-1]


def _scale_units(node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Multiply each output unit's weights by scale."""
    if node.op_type == "Conv":
        return weight * scale.reshape([-1] + [1] * (weight.ndim - 1))
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return weight * scale[:, None]
    return weight * scale


def _gemm_scales(view: GraphView, index: int, weight, bias):
    """Gemm alpha/beta folded into the weight and bias the rules see (alpha*B, beta*C)."""
    node = view.nodes[index]
    if node.op_type != "Gemm":
        return weight, bias, False
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    if alpha == 1.0 and beta == 1.0:
        return weight, bias, False
    units = _units(node, weight)
    bias = np.zeros(units, weight.dtype) if bias is None else np.broadcast_to(bias, [units]).astype(weight.dtype)
    return (weight * weight.dtype.type(alpha)), (bias * weight.dtype.type(beta)), True


def _fold(view: GraphView, node, follower, tensor: str, weight, bias):
    """(weight, bias) of node followed by follower, or None if follower cannot be folded in."""
    units = _units(node, weight)
    bias = np.zeros(units, weight.dtype) if bias is None else np.broadcast_to(bias.reshape(-1), [units]).astype(
        weight.dtype) if bias.size in (1, units) else None
    if bias is None:
        return None
    if follower.op_type == "BatchNormalization" and follower.input[0] == tensor and len(follower.output) == 1:
        params = [view.constant_value(n) for n in follower.input[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
        if node.op_type != "Conv" and view.shape(tensor) is not None and len(view.shape(tensor)) != 2:
            return None
        scale = gamma / np.sqrt(var + float(_attr(follower, "epsilon", 1e-5)))
        new_weight = _scale_units(node, weight.astype(np.float64), scale).astype(weight.dtype)
        new_bias = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)
        return new_weight, new_bias
    if follower.op_type == "Add" and node.op_type in ("MatMul", "Gemm"):
        other = follower.input[1] if follower.input[0] == tensor else follower.input[0]
        value = view.constant_value(other)
        if value is None or other in view.activations:
            return None
        value = np.asarray(value)
        if value.size != units or (value.ndim and value.shape[-1] != units):
            return None
        return weight, (bias + value.reshape(-1).astype(weight.dtype))
    return None
