"""Binding a rule template to one node: which tensor feeds each formal input, and every attribute value.

The default binding covers most ops: ``X`` is the activation input being explained, ``Y`` the output whose
relevance ``R`` is redistributed, ``Other`` the other operand of a binary op, any other formal is the node's input
or output of that name in the op's schema; attributes come from the rule options, the node, or the schema's
default; attributes named ``lrp_<option>`` take the rule options. Ops whose templates need derived values
(explicit pads, a transposed pass's output_padding, slice offsets) have a small binder in binders.py, named in
rules/ops.toml; variants.py chooses a template variant per node, and ort_fusions.py keeps the rules' reads from
stopping ONNX Runtime's forward fusions.
"""
from __future__ import annotations

from typing import Any

import onnx
from onnx import AttributeProto, helper

from .bind_context import BindContext, Unsupported
from .binders import BINDERS
from .ort_fusions import unfused

#: Template attributes named lrp_<option> take the rule option <option> (epsilon, stabilizer, gamma, ...);
#: all others are the node's own attributes, so rule parameters never collide with op attributes (Gemm alpha).
RULE_PARAMETER_PREFIX = "lrp_"


def bind(ctx: BindContext, function: onnx.FunctionProto, attr_types: dict[str, int], options: dict,
         binder: str | None) -> tuple[list[str], list[AttributeProto]]:
    """Actual inputs (in formal order) and attributes of the call to ``function`` for this context."""
    extra_inputs, extra_attrs = BINDERS[binder](ctx) if binder else ({}, {})
    node = ctx.node
    try:  # recognised patterns (domain onnxlrp.pattern) and ops newer than the model's opset have none
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=ctx.opset, domain="")
    except onnx.defs.SchemaError:
        schema = None
    in_names = [p.name for p in schema.inputs] if schema else []
    out_names = [p.name for p in schema.outputs] if schema else []
    inputs = []
    for formal in function.input:
        if formal in extra_inputs:
            actual = extra_inputs[formal]
        elif formal == "X":
            actual = node.input[ctx.x]
        elif formal == "Y":
            actual = ctx.output
        elif formal == "R":
            actual = "__R__"  # filled in by the compiler
        elif formal in ("X_ref", "Y_ref"):
            name = node.input[ctx.x] if formal == "X_ref" else ctx.output
            if not ctx.reference or name not in ctx.reference:
                raise Unsupported(f"template {function.name} needs the reference value of {name!r}")
            actual = ctx.reference[name]
        elif formal == "Other":
            others = [n for k, n in enumerate(node.input) if k != ctx.x and n]
            if len(others) != 1:
                raise Unsupported("expects exactly one other operand")
            actual = others[0]
        elif formal in in_names and in_names.index(formal) < len(node.input):
            actual = node.input[in_names.index(formal)]
        elif formal in out_names and out_names.index(formal) < len(node.output):
            actual = node.output[out_names.index(formal)]
        else:
            actual = ""
        if not actual:
            raise Unsupported(f"template {function.name} needs input {formal!r}, which the node does not have")
        inputs.append(actual)
    inputs = [unfused(ctx, name) for name in inputs]
    attributes = []
    for name in function.attribute:
        if name in extra_attrs:
            value = extra_attrs[name]
        elif name.startswith(RULE_PARAMETER_PREFIX) and name[len(RULE_PARAMETER_PREFIX):] in options:
            value = options[name[len(RULE_PARAMETER_PREFIX):]]
            if isinstance(value, (list, tuple)) and len(value) > 1:  # one value per channel (axis 1)
                shape = ctx.view.shape(node.input[ctx.x])
                channels = shape[1] if shape and len(shape) > 1 else None
                if channels != len(value):
                    raise Unsupported(f"{name[len(RULE_PARAMETER_PREFIX):]} has {len(value)} values, one per "
                                      f"channel, but input {node.input[ctx.x]!r} has "
                                      f"{channels if channels is not None else 'an unknown number of'} channels")
        elif ctx.attr(name) is not None:
            value = ctx.attr(name)
        elif schema and name in schema.attributes and schema.attributes[name].default_value.type:
            value = helper.get_attribute_value(schema.attributes[name].default_value)
        else:
            raise Unsupported(f"template {function.name} needs attribute {name!r}, which the node does not set")
        attributes.append(make_attribute(name, value, attr_types.get(name)))
    return inputs, attributes


def make_attribute(name: str, value: Any, attr_type: int | None) -> AttributeProto:
    """An attribute of the declared type (so 0 becomes 0.0 for floats and [] stays typed)."""
    if attr_type == AttributeProto.FLOAT:
        value = float(value)
    elif attr_type == AttributeProto.INT:
        value = int(value)
    elif attr_type == AttributeProto.INTS:
        value = [int(v) for v in value]
    elif attr_type == AttributeProto.FLOATS:
        value = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return helper.make_attribute(name, value, attr_type=attr_type)
