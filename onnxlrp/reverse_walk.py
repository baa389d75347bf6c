"""Stage 3, the reverse walk: seed the explained output, then for each node on the relevance path (last first)
apply its rule template to every activation input, summing relevance where a tensor fans out."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from .bind_context import BindContext, NoRelevance, Unsupported
from .bindings import RULE_PARAMETER_PREFIX, bind, make_attribute
from .builder import Builder
from .composites import Composite, node_category
from .fusion import find_fusions
from .graph import FLOAT_TYPES, GraphView
from .load import default_opset
from .templates import library
from .variants import choose_variant

NO_RELEVANCE = "none"  # ops.toml template name: this input receives no relevance


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


def walk(view: GraphView, path: list[int], rules: dict[int, str | None], chosen: Composite, params: dict,
         explained: str, builder: Builder, reference: dict[str, str] | None = None,
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


def _unbroadcast(view: GraphView, x: str, y: str, r_x: str, builder: Builder) -> str:
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
                   builder: Builder, reference: dict[str, str] | None) -> None:
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


def relevance_signal(view: GraphView, chosen: Composite, contributions: dict[str, list[str]], builder: Builder,
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
