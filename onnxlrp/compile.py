"""Stage 3: compile a model into one that explains it. ``make_plan`` loads and canonicalises the model and runs
the reverse walk (reverse_walk.py, building with builder.py); ``compile_model`` adds the optional outputs
(layer_outputs.py, extra_outputs.py), assembles the compiled model (assemble.py, its names: interface.py) and
checks it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import onnx

from .assemble import assemble, copied
from .builder import Builder
from .canonical import canonicalize
from .composites import Composite, assign_rules, get_composite, node_category, node_overrides, validate_options
from .diagnostics import cancelling_sums, warn
from .errors import OnnxlrpError, UnsupportedError
from .extra_outputs import add_relevance_at, relevance_at_outputs, token_ids_metadata
from .interface import BIAS_OUTPUT, reserve
from .layer_outputs import absorbed_relevance, layer_outputs
from .quantized import float_twin
from .graph import GraphView
from .patterns import recognise
from .portable import inline as inline_functions
from .reference import reference_forward
from .reverse_walk import RuleRecord, walk
from .shapes import probe_shapes
from .load import check, model_source, read_model, weightless
from .targets import default_composite, scores_tensor, set_target_inputs
from .templates import user_rules_in_effect
from .user_rules import rules_fingerprint
from .weights import is_large, join_weights


@dataclass
class Plan:
    """Everything the reverse walk decided, before the model is assembled (also what `inspect` shows)."""

    source: str
    view: GraphView
    builder: Builder
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
    layers = layer_outputs(plan, arriving=emit_layers == "check") if emit_layers else []
    columns: list[dict] = []
    if bias_relevance is not None:
        if bias_relevance not in ("layers", "units"):
            raise OnnxlrpError(f"{plan.source}: --bias-relevance must be layers or units, got {bias_relevance!r}")
        if plan.composite.signal == "deeplift":
            raise OnnxlrpError(f"{plan.source}: --bias-relevance needs a relevance or gradient composite, not "
                               f"{plan.composite.name}")
        tensor, columns = absorbed_relevance(plan, bias_relevance == "units")
        name = plan.builder.fresh(BIAS_OUTPUT)
        plan.builder.output_roles[name] = ["", "bias"]
        layers.append((name, tensor))
    compiled = assemble(plan.view, plan.builder, plan.records, plan.composite, plan.params,
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
    forward_types = {vi.name: copied(vi) for vi in proto.graph.value_info if vi.name in tensors}
    kept = [vi for vi in proto.graph.value_info if vi.name in declared]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    rules = assign_rules(view, path, chosen)
    try:
        per_node = node_overrides(view, path, chosen, rules, params)
    except OnnxlrpError as exc:
        raise OnnxlrpError(f"{source}: {exc}") from None

    builder = Builder(taken=_all_names(proto), forward_types=forward_types)
    reserve(view, builder, target_mask)
    reference, baseline_inputs, baseline_defaults = None, [], []
    if chosen.signal == "deeplift" and view.token_lookups:
        raise OnnxlrpError(f"{source}: deeplift needs a floating-point input; token ids "
                           f"({view.token_lookups[0].input!r}) have no baseline")
    if chosen.signal == "deeplift":
        nodes, reference, baseline_inputs, baseline_defaults = reference_forward(view, baseline, source,
                                                                                 builder.fresh)
        builder.nodes.extend(nodes)
        builder.taken.update(o for n in nodes for o in n.output)
    records, unsupported, contributions = walk(view, path, rules, chosen, params, explained, builder, reference,
                                               per_node, portable, target_mask)
    output = explain_output or next(o.name for o in view.model.graph.output
                                    if scores_tensor(view, o.name, twins) == explained)
    findings = cancelling_sums(view, path, rules, {i: node_category(view, i) for i in path})
    return Plan(source, view, builder, records, unsupported, chosen, params, applied, output, baseline_inputs,
                baseline_defaults, warnings=findings, contributions=contributions, reference=reference,
                target_mask=target_mask, default_reason=default_reason)

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
