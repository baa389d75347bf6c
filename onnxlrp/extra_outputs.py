"""Outputs beyond ``<input>_relevance``: the relevance at any tensor (``--relevance-at``), and the metadata that
says which embedding lookup a text model's ``<ids>_relevance`` sums."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import helper

from .errors import OnnxlrpError
from .reverse_walk import relevance_signal

if TYPE_CHECKING:
    from .compile import Plan

SUFFIX = "_relevance"


def relevance_at_outputs(plan: Plan, tensors: list[str]) -> list[tuple[str, str, onnx.ValueInfoProto]]:
    """For each tensor of the (canonical) graph: (output name ``<tensor>_relevance``, the relevance tensor built
    for it, its value info). One-line OnnxlrpError for a tensor that does not exist or gets no relevance."""
    view, taken, chosen = plan.view, set(), []
    known = set(view.info) | set(view.producer) | set(view.consumers)
    inputs = {vi.name for vi in view.model.graph.input}
    for tensor in tensors:
        where = f"{plan.source}: --relevance-at {tensor}"
        if tensor not in known:
            raise OnnxlrpError(f"{where}: no tensor of that name in the model (after canonicalisation; "
                               f"`onnxlrp inspect` lists the nodes)")
        if tensor in inputs and tensor not in view.initializers:
            raise OnnxlrpError(f"{where}: a model input; its relevance is already the output {tensor}{SUFFIX}"
                               if any(vi.name == tensor for vi in view.float_inputs) else
                               f"{where}: an input that receives no relevance")
        if tensor not in view.activations:
            raise OnnxlrpError(f"{where}: a constant (it depends on no model input), not on the relevance path")
        name = tensor + SUFFIX
        if name in taken or name in plan.builder.taken:
            raise OnnxlrpError(f"{where}: the output name {name!r} is taken")
        signal = relevance_signal(view, plan.composite, plan.contributions, plan.builder, plan.reference, tensor)
        if signal is None:
            raise OnnxlrpError(f"{where}: no relevance reaches it (not on the relevance path of "
                               f"{plan.explained_output!r}, or inside a fused layer)")
        taken.add(name)
        plan.builder.taken.add(name)
        plan.builder.nodes.append(helper.make_node("Identity", [signal], [name], name=plan.builder.fresh(f"lrp/{name}")))
        info = view.info.get(tensor)
        shape = None if info is None or info.shape is None else [d if d is not None else f"{name}_{k}"
                                                                 for k, d in enumerate(info.shape)]
        if shape:
            shape[0] = "N" if info.shape[0] is None else shape[0]
        chosen.append((name, signal, helper.make_tensor_value_info(name, info.elem_type, shape)))
    return chosen


def add_relevance_at(model: onnx.ModelProto, outputs: list[tuple[str, str, onnx.ValueInfoProto]]) -> None:
    """Declare the relevance tensors as graph outputs (after assembly) and record them in the metadata."""
    import json
    for _, _, info in outputs:
        model.graph.output.append(info)
    if outputs:
        model.metadata_props.add(key="onnxlrp.relevance_at", value=json.dumps(
            [{"tensor": name[: -len(SUFFIX)], "output": name} for name, _, _ in outputs]))


def token_ids_metadata(plan: Plan) -> dict | None:
    """Which input holds the token ids and which lookups its relevance sums (those relevance reaches), and the
    other integer inputs (masks, token types), which get no relevance."""
    view = plan.view
    if not view.token_lookups:
        return None
    ids = view.token_lookups[0].input
    used = [lookup for lookup in view.token_lookups if plan.contributions.get(lookup.output)]
    others = [vi.name for vi in view.model.graph.input if vi.name != ids and vi.name not in view.initializers
              and vi.name not in {f.name for f in view.float_inputs}]
    return {"input": ids, "output": ids + SUFFIX, "reduce": "sum over the hidden axis",
            "lookups": [{"node": view.node_name(lookup.node), "weight": lookup.weight, "output": lookup.output,
                         "vocab": lookup.vocab, "hidden": lookup.hidden} for lookup in used],
            "no_relevance": others}
