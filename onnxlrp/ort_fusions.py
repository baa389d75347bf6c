"""Reads that keep ONNX Runtime's forward fusions, so that the compiled model's original outputs stay bit-identical
to the uncompiled model's: an extra reader of a tensor that ORT would fuse away (Add before a LayerNormalization
or GELU, a Gemm before its activation, a Conv's summand in a residual Add) stops the fusion, so the rules read a
recomputed copy, or the summand as the Add's output minus the other one."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .bind_context import BindContext
from .graph import GraphView


#: ops that ONNX Runtime fuses with the Add producing their input into one kernel that rounds differently
#: (Add + LayerNormalization -> SkipLayerNormalization; Add + a written-out RMSNorm, which starts with Pow or Mul(x, x)
#: -> SkipSimplifiedLayerNormalization; bias Add + GELU -> BiasGelu). An extra reader of the Add's output would
#: stop the fusion.
_SKIP_NORM_READERS = {"LayerNormalization", "Pow"}


def unfused(ctx: BindContext, tensor: str) -> str:
    """``tensor``, or a recomputed copy of it where reading it would stop one of ONNX Runtime's fusions and so
    change the original outputs in their last bits (Add is exact: the copy has the same value)."""
    if ctx.add_node is None or tensor not in ctx.view.activations:
        return tensor
    producers, readers = ctx.view.forward_index
    producer = producers.get(tensor)
    if producer is not None and producer.op_type == "Gemm" and \
            [n.op_type for n in readers.get(tensor, [])] in ([op] for op in _GEMM_ACTIVATIONS):
        return _recompute_gemm(ctx, tensor, producer)
    if producer is None or producer.op_type != "Add":
        return tensor
    if not any(n.op_type in _SKIP_NORM_READERS or (n.op_type == "Mul" and list(n.input) == [tensor, tensor])
               or _starts_gelu(n, readers) for n in readers.get(tensor, [])):
        return tensor
    return _recompute_add(ctx, tensor)


def _starts_gelu(node: onnx.NodeProto, readers: dict) -> bool:
    """A Div or Mul feeding an Erf: the start of a GELU, which ONNX Runtime fuses with the bias Add before it
    (BiasGelu)."""
    return node.op_type in ("Div", "Mul") and any(n.op_type == "Erf" for n in readers.get(node.output[0], []))


#: activations that ONNX Runtime folds into the Gemm before them (FusedGemm), computing them its own way. Relu is
#: not among them: max(z, 0) is the same float whichever kernel takes it, so the forward's Gemm output is read as
#: it is (on VGG-16 a recomputed MatMul would cost a second pass over 400 MB of weights and a transposed copy of
#: them; original outputs bit-identical: tests/test_zoo.py).
_GEMM_ACTIVATIONS = {"Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Elu", "Selu", "Softsign"}


def _recompute_gemm(ctx: BindContext, tensor: str, gemm: onnx.NodeProto) -> str:
    """The Gemm's output recomputed as MatMul (+ Add): for the rules only (close, not bit-identical), so that the
    forward's Gemm keeps its single reader and its fusion with the activation."""
    memo = ctx.view.__dict__.setdefault("_recomputed", {})
    if tensor in memo:
        return memo[tensor]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    a, b = gemm.input[0], gemm.input[1]
    if attrs.get("transA", 0):
        a = ctx.add_node("Transpose", [a], f"{a}__t")
    if attrs.get("transB", 0):
        b = ctx.add_node("Transpose", [b], f"{b}__t")
    out = ctx.add_node("MatMul", [a, b], f"{tensor}__recomputed_ab")
    dtype = ctx.dtype(tensor)
    if float(attrs.get("alpha", 1.0)) != 1.0:
        out = ctx.add_node("Mul", [out, ctx.add_constant(f"{gemm.name}__alpha", np.array(attrs["alpha"], dtype))],
                           f"{tensor}__recomputed_alpha")
    if len(gemm.input) > 2 and gemm.input[2]:
        c = gemm.input[2]
        if float(attrs.get("beta", 1.0)) != 1.0:
            c = ctx.add_node("Mul", [c, ctx.add_constant(f"{gemm.name}__beta", np.array(attrs["beta"], dtype))],
                             f"{tensor}__recomputed_beta")
        out = ctx.add_node("Add", [out, c], f"{tensor}__recomputed")
    memo[tensor] = out
    return out


def _recompute_add(ctx: BindContext, tensor: str) -> str:
    """A copy of ``tensor`` = Add(a, b), as a - (-b): bit for bit a + b, and no common-subexpression pass merges it
    back into the forward's Add (reading a and b themselves stops no fusion)."""
    producer = ctx.view.forward_index[0][tensor]
    memo = ctx.view.__dict__.setdefault("_recomputed", {})
    if tensor not in memo:
        a, b = producer.input
        memo[tensor] = ctx.add_node("Sub", [a, ctx.add_node("Neg", [b], f"{b}__negated")], f"{tensor}__recomputed")
    return memo[tensor]


#: Ops with one activation input and constant other inputs that ONNX Runtime folds into the Conv before them
#: (ConvMulFusion, ConvAddFusion, ConvBNFusion: e.g. ConvNeXt's layer scale), so that the Add after them can
#: still fuse into that Conv.
_FOLDED_INTO_CONV = {"Mul", "Add", "BatchNormalization"}


def fused_summand(view: GraphView, add_index: int) -> int | None:
    """The input of a two-input Add that ONNX Runtime fuses into the Conv producing it (the first one that
    comes from a Conv read by nothing else, directly or through per-channel constant Mul/Add/BatchNormalization
    that ORT folds into the Conv). The relevance pass must not read that tensor: an extra reader stops the fusion
    and changes the original outputs in their last bits."""
    node = view.nodes[add_index]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for k, name in enumerate(node.input):
        while name in view.producer and len(view.consumers.get(name, [])) == 1:
            producer = view.nodes[view.producer[name][0]]
            if producer.op_type == "Conv":
                return k
            varying = [i for i in producer.input if i and view.constant_value(i) is None]
            if producer.op_type not in _FOLDED_INTO_CONV or len(varying) != 1:
                break
            name = varying[0]
    return None
