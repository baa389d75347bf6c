"""The optional outputs per rule application: ``layer_relevance__<node>`` (``--emit-layers``, the relevance it
passes on per sample; with ``check`` also what it received) and ``bias_relevance`` (``--bias-relevance``, what
each absorbed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import helper

from .bindings import make_attribute
from .builder import Builder
from .errors import OnnxlrpError
from .interface import ARRIVING_PREFIX, LAYER_PREFIX
from .templates import library

if TYPE_CHECKING:
    from .compile import Plan


def absorber_kind(category: str | None, op: str) -> str:
    """What a rule application's absorbed relevance is: a softmax share (AttnLRP), a bias (and stabilizer) share,
    a constant addend's share (position / token-type embeddings, masks), a normalisation's, or other."""
    if category == "softmax" or op == "Softmax":
        return "softmax"
    if category in ("conv", "dense"):
        return "bias"
    if op in ("Add", "Sub", "Sum") and category == "affine":
        return "constant"
    if category == "normalization" or "Normalization" in op:
        return "normalization"
    return "other"


def absorbed_relevance(plan: Plan, units: bool) -> tuple[str, list[dict]]:
    """[N, columns]: per rule application, relevance arriving minus relevance passed on (what the bias and the
    stabilizer, a softmax (AttnLRP) or a constant addend absorbed); with ``units``, epsilon-ruled linear layers get
    one column per bias unit. A gradient-signal composite's relevance at a tensor t is t * signal, so its
    columns weigh the signals by their tensors: input + absorbed = start holds for them too."""
    b = plan.builder
    types = library().attribute_types("bias_units")
    one = b.constant("bias_axis_1", np.array([1], dtype=np.int64))
    weighted = plan.composite.signal == "gradient"
    parts, columns = [], []
    for record in plan.records:
        if not record.arriving:
            continue
        kind = absorber_kind(record.category, record.op)
        if not record.passed:  # nothing passed on: it absorbs all it receives
            arriving = _sample_total(b, record.arriving, f"{record.node}__arr_sum",
                                     record.arriving_at if weighted else None)
            parts.append(b.plain("Unsqueeze", [arriving, one], f"{record.node}__absorbed_col"))
            columns.append({"node": record.node, "units": 1, "kind": kind})
            continue
        if units and record.epsilon_terms is not None:
            bias, y, r, shape = record.epsilon_terms
            rank = len(shape or [0, 0])
            attrs = [make_attribute("lrp_epsilon", plan.params["epsilon"], types["lrp_epsilon"]),
                     make_attribute("bias_shape", [-1] + [1] * (rank - 2), types["bias_shape"]),
                     make_attribute("spatial_axes", list(range(2, rank)), types["spatial_axes"])]
            (column,) = b.call("bias_units", [bias, y, r], f"{record.node}__bias_units", attrs)
            count = (shape or [None, None])[1]
            columns.append({"node": record.node, "units": count, "kind": kind})
        else:
            arriving = _sample_total(b, record.arriving, f"{record.node}__arr_sum",
                                     record.arriving_at if weighted else None)
            passed = _sample_total(b, record.passed, f"{record.node}__layer_sum",
                                   record.passed_to if weighted else None)
            column = b.plain("Unsqueeze", [b.plain("Sub", [arriving, passed], f"{record.node}__absorbed"), one],
                             f"{record.node}__absorbed_col")
            columns.append({"node": record.node, "units": 1, "kind": kind})
        parts.append(column)
    if not parts:
        raise OnnxlrpError(f"{plan.source}: no rule application to account bias relevance for")
    out = b.fresh("bias_relevance_all")
    b.nodes.append(helper.make_node("Concat", parts, [out], axis=1, name=b.fresh("lrp/bias_concat")))
    return out, columns


def layer_outputs(plan: Plan, arriving: bool) -> list[tuple[str, str]]:
    """Per-sample relevance totals per rule application, as (output name, tensor) pairs (for gradient-signal
    composites the relevance t * signal)."""
    outputs = []
    weighted = plan.composite.signal == "gradient"
    for record in plan.records:
        if not record.passed:
            continue
        name = plan.builder.fresh(LAYER_PREFIX + record.node)
        plan.builder.output_roles[name] = [record.node, "passed"]
        outputs.append((name, _sample_total(plan.builder, record.passed, f"{record.node}__layer_sum",
                                            record.passed_to if weighted else None)))
        if arriving:
            name = plan.builder.fresh(ARRIVING_PREFIX + record.node)
            plan.builder.output_roles[name] = [record.node, "arriving"]
            outputs.append((name, _sample_total(plan.builder, record.arriving, f"{record.node}__arr_sum",
                                                record.arriving_at if weighted else None)))
    return outputs


def _sample_total(builder: Builder, tensors: list[str], name: str, at: list[str] | None = None) -> str:
    """The per-sample sum [N] of relevance tensors, built once per name (the layer outputs and the bias
    accounting share them); ``at``: the activations of gradient signals, the relevance being their product."""
    if name not in builder.totals:
        if at is not None:
            tensors = [builder.call("gradient_times_input", [x, g], f"{g}__times_input")[0]
                       for x, g in zip(at, tensors)]
        parts = [builder.call("sample_sum", [t, builder.batch_ref], f"{t}__sum")[0] for t in tensors]
        builder.totals[name] = builder.total(parts, name)
    return builder.totals[name]
