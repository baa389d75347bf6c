"""Stage 3: the reverse walk. Seed the explained output, then for each node on the relevance path (last first)
apply its rule template to every activation input, summing relevance where a tensor fans out."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .bind_context import BindContext, NoRelevance, Unsupported
from .bindings import RULE_PARAMETER_PREFIX, bind, make_attribute
from .canonical import canonicalize
from .composites import Composite, assign_rules, get_composite, node_category, node_overrides, validate_options
from .diagnostics import cancelling_sums, warn
from .errors import OnnxlrpError, UnsupportedError
from .extra_outputs import add_relevance_at, relevance_at_outputs, token_ids_metadata
from .fusion import find_fusions
from .quantized import float_twin
from .graph import FLOAT_TYPES, GraphView
from .patterns import recognise
from .portable import inline as inline_functions
from .reference import reference_forward
from .shapes import probe_shapes
from .load import check, default_opset, model_source, read_model, weightless
from .targets import TARGET_INPUT, TARGET_MASK_INPUT, default_composite, scores_tensor, set_target_inputs
from .templates import DOMAIN, library, user_rules_in_effect
from .user_rules import rules_fingerprint
from .variants import choose_variant
from .weights import copy_fields, is_large, join_weights

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
    arriving_at: list[str] = field(default_factory=list, repr=False)  # the activations they belong to (a
    passed_to: list[str] = field(default_factory=list, repr=False)    # gradient signal's relevance is t * signal)
    epsilon_terms: tuple | None = field(default=None, repr=False)  # (B, Y, R, shape of Y) of an epsilon layer
    why: str = ""  # with a user composite's overrides: why the node got its rule (e.g. "override 2 (glob ...)")

    def public(self) -> dict:
        """The fields recorded in the metadata."""
        record = {"node": self.node, "op": self.op, "category": self.category, "rule": self.rule,
                  "template": self.template, "params": self.params}
        return {**record, "why": self.why} if self.why else record


@dataclass
class _Builder:
    """Collects the nodes and initializers that the relevance pass adds to the forward graph."""

    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    totals: dict[str, str] = field(default_factory=dict)  # see _sample_total
    target_input: str = TARGET_INPUT  # the compiled model's interface names, unique in the graph (see _reserve)
    batch_ref: str = ""  # a tensor whose leading axis is the batch (the explained output), for per-sample sums
    relevance_outputs: dict[str, str] = field(default_factory=dict)  # float input -> its relevance output
    output_roles: dict[str, list[str]] = field(default_factory=dict)  # layer/bias output -> [node, kind]
    shaped_like: dict[str, str] = field(default_factory=dict)  # relevance tensor -> forward tensor of its shape
    forward_types: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # inferred, with symbolic dims

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
    warnings: list[str] = field(default_factory=list)  # see diagnostics.py
    contributions: dict[str, list[str]] = field(default_factory=dict)  # tensor -> relevance parts arriving there
    reference: dict[str, str] | None = None  # DeepLIFT: activation -> its reference tensor
    target_mask: bool = False
    default_reason: str | None = None  # why the composite was chosen, when the user chose none


def compile_model(model: onnx.ModelProto | str | os.PathLike, composite: str | None = None, *,
                  explain_output: str | None = None, inline: bool = False, emit_layers: bool = False,
                  bias_relevance: str | None = None, baseline="zeros", relevance_at: list[str] | tuple = (),
                  portable: bool = False, rules=None, target_mask: bool = False, constant_inputs=(),
                  **options) -> onnx.ModelProto:
    """Compile a model into one that also outputs ``<input>_relevance`` for the class given by input ``target``.

    composite: a name from rules/composites.toml; None picks the default for the model's input (see
    ``default_composite``; metadata ``onnxlrp.composite`` and ``onnxlrp.composite_default`` say which and why).

    options: epsilon, stabilizer, gamma, alpha, beta, low, high, lrn_rule (see composites.DEFAULT_OPTIONS).
    emit_layers: add an output ``layer_relevance__<node>`` [N] per rule application (the relevance it passes
    on, summed per sample); ``"check"`` also adds ``layer_arriving__<node>`` (the relevance it received).
    bias_relevance: "layers" adds an output ``bias_relevance`` [N, layers] with the relevance each rule
    application absorbed (bias and stabilizer shares), "units" splits epsilon-ruled linear layers per bias unit;
    input relevance + bias relevance = start relevance (metadata ``onnxlrp.bias_relevance`` names the columns).
    composite: a name, or ``FILE.toml[:NAME]`` (a user composite, see user_rules). rules: folders of extra
    templates and op rows (--rules DIR).
    relevance_at: tensor names; each adds an output ``<tensor>_relevance`` shaped like the tensor.
    portable: one plain graph that every mainstream runtime runs (OpenVINO, onnx.reference, ORT): functions
    inlined, only portable template variants (variants.PORTABLE_VARIANTS); implies ``inline``.
    target_mask: instead of ``target``, the compiled model takes a float input ``target_mask`` shaped like the
    explained output (broadcastable to it): start relevance = output * mask (Zennit's attr_output), for
    segmentation maps, detection heads or any weighting of several scores. Without it, ``target`` has a default
    of [-1] (the top-scoring class), so callers of regression models may leave it out.
    constant_inputs: names of float inputs that are parameters (e.g. a Keras Normalization's mean and variance
    exported as inputs): they get no relevance output (inputs backed by an initializer of the same name are
    weights anyway).
    """
    if rules:
        with user_rules_in_effect(rules):
            compiled = compile_model(model, composite, explain_output=explain_output, inline=inline,
                                     emit_layers=emit_layers, bias_relevance=bias_relevance, baseline=baseline,
                                     relevance_at=relevance_at, portable=portable, target_mask=target_mask,
                                     constant_inputs=constant_inputs, **options)
        compiled.metadata_props.add(key="onnxlrp.user_rules", value=json.dumps(dict(rules_fingerprint(
            tuple(str(r) for r in rules)))))
        return compiled
    plan = make_plan(model, composite, explain_output=explain_output, baseline=baseline, portable=portable,
                     target_mask=target_mask, constant_inputs=constant_inputs, **options)
    if plan.unsupported:
        raise UnsupportedError(plan.source, plan.unsupported)
    extra = relevance_at_outputs(plan, list(relevance_at or []))
    layers = _layer_outputs(plan, arriving=emit_layers == "check") if emit_layers else []
    columns: list[dict] = []
    if bias_relevance is not None:
        if bias_relevance not in ("layers", "units"):
            raise OnnxlrpError(f"{plan.source}: --bias-relevance must be layers or units, got {bias_relevance!r}")
        if plan.composite.signal == "deeplift":
            raise OnnxlrpError(f"{plan.source}: --bias-relevance needs a relevance or gradient composite, not "
                               f"{plan.composite.name}")
        tensor, columns = _bias_relevance(plan, bias_relevance == "units")
        name = plan.builder.fresh(BIAS_OUTPUT)
        plan.builder.output_roles[name] = ["", "bias"]
        layers.append((name, tensor))
    compiled = _assemble(plan.view, plan.builder, plan.records, plan.composite, plan.params,
                         plan.canonicalizations, layers)
    if not portable:  # portable: the baseline is a constant (ORT warns about initializers listed as inputs)
        compiled.graph.input.extend(plan.baseline_inputs)
    compiled.graph.initializer.extend(plan.baseline_defaults)
    set_target_inputs(compiled.graph, plan.view, plan.explained_output, plan.target_mask,
                      plan.builder.target_input, portable)
    compiled.metadata_props.add(key="onnxlrp.explained_output", value=plan.explained_output)
    compiled.metadata_props.add(key="onnxlrp.warnings", value=json.dumps(plan.warnings))
    warn(plan.warnings, plan.source)
    add_relevance_at(compiled, extra)
    token_ids = token_ids_metadata(plan)
    if token_ids:
        compiled.metadata_props.add(key="onnxlrp.token_ids", value=json.dumps(token_ids))
    compiled.metadata_props.add(key="onnxlrp.outputs", value=",".join(o.name for o in plan.view.model.graph.output))
    compiled.metadata_props.add(key="onnxlrp.target", value=plan.builder.target_input)
    if plan.default_reason:
        compiled.metadata_props.add(key="onnxlrp.composite_default", value=plan.default_reason)
    if columns:
        compiled.metadata_props.add(key="onnxlrp.bias_relevance", value=json.dumps(columns))
    compiled.metadata_props.add(key="onnxlrp.portable", value=json.dumps(portable))
    # the plan's model (private to this call) becomes the compiled model: its large weights are not copied
    source = plan.view.model
    compiled = join_weights(source, compiled, {t.name for t in source.graph.initializer if is_large(t)},
                            order=tuple(t.name for t in source.graph.initializer))
    if inline or portable:
        compiled = inline_functions(compiled)
    try:
        onnx.checker.check_model(weightless(compiled), full_check=True)
    except Exception as exc:  # ValidationError or InferenceError
        raise OnnxlrpError(f"{plan.source}: internal error, the compiled model fails onnx.checker: "
                           f"{str(exc).strip().splitlines()[0]}") from None
    return compiled


def make_plan(model: onnx.ModelProto | str | os.PathLike, composite: str | None = None, *,
              explain_output: str | None = None, baseline="zeros", portable: bool = False, rules=None,
              target_mask: bool = False, constant_inputs=(),
              **options) -> Plan:
    """Load, canonicalise and walk the graph: which rule and template every node gets (nothing is raised for
    unsupported nodes; they are listed in the plan)."""
    if rules:
        with user_rules_in_effect(rules):
            return make_plan(model, composite, explain_output=explain_output, baseline=baseline, portable=portable,
                             target_mask=target_mask, constant_inputs=constant_inputs, **options)
    source = model_source(model)
    try:
        params = validate_options(options)
        chosen = get_composite(composite, str(params["lrn_rule"])) if composite is not None else None
    except OnnxlrpError as exc:
        raise OnnxlrpError(f"{source}: {exc}") from None
    proto = read_model(model)
    check(proto, source)
    declared = {vi.name for vi in proto.graph.value_info}
    proto, applied = canonicalize(proto, source)
    proto, twins = float_twin(proto, source)
    if twins:
        applied.append("float_twin")
    names = {vi.name for vi in proto.graph.input}
    unknown_inputs = [n for n in constant_inputs if n not in names]
    if unknown_inputs:
        raise OnnxlrpError(f"{source}: --constant-input {unknown_inputs[0]!r} is not a model input; inputs are: "
                           f"{', '.join(sorted(names))}")
    rule_nodes, recognised = recognise(proto)  # what the rules see; the forward keeps its nodes
    applied += [f"recognised {label} x{count}" for label, count in sorted(recognised.items())]
    view = GraphView(proto, rule_nodes=rule_nodes, constant_inputs=frozenset(constant_inputs))
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
    # the forward keeps only the shapes the model declared: ONNX Runtime fuses more (e.g. SkipLayerNormalization)
    # where it knows more shapes, and the original outputs must stay bit-identical (view.info keeps them all)
    forward_types = {vi.name: _copied(vi) for vi in proto.graph.value_info if vi.name in tensors}
    kept = [vi for vi in proto.graph.value_info if vi.name in declared]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    rules = assign_rules(view, path, chosen)
    try:
        per_node = node_overrides(view, path, chosen, rules, params)
    except OnnxlrpError as exc:
        raise OnnxlrpError(f"{source}: {exc}") from None

    builder = _Builder(taken=_all_names(proto), forward_types=forward_types)
    _reserve(view, builder, target_mask)
    reference, baseline_inputs, baseline_defaults = None, [], []
    if chosen.signal == "deeplift" and view.token_lookups:
        raise OnnxlrpError(f"{source}: deeplift needs a floating-point input; token ids "
                           f"({view.token_lookups[0].input!r}) have no baseline")
    if chosen.signal == "deeplift":
        nodes, reference, baseline_inputs, baseline_defaults = reference_forward(view, baseline, source,
                                                                                 builder.fresh)
        builder.nodes.extend(nodes)
        builder.taken.update(o for n in nodes for o in n.output)
    records, unsupported, contributions = _walk(view, path, rules, chosen, params, explained, builder, reference,
                                                per_node, portable, target_mask)
    output = explain_output or next(o.name for o in view.model.graph.output
                                    if scores_tensor(view, o.name, twins) == explained)
    findings = cancelling_sums(view, path, rules, {i: node_category(view, i) for i in path})
    return Plan(source, view, builder, records, unsupported, chosen, params, applied, output, baseline_inputs,
                baseline_defaults, warnings=findings, contributions=contributions, reference=reference,
                target_mask=target_mask, default_reason=default_reason)


def _reserve(view: GraphView, builder: _Builder, target_mask: bool = False) -> None:
    """The compiled model's own input and outputs: ``target`` (or ``target_mask``) and ``<input>_relevance``, or,
    where the model already uses such a name (an input called target, ...), the first free ``<name>_1``,
    ``<name>_2``, ... (recorded in the metadata ``onnxlrp.target_input`` and ``onnxlrp.relevance_outputs``)."""
    builder.target_input = builder.fresh(TARGET_MASK_INPUT if target_mask else TARGET_INPUT)
    inputs = view.float_inputs + ([view.ids_input] if view.ids_input is not None else [])  # + a text model's ids
    builder.relevance_outputs = {vi.name: builder.fresh(vi.name + RELEVANCE_SUFFIX) for vi in inputs}


BIAS_OUTPUT = "bias_relevance"
LAYER_PREFIX = "layer_relevance__"
ARRIVING_PREFIX = "layer_arriving__"


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


def _bias_relevance(plan: Plan, units: bool) -> tuple[str, list[dict]]:
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


def _layer_outputs(plan: Plan, arriving: bool) -> list[tuple[str, str]]:
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


def _sample_total(builder: _Builder, tensors: list[str], name: str, at: list[str] | None = None) -> str:
    """The per-sample sum [N] of relevance tensors, built once per name (the layer outputs and the bias
    accounting share them); ``at``: the activations of gradient signals, the relevance being their product."""
    if name not in builder.totals:
        if at is not None:
            tensors = [builder.call("gradient_times_input", [x, g], f"{g}__times_input")[0]
                       for x, g in zip(at, tensors)]
        parts = [builder.call("sample_sum", [t, builder.batch_ref], f"{t}__sum")[0] for t in tensors]
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
          explained: str, builder: _Builder, reference: dict[str, str] | None = None,
          per_node: dict[int, tuple[dict, str]] | None = None, portable: bool = False, target_mask: bool = False):
    lib = library()
    opset = default_opset(view.model)
    start = "start_relevance" if chosen.signal == "relevance" else "start_gradient"
    (seed,) = builder.call(f"{start}_mask" if target_mask else start, [explained, builder.target_input],
                           f"{explained}__R")
    builder.shaped_like[seed] = explained
    builder.batch_ref = explained
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
        node_options = options
        if per_node and index in per_node:  # a user composite's override: its own rule parameters
            node_options = {k: v for k, v in per_node[index][0].items() if k != "lrn_rule"}
            record.why = per_node[index][1]
        if index in absorbed:  # part of the linear layer that ends here; its producer applies the rule
            record.rule, record.template = f"fused into {absorbed[index]}", None
            continue
        fusion = fusions.get(index)
        if spec is None or rule is None:
            why = unsupported_reason(view, index) if spec is None else \
                f"no rule for category {record.category!r} in composite {chosen.name}"
            unsupported.append((name, node.op_type, why))
            continue
        for y, out in enumerate(node.output):
            if fusion is not None and y == 0:
                out = fusion.output
            if out not in contributions:
                if not (unsupported and view.consumers.get(out)):
                    continue
                # relevance is blocked by an unsupported node downstream: bind anyway (a placeholder relevance;
                # the plan is never assembled) so that every unsupported node is listed, not just the last one
                contributions[out] = [BLOCKED]
            relevance = builder.total(contributions[out], f"{out}__R")
            builder.shaped_like.setdefault(relevance, out)
            record.arriving.append(relevance)
            record.arriving_at.append(out)
            for x in view.activation_inputs(index):
                ctx = BindContext(view, index, x, y, builder.constant, opset, fusion, rule, builder.plain,
                                  reference, portable)
                linear = choose_variant(ctx, spec.variant) if spec.variant else None
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
                    inputs, attrs = bind(ctx, lib.function(template), lib.attribute_types(template), node_options,
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
                if not spec.elementwise or (view.shape(node.input[x]) is not None and view.shape(out) is not None):
                    builder.shaped_like[r_x] = node.input[x]  # relevance has its input's shape
                record.passed.append(r_x)
                record.passed_to.append(node.input[x])
                contributions.setdefault(node.input[x], []).append(r_x)
    records.reverse()
    unsupported[:] = list(dict.fromkeys(unsupported))  # one entry per node and reason
    _finish_inputs(view, chosen, contributions, builder, reference)
    return records, unsupported, contributions


BLOCKED = "__blocked_by_an_unsupported_node__"


def unsupported_reason(view: GraphView, index: int) -> str:
    """Why no rule covers a node on the relevance path (one that ops.toml does not list)."""
    node = view.nodes[index]
    inner = view.subgraph_activations(index)
    if inner:
        return f"reads activation {inner[0]!r} inside its subgraph ({node.op_type} is not supported)"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                        "QLinearMatMul", "ConvInteger", "MatIntegerMul", "MatMulInteger"):
        return "a quantized (QDQ) path: no rule for this op"
    return f"no rule for op {node.op_type}"


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
    """Produce ``<input>_relevance`` for every float input, and for the token-ids input of a text model (the
    per-token sum of the relevance at its embedding lookups, float32)."""
    for vi in view.float_inputs:
        target = builder.relevance_outputs[vi.name]
        signal = relevance_signal(view, chosen, contributions, builder, reference, vi.name)
        if signal is None:
            (zeros,) = builder.call("zeros_like", [vi.name], f"{target}__zeros")
            cast = vi.type.tensor_type.elem_type not in FLOAT_TYPES
            builder.nodes.append(helper.make_node("Cast" if cast else "Identity", [zeros], [target],
                                                  name=builder.fresh(f"lrp/{target}"),
                                                  **({"to": TensorProto.FLOAT} if cast else {})))
            continue
        builder.nodes.append(helper.make_node("Identity", [signal], [target], name=builder.fresh(f"lrp/{target}")))
    if view.token_lookups:
        ids = view.token_lookups[0].input
        target = builder.relevance_outputs[ids]
        parts = [relevance_signal(view, chosen, contributions, builder, reference, lookup.output)
                 for lookup in view.token_lookups]
        parts = [p for p in parts if p is not None]
        if parts:
            hidden_axis = builder.constant(f"{target}__hidden_axis", np.array([-1], dtype=np.int64))
            sums = []
            for part in parts:
                sums.append(builder.fresh(f"{part}__per_token"))
                builder.nodes.append(helper.make_node("ReduceSum", [part, hidden_axis], [sums[-1]], keepdims=0,
                                                      name=builder.fresh(f"lrp/{part}__per_token")))
            per_token = builder.total(sums, f"{target}__per_token")
        else:
            (per_token,) = builder.call("zeros_like", [ids], f"{target}__zeros")
        builder.nodes.append(helper.make_node("Cast", [per_token], [target], to=TensorProto.FLOAT,
                                              name=builder.fresh(f"lrp/{target}")))


def relevance_signal(view: GraphView, chosen: Composite, contributions: dict[str, list[str]], builder: _Builder,
                     reference: dict[str, str] | None, tensor: str) -> str | None:
    """The relevance at ``tensor`` (shaped like it), or None when no relevance reaches it: the sum of what its
    consumers pass back, times the tensor (gradient) or its difference to the reference (DeepLIFT)."""
    parts = contributions.get(tensor)
    if not parts:
        return None
    signal = builder.total(parts, f"{tensor}__relevance_signal")
    if chosen.signal == "gradient":
        (signal,) = builder.call("gradient_times_input", [tensor, signal], f"{tensor}__gxi")
    elif chosen.signal == "deeplift":
        (signal,) = builder.call("times_delta", [tensor, reference[tensor], signal], f"{tensor}__delta")
    return signal


def _assemble(view: GraphView, builder: _Builder, records: list[RuleRecord], chosen: Composite, params: dict,
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


def _copied(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(vi)
    return copy


def _relevance_types(view: GraphView, builder: _Builder) -> list[onnx.ValueInfoProto]:
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
        vi = _copied(known)
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


@dataclass(frozen=True)
class Interface:
    """The names a compiled model's caller needs (from its metadata; older models: the default names)."""

    target_input: str
    relevance_outputs: dict[str, str]  # float input -> relevance output
    output_roles: dict[str, list[str]]  # layer / bias output -> [node, "passed" | "arriving" | "bias"]

    @classmethod
    def of(cls, compiled: onnx.ModelProto) -> Interface:
        meta = {p.key: p.value for p in compiled.metadata_props}
        outputs = {o.name for o in compiled.graph.output}
        relevance = json.loads(meta["onnxlrp.relevance_outputs"]) if "onnxlrp.relevance_outputs" in meta else {
            o[: -len(RELEVANCE_SUFFIX)]: o for o in outputs if o.endswith(RELEVANCE_SUFFIX) and o != BIAS_OUTPUT}
        roles = json.loads(meta.get("onnxlrp.output_roles", "{}"))
        if not roles:
            for name in json.loads(meta.get("onnxlrp.layer_outputs", "[]")):
                for prefix, kind in ((LAYER_PREFIX, "passed"), (ARRIVING_PREFIX, "arriving")):
                    if name.startswith(prefix):
                        roles[name] = [name[len(prefix):], kind]
                if name == BIAS_OUTPUT:
                    roles[name] = ["", "bias"]
        return cls(meta.get("onnxlrp.target_input", TARGET_INPUT), relevance, roles)
