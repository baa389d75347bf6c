"""Stage 3: the reverse walk. Seed the explained output, then for each node on the relevance path (last first)
apply its rule template to every activation input, summing relevance where a tensor fans out."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .bindings import RULE_PARAMETER_PREFIX, VARIANTS, BindContext, NoRelevance, Unsupported, bind, make_attribute
from .canonical import canonicalize
from .composites import Composite, assign_rules, get_composite, node_category, validate_options
from .errors import OnnxlrpError, UnsupportedError
from .fusion import find_fusions
from .quantized import float_twin
from .graph import FLOAT_TYPES, GraphView
from .reference import reference_forward
from .shapes import probe_shapes
from .load import check, default_opset, model_source, read_model, weightless
from .targets import TARGET_INPUT, TARGET_MASK_INPUT, default_composite, scores_tensor, set_target_inputs
from .templates import DOMAIN, library

#: IR version written: accepted by every onnxruntime from 1.16 on (onnx >= 1.20 would write 14, too new for ORT).
IR_VERSION = 10
NO_RELEVANCE = "none"  # ops.toml template name: this input receives no relevance
RELEVANCE_SUFFIX = "_relevance"


@dataclass
class RuleRecord:
    """What was applied at one node (kept in the compiled model's metadata)."""

    node: str
    op: str
    category: str | None
    rule: str | None
    template: str | None = None
    params: dict = field(default_factory=dict)
    arriving: list[str] = field(default_factory=list, repr=False)  # relevance tensors at its outputs
    passed: list[str] = field(default_factory=list, repr=False)    # relevance tensors it gives its inputs
    epsilon_terms: tuple | None = field(default=None, repr=False)  # (B, Y, R, shape of Y) of an epsilon layer

    def public(self) -> dict:
        """The fields recorded in the metadata."""
        return {"node": self.node, "op": self.op, "category": self.category, "rule": self.rule,
                "template": self.template, "params": self.params}


@dataclass
class _Builder:
    """Collects the nodes and initializers that the relevance pass adds to the forward graph."""

    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    totals: dict[str, str] = field(default_factory=dict)  # see _sample_total

    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.taken:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def call(self, template: str, inputs: list[str], hint: str, attributes=(), n_out: int = 1) -> list[str]:
        outputs = [self.fresh(hint if n_out == 1 else f"{hint}_{k}") for k in range(n_out)]
        node = helper.make_node(template, inputs, outputs, name=self.fresh(f"lrp/{hint}"), domain=DOMAIN)
        node.attribute.extend(attributes)
        self.nodes.append(node)
        self.functions.add(template)
        return outputs

    def plain(self, op: str, inputs: list[str], hint: str) -> str:
        """A default-domain node with one output."""
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"lrp/{hint}")))
        return out

    def total(self, parts: list[str], hint: str) -> str:
        if len(parts) == 1:
            return parts[0]
        out = self.fresh(hint)
        self.nodes.append(helper.make_node("Sum", parts, [out], name=self.fresh(f"lrp/{hint}_sum")))
        return out


@dataclass
class Plan:
    """Everything the reverse walk decided, before the model is assembled (also what `inspect` shows)."""

    source: str
    view: GraphView
    builder: _Builder
    records: list[RuleRecord]
    unsupported: list[tuple[str, str, str]]
    composite: Composite
    params: dict
    canonicalizations: list[str]
    explained_output: str
    baseline_inputs: list = field(default_factory=list)
    baseline_defaults: list = field(default_factory=list)
    target_mask: bool = False
    default_reason: str | None = None  # why the composite was chosen, when the user chose none


def compile_model(model: onnx.ModelProto | str | os.PathLike, composite: str | None = None, *,
                  explain_output: str | None = None, inline: bool = False, emit_layers: bool = False,
                  bias_relevance: str | None = None, baseline="zeros", target_mask: bool = False,
                  constant_inputs=(), **options) -> onnx.ModelProto:
    """Compile a model into one that also outputs ``<input>_relevance`` for the class given by input ``target``.

    composite: a name from rules/composites.toml; None picks the default for the model's input (see
    ``default_composite``; metadata ``onnxlrp.composite`` and ``onnxlrp.composite_default`` say which and why).

    options: epsilon, stabilizer, gamma, alpha, beta, low, high, lrn_rule (see composites.DEFAULT_OPTIONS).
    emit_layers: add an output ``layer_relevance__<node>`` [N] per rule application (the relevance it passes
    on, summed per sample); ``"check"`` also adds ``layer_arriving__<node>`` (the relevance it received).
    bias_relevance: "layers" adds an output ``bias_relevance`` [N, layers] with the relevance each rule
    application absorbed (bias and stabilizer shares), "units" splits epsilon-ruled linear layers per bias unit;
    input relevance + bias relevance = start relevance (metadata ``onnxlrp.bias_relevance`` names the columns).
    target_mask: instead of ``target``, the compiled model takes a float input ``target_mask`` shaped like the
    explained output (broadcastable to it): start relevance = output * mask (Zennit's attr_output), for
    segmentation maps, detection heads or any weighting of several scores. Without it, ``target`` has a default
    of [-1] (the top-scoring class), so callers of regression models may leave it out.
    constant_inputs: names of float inputs that are parameters (e.g. a Keras Normalization's mean and variance
    exported as inputs): they get no relevance output (inputs backed by an initializer of the same name are
    weights anyway).
    """
    plan = make_plan(model, composite, explain_output=explain_output, baseline=baseline, target_mask=target_mask,
                     constant_inputs=constant_inputs, **options)
    if plan.unsupported:
        raise UnsupportedError(plan.source, plan.unsupported)
    layers = _layer_outputs(plan, arriving=emit_layers == "check") if emit_layers else []
    columns: list[dict] = []
    if bias_relevance is not None:
        if bias_relevance not in ("layers", "units"):
            raise OnnxlrpError(f"{plan.source}: --bias-relevance must be layers or units, got {bias_relevance!r}")
        if plan.composite.signal != "relevance":
            raise OnnxlrpError(f"{plan.source}: --bias-relevance needs a relevance composite, not "
                               f"{plan.composite.name}")
        tensor, columns = _bias_relevance(plan, bias_relevance == "units")
        layers.append((BIAS_OUTPUT, tensor))
    compiled = _assemble(plan.view, plan.builder, plan.records, plan.composite, plan.params,
                         plan.canonicalizations, layers)
    compiled.graph.input.extend(plan.baseline_inputs)
    compiled.graph.initializer.extend(plan.baseline_defaults)
    set_target_inputs(compiled.graph, plan.view, plan.explained_output, plan.target_mask)
    compiled.metadata_props.add(key="onnxlrp.explained_output", value=plan.explained_output)
    compiled.metadata_props.add(key="onnxlrp.outputs", value=",".join(o.name for o in plan.view.model.graph.output))
    compiled.metadata_props.add(key="onnxlrp.target", value=TARGET_MASK_INPUT if plan.target_mask else TARGET_INPUT)
    if plan.default_reason:
        compiled.metadata_props.add(key="onnxlrp.composite_default", value=plan.default_reason)
    if columns:
        compiled.metadata_props.add(key="onnxlrp.bias_relevance", value=json.dumps(columns))
    if inline:
        compiled = onnx.inliner.inline_local_functions(compiled)
    try:
        onnx.checker.check_model(weightless(compiled), full_check=True)
    except Exception as exc:  # ValidationError or InferenceError
        raise OnnxlrpError(f"{plan.source}: internal error, the compiled model fails onnx.checker: "
                           f"{str(exc).strip().splitlines()[0]}") from None
    return compiled


def make_plan(model: onnx.ModelProto | str | os.PathLike, composite: str | None = None, *,
              explain_output: str | None = None, baseline="zeros", target_mask: bool = False, constant_inputs=(),
              **options) -> Plan:
    """Load, canonicalise and walk the graph: which rule and template every node gets (nothing is raised for
    unsupported nodes; they are listed in the plan)."""
    source = model_source(model)
    try:
        params = validate_options(options)
        chosen = get_composite(composite, str(params["lrn_rule"])) if composite is not None else None
    except OnnxlrpError as exc:
        raise OnnxlrpError(f"{source}: {exc}") from None
    proto = read_model(model)
    check(proto, source)
    proto, applied = canonicalize(proto, source)
    proto, twins = float_twin(proto, source)
    if twins:
        applied.append("float_twin")
    names = {vi.name for vi in proto.graph.input}
    unknown_inputs = [n for n in constant_inputs if n not in names]
    if unknown_inputs:
        raise OnnxlrpError(f"{source}: --constant-input {unknown_inputs[0]!r} is not a model input; inputs are: "
                           f"{', '.join(sorted(names))}")
    view = GraphView(proto, frozenset(constant_inputs))
    default_reason = None
    if chosen is None:
        composite, default_reason = default_composite(view)
        chosen = get_composite(composite, str(params["lrn_rule"]))
    explained = _explained_tensor(view, explain_output, source, twins)
    path = view.relevance_path(explained)
    tensors = {t for i in path for t in list(view.nodes[i].input) + list(view.nodes[i].output)
               if t in view.activations}
    unknown = view.incomplete_shapes(sorted(tensors))
    if unknown:
        view.fill_shapes(probe_shapes(view, unknown))
    rules = assign_rules(view, path, chosen)

    builder = _Builder(taken=_all_names(proto))
    reference, baseline_inputs, baseline_defaults = None, [], []
    if chosen.signal == "deeplift":
        nodes, reference, baseline_inputs, baseline_defaults = reference_forward(view, baseline, source)
        builder.nodes.extend(nodes)
        builder.taken.update(o for n in nodes for o in n.output)
    records, unsupported = _walk(view, path, rules, chosen, params, explained, builder, reference, target_mask)
    output = explain_output or next(o.name for o in view.model.graph.output
                                    if scores_tensor(view, o.name, twins) == explained)
    return Plan(source, view, builder, records, unsupported, chosen, params, applied, output, baseline_inputs,
                baseline_defaults, target_mask, default_reason)


BIAS_OUTPUT = "bias_relevance"
LAYER_PREFIX = "layer_relevance__"
ARRIVING_PREFIX = "layer_arriving__"


def _bias_relevance(plan: Plan, units: bool) -> tuple[str, list[dict]]:
    """[N, columns]: per rule application, relevance arriving minus relevance passed on (what the bias and the
    stabilizer absorbed); with ``units``, epsilon-ruled linear layers get one column per bias unit."""
    b = plan.builder
    types = library().attribute_types("bias_units")
    one = b.constant("bias_axis_1", np.array([1], dtype=np.int64))
    parts, columns = [], []
    for record in plan.records:
        if not record.passed:
            continue
        if units and record.epsilon_terms is not None:
            bias, y, r, shape = record.epsilon_terms
            rank = len(shape or [0, 0])
            attrs = [make_attribute("lrp_epsilon", plan.params["epsilon"], types["lrp_epsilon"]),
                     make_attribute("bias_shape", [-1] + [1] * (rank - 2), types["bias_shape"]),
                     make_attribute("spatial_axes", list(range(2, rank)), types["spatial_axes"])]
            (column,) = b.call("bias_units", [bias, y, r], f"{record.node}__bias_units", attrs)
            count = (shape or [None, None])[1]
            columns.append({"node": record.node, "units": count})
        else:
            arriving = _sample_total(b, record.arriving, f"{record.node}__arr_sum")
            passed = _sample_total(b, record.passed, f"{record.node}__layer_sum")
            column = b.plain("Unsqueeze", [b.plain("Sub", [arriving, passed], f"{record.node}__absorbed"), one],
                             f"{record.node}__absorbed_col")
            columns.append({"node": record.node, "units": 1})
        parts.append(column)
    if not parts:
        raise OnnxlrpError(f"{plan.source}: no rule application to account bias relevance for")
    out = b.fresh("bias_relevance_all")
    b.nodes.append(helper.make_node("Concat", parts, [out], axis=1, name=b.fresh("lrp/bias_concat")))
    return out, columns


def _layer_outputs(plan: Plan, arriving: bool) -> list[tuple[str, str]]:
    """Per-sample relevance totals per rule application, as (output name, tensor) pairs."""
    outputs = []
    for record in plan.records:
        if not record.passed:
            continue
        outputs.append((LAYER_PREFIX + record.node,
                        _sample_total(plan.builder, record.passed, f"{record.node}__layer_sum")))
        if arriving:
            outputs.append((ARRIVING_PREFIX + record.node,
                            _sample_total(plan.builder, record.arriving, f"{record.node}__arr_sum")))
    return outputs


def _sample_total(builder: _Builder, tensors: list[str], name: str) -> str:
    """The per-sample sum [N] of relevance tensors, built once per name (the layer outputs and the bias
    accounting share them)."""
    if name not in builder.totals:
        parts = [builder.call("sample_sum", [t], f"{t}__sum")[0] for t in tensors]
        builder.totals[name] = builder.total(parts, name)
    return builder.totals[name]


def _explained_tensor(view: GraphView, name: str | None, source: str, twins: dict[str, str] | None = None) -> str:
    outputs = [o.name for o in view.model.graph.output]
    if name is not None and name not in outputs:
        raise OnnxlrpError(f"{source}: no output named {name!r}; outputs are: {', '.join(outputs)}")
    if name is None:  # the first output that depends on a float input (skl2onnx lists the label first)
        name = next((o for o in outputs if scores_tensor(view, o, twins) in view.activations), outputs[0])
    tensor = scores_tensor(view, name, twins)
    if tensor not in view.activations:
        raise OnnxlrpError(f"{source}: output {name!r} does not depend on any floating-point model input, "
                           f"so there is no relevance to compute")
    return tensor


def _all_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {vi.name for vi in list(graph.input) + list(graph.output)} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _walk(view: GraphView, path: list[int], rules: dict[int, str | None], chosen: Composite, params: dict,
          explained: str, builder: _Builder, reference: dict[str, str] | None = None, target_mask: bool = False):
    lib = library()
    opset = default_opset(view.model)
    start = "start_relevance" if chosen.signal == "relevance" else "start_gradient"
    if target_mask:
        (seed,) = builder.call(f"{start}_mask", [explained, TARGET_MASK_INPUT], f"{explained}__R")
    else:
        (seed,) = builder.call(start, [explained, TARGET_INPUT], f"{explained}__R")
    contributions: dict[str, list[str]] = {explained: [seed]}
    records: list[RuleRecord] = []
    unsupported: list[tuple[str, str, str]] = []
    options = {k: v for k, v in params.items() if k != "lrn_rule"}
    fusions = find_fusions(view, path)
    absorbed = {a: view.node_name(f.producer) for f in fusions.values() for a in f.absorbed}

    for index in reversed(path):
        node = view.nodes[index]
        name, rule = view.node_name(index), rules[index]
        spec = lib.ops.get(node.op_type)
        record = RuleRecord(name, node.op_type, node_category(view, index), rule)
        records.append(record)
        if index in absorbed:  # part of the linear layer that ends here; its producer applies the rule
            record.rule, record.template = f"fused into {absorbed[index]}", None
            continue
        fusion = fusions.get(index)
        if spec is None or rule is None:
            why = "" if spec is None else f"no rule for category {record.category!r} in composite {chosen.name}"
            unsupported.append((name, node.op_type, why))
            continue
        for y, out in enumerate(node.output):
            if fusion is not None and y == 0:
                out = fusion.output
            if out not in contributions:
                continue
            relevance = builder.total(contributions[out], f"{out}__R")
            record.arriving.append(relevance)
            for x in view.activation_inputs(index):
                ctx = BindContext(view, index, x, y, builder.constant, opset, fusion, rule, builder.plain,
                                  reference)
                linear = VARIANTS[spec.variant](ctx) if spec.variant else None
                template = spec.template_for(rule, x, linear)
                if template is None:
                    unsupported.append((name, node.op_type, f"no template for rule {rule!r}"))
                    continue
                if template == NO_RELEVANCE:
                    continue
                if spec.linear and f"{rule}_nonneg" in lib.linear_rules and view.nonnegative(node.input[x]):
                    template = f"{template}_nonneg"  # the terms for negative inputs vanish
                record.template = template
                try:
                    inputs, attrs = bind(ctx, lib.function(template), lib.attribute_types(template), options,
                                         spec.binder)
                except NoRelevance:
                    continue
                except Unsupported as exc:
                    unsupported.append((name, node.op_type, str(exc)))
                    continue
                record.params = {a.name[len(RULE_PARAMETER_PREFIX):]: helper.get_attribute_value(a)
                                 for a in attrs if a.name.startswith(RULE_PARAMETER_PREFIX)}
                inputs = [relevance if i == "__R__" else i for i in inputs]
                if spec.linear and rule == "epsilon":
                    record.epsilon_terms = (inputs[2], inputs[3], relevance, view.shape(out))
                (r_x,) = builder.call(template, inputs, f"{node.input[x]}__R_from_{name}", attrs)
                if spec.elementwise:
                    r_x = _unbroadcast(view, node.input[x], out, r_x, builder)
                record.passed.append(r_x)
                contributions.setdefault(node.input[x], []).append(r_x)
    records.reverse()
    _finish_inputs(view, chosen, contributions, builder, reference)
    return records, unsupported


def _unbroadcast(view: GraphView, x: str, y: str, r_x: str, builder: _Builder) -> str:
    """Sum relevance computed on the broadcast shape back onto x's shape (no-op when shapes agree)."""
    xs, ys = view.shape(x), view.shape(y)
    if xs is None or ys is None:
        return r_x
    lead = len(ys) - len(xs)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(xs) if d == 1 and ys[lead + a] != 1]
    if not axes:
        return r_x
    lib = library()
    attr = make_attribute("axes", axes, lib.attribute_types("unbroadcast")["axes"])
    (out,) = builder.call("unbroadcast", [x, r_x], f"{r_x}__unbroadcast", [attr])
    return out


def _finish_inputs(view: GraphView, chosen: Composite, contributions: dict[str, list[str]],
                   builder: _Builder, reference: dict[str, str] | None) -> None:
    """Produce ``<input>_relevance`` for every float input."""
    for vi in view.float_inputs:
        target = vi.name + RELEVANCE_SUFFIX
        parts = contributions.get(vi.name)
        if not parts:
            (zeros,) = builder.call("zeros_like", [vi.name], f"{target}__zeros")
            cast = vi.type.tensor_type.elem_type not in FLOAT_TYPES
            builder.nodes.append(helper.make_node("Cast" if cast else "Identity", [zeros], [target],
                                                  name=builder.fresh(f"lrp/{target}"),
                                                  **({"to": TensorProto.FLOAT} if cast else {})))
            continue
        signal = builder.total(parts, f"{target}__signal")
        if chosen.signal == "gradient":
            (signal,) = builder.call("gradient_times_input", [vi.name, signal], f"{target}__gxi")
        elif chosen.signal == "deeplift":
            (signal,) = builder.call("times_delta", [vi.name, reference[vi.name], signal], f"{target}__delta")
        builder.nodes.append(helper.make_node("Identity", [signal], [target], name=builder.fresh(f"lrp/{target}")))


def _assemble(view: GraphView, builder: _Builder, records: list[RuleRecord], chosen: Composite, params: dict,
              applied: list[str], layers: list[tuple[str, str]]) -> onnx.ModelProto:
    source = view.model
    graph = onnx.GraphProto()
    graph.CopyFrom(source.graph)
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    float_inputs = view.float_inputs
    batch = float_inputs[0].type.tensor_type.shape.dim[0] if float_inputs and \
        float_inputs[0].type.tensor_type.shape.dim else None
    target = helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, ["N"])
    if batch is not None:
        target.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.input.append(target)
    for vi in float_inputs:
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        out.name = vi.name + RELEVANCE_SUFFIX
        if out.type.tensor_type.elem_type not in FLOAT_TYPES:  # a raw integer image: relevance as float32
            out.type.tensor_type.elem_type = TensorProto.FLOAT
        graph.output.append(out)

    for name, tensor in layers:
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=builder.fresh(f"lrp/{name}")))
        elem = float_inputs[0].type.tensor_type.elem_type if float_inputs else TensorProto.FLOAT
        graph.output.append(helper.make_tensor_value_info(
            name, elem if elem in FLOAT_TYPES else TensorProto.FLOAT, [None, None] if name == BIAS_OUTPUT else [None]))
    opset = default_opset(source)
    functions = []
    for function in library().closure(sorted(builder.functions)):
        function = _copy_with_opset(function, opset)
        functions.append(function)
    model = helper.make_model(graph, functions=functions, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)] + [
        o for o in source.opset_import if o.domain not in ("", "ai.onnx", DOMAIN)])
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
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _copy_with_opset(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    for imp in copy.opset_import:
        if imp.domain == "":
            imp.version = max(imp.version, opset)
    return copy
