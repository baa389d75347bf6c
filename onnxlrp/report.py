"""Human-readable reports: what `inspect` shows before compiling, and the conservation table of `--check`."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx

from .compile import Plan
from .diagnostics import OnnxlrpWarning
from .errors import OnnxlrpError
from .interface import ARRIVING_PREFIX, LAYER_PREFIX, Interface
from .layer_outputs import absorber_kind

#: Rules that pass on exactly the relevance they receive, up to the stabilizer (ε = 1e-6).
CONSERVING = {"pass", "gradient", "norm", "flat", "taylor", "identity"}
#: LXT's rules (gradient signal) that pass on what they receive (the identity rule up to its 1e-10).
LXT_CONSERVING = {"lxt_identity", "lxt_uniform", "lxt_cp", "lxt_gate", "detached"}
#: Ops whose gradient routing drops relevance by design (on padding, unselected elements, gates).
DROPPING_OPS = {"Pad"}
DRIFT_TOLERANCE = 1e-3


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def inspect_text(plan: Plan) -> str:
    """Every node on the relevance path with its rule, template and parameters; canonicalisations; the
    unsupported nodes."""
    rows = [[r.node, r.op, r.category or "?", r.rule or "-", r.template or "-", _bias(plan, r),
             ", ".join(f"{k}={_number(v)}" for k, v in sorted(r.params.items()))] for r in plan.records]
    header = ["node", "op", "category", "rule", "template", "bias", "parameters"]
    if any(r.why for r in plan.records):  # a user composite with overrides: why each node got its rule
        header.append("why")
        for row, record in zip(rows, plan.records):
            row.append(record.why)
    parts = [f"model: {plan.source}",
             f"composite: {plan.composite.name} (Zennit: {plan.composite.zennit}), signal: {plan.composite.signal}"
             + (f"; {plan.default_reason}" if plan.default_reason else ""),
             f"explained: output {plan.explained_output!r} "
             f"({'start = output * target_mask' if plan.target_mask else 'class given by target'}); "
             f"relevance for input(s): {', '.join(vi.name for vi in plan.view.float_inputs) or 'none'}"
             + (f"; constant input(s): {', '.join(sorted(plan.view.constant_inputs))}"
                if plan.view.constant_inputs else ""),
             f"parameters: {json.dumps(plan.params, sort_keys=True)}",
             f"canonicalizations: {', '.join(plan.canonicalizations) or 'none'}",
             f"recognised on the relevance path: {_recognised(plan) or 'nothing'}",
             *_token_ids_lines(plan),
             f"relevance path: {len(plan.records)} nodes", "",
             _table(header, rows), ""]
    if plan.warnings:
        parts.append(f"warnings: {len(plan.warnings)}")
        parts += [f"  {w}" for w in plan.warnings]
    if plan.unsupported:
        parts.append(f"unsupported: {len(plan.unsupported)} node(s)")
        parts += [f"  {name} ({op}){': ' + why if why else ''}" for name, op, why in plan.unsupported]
    else:
        parts.append("unsupported: none")
    return "\n".join(parts)


def _number(value) -> str:
    """A rule parameter for the table: 0.25, or [-2.12, -2.04, -1.8] for per-channel bounds."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]" if len(value) != 1 else f"{value[0]:g}"
    return f"{value:g}"


def _token_ids_lines(plan: Plan) -> list[str]:
    """For text models: which input holds the token ids and which embedding lookup its relevance sums."""
    from .extra_outputs import token_ids_metadata
    meta = token_ids_metadata(plan)
    if meta is None:
        return []
    lookups = "; ".join(f"{x['node']} (Gather of {x['weight']!r} [{x['vocab']}, {x['hidden']}])"
                        for x in meta["lookups"]) or "none reaches the explained output (relevance 0)"
    return [f"token ids: {meta['input']} -> {meta['output']} = per-token sum over the hidden axis at lookup "
            f"{lookups}", f"no relevance: {', '.join(meta['no_relevance']) or 'none'}"]


def _recognised(plan: Plan) -> str:
    """The transformer concepts the rules see (attention scores, softmax, layer norm, GELU, ...), counted."""
    from .patterns import recognised_labels
    path = [i for i, node in enumerate(plan.view.nodes) if node.name in {r.node for r in plan.records}]
    return ", ".join(f"{label} x{n}" for label, n in sorted(recognised_labels(plan.view.nodes, path).items()))


def _bias(plan: Plan, record) -> str:
    """For linear layers: whether a bias (own or folded from BatchNorm / an Add) takes part in the rule."""
    if record.epsilon_terms is not None or (record.template or "").split("_")[0] in ("conv", "convgrouped", "gemm",
                                                                                   "matmul"):
        node = next((n for n in plan.view.nodes if n.name == record.node), None)
        folded = any(r.rule == f"fused into {record.node}" for r in plan.records)
        own = node is not None and len(node.input) > 2 and bool(node.input[2])
        return "yes" if own or folded else "no"
    return ""


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0, tokens: int = 8) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (dynamic batch -> ``batch``); ValueError for other dynamic dims of
    float inputs. Integer inputs that index an embedding table draw from its rows (dynamic length -> ``tokens``);
    other integer inputs of such a model (masks) are ones; raw integer images draw from 0..255."""
    rng = np.random.default_rng(seed)
    target = Interface.of(model).target_input
    weights = {t.name: t for t in model.graph.initializer}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in weights:
            table = weights[node.input[0]].dims
            rows[node.input[1]] = min(rows.get(node.input[1], table[0]), table[0]) if table else 1
    text = bool(rows)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in weights or vi.name == target:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        floating = np.issubdtype(dtype, np.floating)
        shape = [batch if (i == 0 and d is None) else tokens if (d is None and text and not floating) else d
                 for i, d in enumerate(dims)]
        if any(d is None for d in shape):
            raise ValueError(f"input {vi.name!r} has dynamic dimensions {dims}; cannot make a random input")
        if floating:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif vi.name in rows:
            feeds[vi.name] = rng.integers(0, rows[vi.name], shape).astype(dtype)
        elif text:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[vi.name] = rng.integers(0, 256, shape).astype(dtype)
    return feeds


def conservation_rows(rules: list[dict], values: dict[str, np.ndarray], signal: str,
                      roles: dict[str, list[str]] | None = None) -> list[dict]:
    """Per rule application (``rules``: the compiled model's ``onnxlrp.rules`` metadata; ``roles``: its layer
    outputs, see interface.Interface; default: the usual names): relevance received and passed on (mean over the
    batch), drift, and a flag."""
    outputs = {(node, kind): name for name, (node, kind) in roles.items()} if roles is not None else {}
    rows = []
    for record in rules:
        node, op, rule = record["node"], record["op"], record["rule"]
        name = outputs.get((node, "passed"), LAYER_PREFIX + node)
        if name not in values:
            continue
        arriving = float(values[outputs.get((node, "arriving"), ARRIVING_PREFIX + node)].mean())
        passed = float(values[name].mean())
        drift = (passed - arriving) / max(abs(arriving), 1e-12)
        conserving = rule in CONSERVING and op not in DROPPING_OPS
        kind = absorber_kind(record.get("category"), op)
        if signal == "gradient":  # relevance t * signal: softmax, bias, constant and normalisation shares
            linear = rule in LXT_CONSERVING or record.get("category") in ("routing", "sum")
            expected, flag = (f"absorbs {kind}" if kind != "other" else "conserves" if linear
                              else "gradient (no conservation)"), ""
        elif signal != "relevance":
            expected, flag = f"{signal} (no conservation)", ""
        elif conserving:
            expected = "conserves"
            flag = ("LOSES" if drift < 0 else "CREATES") if abs(drift) > DRIFT_TOLERANCE else ""
        else:
            expected, flag = "absorbs bias/stabilizer" if op not in DROPPING_OPS else "drops padding", ""
        rows.append({"layer": node, "op": op, "rule": rule, "arriving": arriving,
                     "passed": passed, "drift": drift, "expected": expected, "flag": flag})
    return rows


def absorbed_by_kind(columns: list[dict], bias: np.ndarray) -> dict[str, float]:
    """Mean over the batch of the bias_relevance output, summed per kind of absorber (softmax, bias, ...)."""
    totals: dict[str, float] = {}
    edges = np.cumsum([0] + [c["units"] for c in columns])
    for column, a, b in zip(columns, edges[:-1], edges[1:]):
        kind = column.get("kind", "bias")
        totals[kind] = totals.get(kind, 0.0) + float(bias[:, a:b].sum(1).mean())
    return totals


def books_text(start: float, total: float, absorbed: dict[str, float]) -> str:
    """One line: start relevance = input relevance + every absorbed share, and what is left over."""
    shares = ", ".join(f"{kind} {value:.6g}" for kind, value in sorted(absorbed.items()))
    gap = start - total - sum(absorbed.values())
    return (f"books: start {start:.6g} = input {total:.6g} + absorbed {sum(absorbed.values()):.6g} ({shares}); "
            f"gap {gap:.3g} ({abs(gap) / max(abs(start), 1e-12):.2g} of the start)")


def conservation_text(rows: list[dict], start: float, total: float) -> str:
    table = _table(["layer", "op", "rule", "Σ arriving", "Σ passed on", "absorbed", "drift", "expected", "flag"],
                   [[r["layer"], r["op"], r["rule"], f"{r['arriving']:.6g}", f"{r['passed']:.6g}",
                     f"{r['arriving'] - r['passed']:.3g}", f"{r['drift']:+.2e}", r["expected"], r["flag"]]
                    for r in rows])
    flagged = sum(1 for r in rows if r["flag"])
    return (f"{table}\n\nstart relevance (mean over the batch): {start:.6g}; input relevance: {total:.6g}; "
            f"{flagged} layer(s) flagged")


def check_report(model, composite: str, explain_output: str | None, options: dict) -> tuple[str, int]:
    """`compile --check`: compile with per-layer totals, run once on random input; (the conservation table, the
    number of flagged layers: conserving rules that lose or create more than DRIFT_TOLERANCE)."""
    from .compile import compile_model
    from .runtime import make_session
    from .composites import get_composite
    accounts = composite is None or get_composite(composite, "identity").signal != "deeplift"  # books by kind
    with warnings.catch_warnings():  # the compile itself has already issued them
        warnings.simplefilter("ignore", OnnxlrpWarning)
        checked = compile_model(model, composite, explain_output=explain_output, emit_layers="check",
                                bias_relevance="layers" if accounts else None, **options)
    interface = Interface.of(checked)
    try:
        feeds = random_feeds(checked)
    except ValueError as exc:
        raise OnnxlrpError(f"{model}: --check: {exc}") from None
    feeds[interface.target_input] = np.full(next(iter(feeds.values())).shape[0], -1, dtype=np.int64)
    session = make_session(checked)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    meta = {p.key: p.value for p in checked.metadata_props}
    rows = conservation_rows(json.loads(meta["onnxlrp.rules"]), values, meta["onnxlrp.signal"],
                             interface.output_roles)
    start = rows[-1]["arriving"] if rows else 0.0
    total = float(np.mean(sum(values[o].reshape(len(values[o]), -1).sum(1)
                              for o in interface.relevance_outputs.values())))
    text = conservation_text(rows, start, total)
    if accounts:
        bias = next(name for name, role in interface.output_roles.items() if role == ["", "bias"])
        text += "\n" + books_text(start, total, absorbed_by_kind(json.loads(meta["onnxlrp.bias_relevance"]),
                                                                  values[bias]))
    return text, sum(1 for r in rows if r["flag"])
