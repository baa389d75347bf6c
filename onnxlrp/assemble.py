"""The compiled model put together: the forward graph with the relevance nodes, the ``target`` input and the
``<input>_relevance`` (and layer) outputs, value infos of the relevance tensors, the rule functions at the model's
opset, and the metadata."""
from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper

from . import __version__
from .builder import Builder
from .composites import Composite
from .graph import FLOAT_TYPES, GraphView
from .load import default_opset
from .reverse_walk import RuleRecord
from .templates import DOMAIN, library
from .weights import copy_fields, is_large

#: IR version written: accepted by every onnxruntime from 1.16 on (onnx >= 1.20 would write 14, too new for ORT).
IR_VERSION = 10


def assemble(view: GraphView, builder: Builder, records: list[RuleRecord], chosen: Composite, params: dict,
             applied: list[str], layers: list[tuple[str, str]]) -> onnx.ModelProto:
    source = view.model
    model = onnx.ModelProto()
    graph = model.graph
    copy_fields(source.graph, graph, skip="initializer")  # the large weights stay in the plan's model until
    graph.initializer.extend(t for t in source.graph.initializer if not is_large(t))  # compile_model joins them
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    float_inputs = view.float_inputs
    if view.ids_input is not None:  # a text model: <ids>_relevance, float32 shaped like the ids
        float_inputs = float_inputs + [view.ids_input]
    batch = float_inputs[0].type.tensor_type.shape.dim[0] if float_inputs and \
        float_inputs[0].type.tensor_type.shape.dim else None
    target = helper.make_tensor_value_info(builder.target_input, TensorProto.INT64, ["N"])
    if batch is not None:
        target.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.input.append(target)
    for vi in float_inputs:
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        out.name = builder.relevance_outputs[vi.name]
        if out.type.tensor_type.elem_type not in FLOAT_TYPES:  # a raw integer image: relevance as float32
            out.type.tensor_type.elem_type = TensorProto.FLOAT
        graph.output.append(out)

    graph.value_info.extend(_relevance_types(view, builder))
    for name, tensor in layers:
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=builder.fresh(f"lrp/{name}")))
        elem = float_inputs[0].type.tensor_type.elem_type if float_inputs else TensorProto.FLOAT
        graph.output.append(helper.make_tensor_value_info(
            name, elem if elem in FLOAT_TYPES else TensorProto.FLOAT,
            [None, None] if builder.output_roles.get(name) == ["", "bias"] else [None]))
    opset = default_opset(source)
    functions = []
    # per-node parameters (a user composite's overrides) count too
    guarded = any(zero_denominators_possible({**params, **r.params}) for r in records) or \
        zero_denominators_possible(params)
    for function in library().closure(sorted(builder.functions)):
        if function.name == "safe_div" and not guarded:
            function = _renamed(library().function("nonzero_div"), "safe_div")
        function = _copy_with_opset(function, opset)
        functions.append(function)
    model.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)] + [
        o for o in source.opset_import if o.domain not in ("", "ai.onnx", DOMAIN)])
    model.functions.extend(functions)
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "onnxlrp", __version__
    for prop in source.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    meta = {
        "onnxlrp.version": __version__,
        "onnxlrp.composite": chosen.name,
        "onnxlrp.signal": chosen.signal,
        "onnxlrp.parameters": json.dumps(params, sort_keys=True),
        "onnxlrp.canonicalizations": json.dumps(applied),
        "onnxlrp.rules": json.dumps([r.public() for r in records]),
        "onnxlrp.layer_outputs": json.dumps([name for name, _ in layers]),
        "onnxlrp.target_input": builder.target_input,
        "onnxlrp.relevance_outputs": json.dumps(builder.relevance_outputs),
    }
    if layers:
        meta["onnxlrp.output_roles"] = json.dumps(builder.output_roles)
    if chosen.source_text is not None:
        meta["onnxlrp.composite_file"] = chosen.source_text
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


#: Below this, a stabilizer vanishes in float16 (smallest subnormal 6e-8), so stab(0) could be 0.
MIN_NONZERO_STABILIZER = 1e-7


def zero_denominators_possible(params: dict) -> bool:
    """Whether a rule's denominator stab(z) can be 0 (LRP-0, a zero stabilizer): then the rules divide with
    safe_div's guard (0 where the denominator is 0); otherwise stab(z) != 0 and a plain Div suffices."""
    return min(params["epsilon"], params["stabilizer"]) < MIN_NONZERO_STABILIZER


def copied(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(vi)
    return copy


def _relevance_types(view: GraphView, builder: Builder) -> list[onnx.ValueInfoProto]:
    """Value infos of the relevance tensors: each has the type and shape (symbolic batch included) of the forward
    tensor it belongs to. Shape inference cannot see through the rules' runtime Reshapes; with the shapes known,
    ONNX Runtime keeps the rules' products in its blocked NCHWc layout instead of reordering tensors back and
    forth around every convolution (ResNet-50: 31 fewer reorders, ~7 % less time). Metadata only: the values
    are the same."""
    declared = {vi.name for vi in list(view.model.graph.value_info) + list(view.model.graph.output)}
    types = []
    for name, forward in builder.shaped_like.items():
        known = builder.forward_types.get(forward)
        if known is None or name in declared or name == forward or \
                known.type.tensor_type.elem_type not in FLOAT_TYPES:  # e.g. an int8 tensor's relevance is float
            continue
        vi = copied(known)
        vi.name = name
        types.append(vi)
    return types


def _renamed(function: onnx.FunctionProto, name: str) -> onnx.FunctionProto:
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    copy.name = name
    return copy


def _copy_with_opset(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    for imp in copy.opset_import:
        if imp.domain == "":
            imp.version = max(imp.version, opset)
    return copy
