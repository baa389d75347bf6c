"""Human-readable reports: what `inspect` shows before compiling, and the conservation table of `--check`."""
from __future__ import annotations

import json

import numpy as np
import onnx

from .compile import ARRIVING_PREFIX, LAYER_PREFIX, Plan

#: Rules that pass on exactly the relevance they receive, up to the stabilizer (ε = 1e-6).
CONSERVING = {"pass", "gradient", "norm", "flat", "taylor", "identity"}
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
             ", ".join(f"{k}={v:g}" for k, v in sorted(r.params.items()))] for r in plan.records]
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
             f"relevance path: {len(plan.records)} nodes", "",
             _table(["node", "op", "category", "rule", "template", "bias", "parameters"], rows), ""]
    if plan.unsupported:
        parts.append(f"unsupported: {len(plan.unsupported)} node(s)")
        parts += [f"  {name} ({op}){': ' + why if why else ''}" for name, op, why in plan.unsupported]
    else:
        parts.append("unsupported: none")
    return "\n".join(parts)


def _bias(plan: Plan, record) -> str:
    """For linear layers: whether a bias (own or folded from BatchNorm / an Add) takes part in the rule."""
    if record.epsilon_terms is not None or (record.template or "").split("_")[0] in ("conv", "convgrouped", "gemm",
                                                                                   "matmul"):
        node = next((n for n in plan.view.nodes if n.name == record.node), None)
        folded = any(r.rule == f"fused into {record.node}" for r in plan.records)
        own = node is not None and len(node.input) > 2 and bool(node.input[2])
        return "yes" if own or folded else "no"
    return ""


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (dynamic batch -> ``batch``); ValueError for other dynamic dims."""
    rng = np.random.default_rng(seed)
    weights = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in weights or vi.name == "target":
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shape = [batch if (i == 0 and d is None) else d for i, d in enumerate(dims)]
        if any(d is None for d in shape):
            raise ValueError(f"input {vi.name!r} has dynamic dimensions {dims}; cannot make a random input")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 256, shape).astype(dtype)
    return feeds


def conservation_rows(rules: list[dict], values: dict[str, np.ndarray], signal: str) -> list[dict]:
    """Per rule application (``rules``: the compiled model's ``onnxlrp.rules`` metadata): relevance received and
    passed on (mean over the batch), drift, and a flag."""
    rows = []
    for record in rules:
        node, op, rule = record["node"], record["op"], record["rule"]
        name = LAYER_PREFIX + node
        if name not in values:
            continue
        arriving = float(values[ARRIVING_PREFIX + node].mean())
        passed = float(values[name].mean())
        drift = (passed - arriving) / max(abs(arriving), 1e-12)
        conserving = rule in CONSERVING and op not in DROPPING_OPS
        if signal != "relevance":
            expected, flag = f"{signal} (no conservation)", ""
        elif conserving:
            expected = "conserves"
            flag = ("LOSES" if drift < 0 else "CREATES") if abs(drift) > DRIFT_TOLERANCE else ""
        else:
            expected, flag = "absorbs bias/stabilizer" if op not in DROPPING_OPS else "drops padding", ""
        rows.append({"layer": node, "op": op, "rule": rule, "arriving": arriving,
                     "passed": passed, "drift": drift, "expected": expected, "flag": flag})
    return rows


def conservation_text(rows: list[dict], start: float, total: float) -> str:
    table = _table(["layer", "op", "rule", "Σ arriving", "Σ passed on", "absorbed", "drift", "expected", "flag"],
                   [[r["layer"], r["op"], r["rule"], f"{r['arriving']:.6g}", f"{r['passed']:.6g}",
                     f"{r['arriving'] - r['passed']:.3g}", f"{r['drift']:+.2e}", r["expected"], r["flag"]]
                    for r in rows])
    flagged = sum(1 for r in rows if r["flag"])
    return (f"{table}\n\nstart relevance (mean over the batch): {start:.6g}; input relevance: {total:.6g}; "
            f"{flagged} layer(s) flagged")
