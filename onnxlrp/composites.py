"""Which rule each node on the relevance path gets: composites (Zennit's presets) over op categories."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .errors import OnnxlrpError
from .graph import GraphView
from .templates import library

#: Zennit's defaults, plus the zbox bounds of raw [0, 1] image data and the default LRN rule.
DEFAULT_OPTIONS: dict[str, float | str] = {
    "epsilon": 1e-6,
    "stabilizer": 1e-6,
    "gamma": 0.25,
    "alpha": 2.0,
    "beta": 1.0,
    "low": 0.0,
    "high": 1.0,
    "lrn_rule": "taylor",
}
LRN_RULES = ("identity", "taylor")


@dataclass
class Composite:
    """A named mapping from op category to rule."""

    name: str
    signal: str
    rules: dict[str, str]
    first_layer: list[str] = field(default_factory=list)
    first: str | None = None
    zennit: str = ""


def composite_names() -> list[str]:
    """Names of all composites, the default first."""
    return [n for n in library().composites if n != "base"]


def get_composite(name: str, lrn_rule: str) -> Composite:
    """Look up a composite by name (OnnxlrpError lists the known ones)."""
    tables = library().composites
    if name not in tables or name == "base":
        raise OnnxlrpError(f"unknown composite {name!r}; choose one of: {', '.join(composite_names())}")
    table = dict(tables[name])
    rules = dict(tables["base"]) if table["signal"] == "relevance" else {}
    meta = {"signal", "first_layer", "first", "zennit"}
    rules.update({k: v for k, v in table.items() if k not in meta})
    rules = {k: (lrn_rule if v == "@lrn_rule" else v) for k, v in rules.items()}
    return Composite(name, table["signal"], rules, table.get("first_layer", []), table.get("first"),
                     table.get("zennit", ""))


def validate_options(options: dict) -> dict:
    """Fill defaults and reject bad rule parameters with a one-line error."""
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise OnnxlrpError(f"unknown rule option(s): {', '.join(sorted(unknown))}")
    merged = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("epsilon", "stabilizer", "gamma", "alpha", "beta"):
        merged[key] = float(merged[key])
        if merged[key] < 0:
            raise OnnxlrpError(f"bad rule parameter: {key} must be >= 0, got {merged[key]:g}")
    if abs(merged["alpha"] - merged["beta"] - 1.0) > 1e-9:
        raise OnnxlrpError(
            f"bad rule parameter: alpha - beta must equal 1, got alpha={merged['alpha']:g}, beta={merged['beta']:g}")
    merged["low"], merged["high"] = float(merged["low"]), float(merged["high"])
    if merged["low"] > merged["high"]:
        raise OnnxlrpError(f"bad rule parameter: low ({merged['low']:g}) must not exceed high ({merged['high']:g})")
    if merged["lrn_rule"] not in LRN_RULES:
        raise OnnxlrpError(f"bad rule parameter: lrn_rule must be one of {', '.join(LRN_RULES)}, "
                           f"got {merged['lrn_rule']!r}")
    return merged


def node_category(view: GraphView, index: int) -> str | None:
    """The category of a node on the relevance path (None if its op is unknown)."""
    spec = library().ops.get(view.nodes[index].op_type)
    if spec is None:
        return None
    if spec.category_one_activation and len(view.activation_inputs(index)) == 1:
        return spec.category_one_activation
    return spec.category


def assign_rules(view: GraphView, path: list[int], composite: Composite) -> dict[int, str | None]:
    """Rule name per node on the path; None where the composite has no rule for the node's category."""
    categories = {i: node_category(view, i) for i in path}
    # first-layer rules (flat, zbox) are for an input domain such as pixels; a text model's leaves are
    # embedding lookups, where flat would spread relevance onto padded tokens: they keep the category's rule
    firsts = set() if view.token_lookups else first_layer_nodes(view, path, categories, set(composite.first_layer))
    rules: dict[int, str | None] = {}
    for i in path:
        if i in firsts and composite.first:
            rules[i] = composite.first
        else:
            rules[i] = composite.rules.get(categories[i]) if categories[i] else None
    return rules


def first_layer_nodes(view: GraphView, path: list[int], categories: dict[int, str | None],
                      first_categories: set[str]) -> set[int]:
    """Nodes of the first-layer categories with no other such node between them and the model input."""
    if not first_categories:
        return set()
    flow = nx.DiGraph()
    flow.add_nodes_from(path)
    on_path = set(path)
    for i in path:
        for out in view.nodes[i].output:
            for j in view.consumers.get(out, []):
                if j in on_path:
                    flow.add_edge(i, j)
    layers = {i for i in path if categories[i] in first_categories}
    return {i for i in layers if not (nx.ancestors(flow, i) & layers)}
