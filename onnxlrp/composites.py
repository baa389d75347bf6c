"""Which rule each node on the relevance path gets: composites (Zennit's presets) over op categories."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from .errors import OnnxlrpError
from .graph import GraphView
from .templates import library
from .user_rules import category_depth, is_composite_file, override_matches, read_composite_file

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
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class Composite:
    """A named mapping from op category to rule."""

    name: str
    signal: str
    rules: dict[str, str]
    first_layer: list[str] = field(default_factory=list)
    first: str | None = None
    zennit: str = ""
    overrides: list = field(default_factory=list)  # user_rules.Override, from a --composite FILE.toml
    source_text: str | None = None  # that file's content (recorded in the compiled model's metadata)


def composite_names() -> list[str]:
    """Names of all composites, the default first."""
    return [n for n in library().composites if n != "base"]


def get_composite(name: str, lrn_rule: str) -> Composite:
    """Look up a composite by name (OnnxlrpError lists the known ones), or read it from ``FILE.toml[:NAME]``."""
    tables = library().composites
    overrides, text = [], None
    if is_composite_file(name):
        name, table, overrides, text = read_composite_file(name)
        table = dict(table)
    elif name not in tables or name == "base":
        raise OnnxlrpError(f"unknown composite {name!r}; choose one of: {', '.join(composite_names())} "
                           f"(or a FILE.toml)")
    else:
        table = dict(tables[name])
    rules = dict(tables["base"]) if table["signal"] == "relevance" else {}
    meta = {"signal", "first_layer", "first", "zennit"}
    rules.update({k: v for k, v in table.items() if k not in meta})
    rules = {k: (lrn_rule if v == "@lrn_rule" else v) for k, v in rules.items()}
    return Composite(name, table["signal"], rules, table.get("first_layer", []), table.get("first"),
                     table.get("zennit", ""), overrides, text)


def validate_options(options: dict) -> dict:
    """Fill defaults and reject bad rule parameters with a one-line error."""
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise OnnxlrpError(f"unknown rule option(s): {', '.join(sorted(unknown))}")
    merged = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("epsilon", "stabilizer", "gamma", "alpha", "beta"):
        merged[key] = _finite(key, merged[key])
        if merged[key] < 0:
            raise OnnxlrpError(f"bad rule parameter: {key} must be >= 0, got {merged[key]:g}")
    for key in ("low", "high"):  # ZBox bounds: one value, or one per channel (a list)
        values = [_finite(key, v) for v in (merged[key] if isinstance(merged[key], (list, tuple)) else [merged[key]])]
        if not values:
            raise OnnxlrpError(f"bad rule parameter: {key} needs at least one value")
        merged[key] = values[0] if len(values) == 1 else values
    if abs(merged["alpha"] - merged["beta"] - 1.0) > 1e-9:
        raise OnnxlrpError(
            f"bad rule parameter: alpha - beta must equal 1, got alpha={merged['alpha']:g}, beta={merged['beta']:g}")
    low, high = (v if isinstance(v, list) else [v] for v in (merged["low"], merged["high"]))
    if len(low) != len(high) and 1 not in (len(low), len(high)):
        raise OnnxlrpError(f"bad rule parameter: low has {len(low)} values and high {len(high)}; give one or one "
                           f"per channel each")
    if any(lo > hi for lo, hi in zip(low * (len(high) if len(low) == 1 else 1),
                                      high * (len(low) if len(high) == 1 else 1))):
        raise OnnxlrpError(f"bad rule parameter: low ({merged['low']}) must not exceed high ({merged['high']})")
    if merged["lrn_rule"] not in LRN_RULES:
        raise OnnxlrpError(f"bad rule parameter: lrn_rule must be one of {', '.join(LRN_RULES)}, "
                           f"got {merged['lrn_rule']!r}")
    return merged


def _finite(key: str, value) -> float:
    """A rule parameter as a finite float (NaN and infinities would turn every relevance into NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OnnxlrpError(f"bad rule parameter: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OnnxlrpError(f"bad rule parameter: {key} must be a finite number, got {number}")
    if abs(number) > FLOAT32_MAX:
        raise OnnxlrpError(f"bad rule parameter: {key} = {number:g} is beyond float32's range (±{FLOAT32_MAX:g})")
    return number


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


def node_overrides(view: GraphView, path: list[int], composite: Composite, rules: dict[int, str | None],
                   params: dict) -> dict[int, tuple[dict, str]]:
    """Apply a user composite's per-node overrides: updates ``rules`` in place and returns, per node on the path,
    (its rule parameters, why it got its rule) — empty when the composite has no overrides."""
    if not composite.overrides:
        return {}
    categories = {i: node_category(view, i) for i in path}
    firsts = first_layer_nodes(view, path, categories, set(composite.first_layer))
    depth = category_depth(_flow(view, path), categories)
    matched = override_matches(composite.overrides, {i: view.node_name(i) for i in path}, categories, path, depth)
    result = {}
    for i in path:
        why = "first layer" if i in firsts and composite.first else f"category {categories[i]}"
        node_params = dict(params)
        for override in matched.get(i, []):
            if override.rule is not None:
                rules[i] = override.rule
            node_params.update(override.params)
            why += f"; {override.describe()}"
        if node_params != params:
            try:
                node_params = validate_options(node_params)
            except OnnxlrpError as exc:
                raise OnnxlrpError(f"{view.node_name(i)}: {exc}") from None
        result[i] = (node_params, why)
    return result


def _flow(view: GraphView, path: list[int]) -> nx.DiGraph:
    """The relevance path as a directed graph (edges from producer to consumer)."""
    flow = nx.DiGraph()
    flow.add_nodes_from(path)
    on_path = set(path)
    for i in path:
        for out in view.nodes[i].output:
            for j in view.consumers.get(out, []):
                if j in on_path:
                    flow.add_edge(i, j)
    return flow


def first_layer_nodes(view: GraphView, path: list[int], categories: dict[int, str | None],
                      first_categories: set[str]) -> set[int]:
    """Nodes of the first-layer categories with no other such node between them and the model input."""
    if not first_categories:
        return set()
    flow = _flow(view, path)
    layers = {i for i in path if categories[i] in first_categories}
    return {i for i in layers if not (nx.ancestors(flow, i) & layers)}
