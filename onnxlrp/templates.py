"""Rule templates: ONNX functions kept as data in rules/, loaded and instantiated per op.

Layout of rules/:
  common/*.onnxtxt   helpers (stabilizer, positive/negative parts, ...)
  linear/*.onnxtxt   one generic function per rule for linear layers, written against two placeholders,
                     ``onnxlrp.fwd (X, W, B)`` (the layer with modified inputs/weights) and
                     ``onnxlrp.bwd (S, W, X)`` (its transposed pass)
  ops/*.onnxtxt      op-specific templates and the fwd/bwd pair of every linear op (``conv_fwd``, ``conv_bwd``, ...)
  ops.toml           per op: its category, and the template that implements each rule
  composites.toml    per composite: the rule for each category
A linear rule is instantiated for an op by binding the placeholders: ``linear_zplus`` + ``conv`` -> ``conv_zplus``.
"""
from __future__ import annotations

import copy
import tomllib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import onnx
import onnx.parser
from onnx import AttributeProto, FunctionProto

DOMAIN = "onnxlrp"
_SUBDIRS = ("common", "linear", "ops")


@dataclass(frozen=True)
class OpSpec:
    """What ops.toml says about one ONNX op type."""

    op_type: str
    category: str
    category_one_activation: str | None = None
    linear: str | None = None  # prefix of the fwd/bwd pair for linear ops
    binder: str | None = None
    variant: str | None = None  # variants.VARIANTS entry choosing the fwd/bwd pair per node
    linear_variants: tuple[str, ...] = ()  # other transposed passes (<variant>_bwd) sharing <linear>_fwd
    elementwise: bool = False
    templates: dict[str, str | list[str]] = field(default_factory=dict)

    def template_for(self, rule: str, input_index: int, variant: str | None = None) -> str | None:
        """Template name implementing ``rule`` for the given input of this op, or None.

        variant: for a linear op, the fwd/bwd pair to use (default: the op's own); otherwise a replacement
        template for this node (see ``variant`` in ops.toml)."""
        if self.linear is not None:
            return f"{variant or self.linear}_{rule}" if rule in library().linear_rules else None
        name = self.templates.get(rule)
        if variant and isinstance(name, str) and f"{name}_{variant}" in library().functions:
            return f"{name}_{variant}"
        if isinstance(name, list):
            return name[input_index] if input_index < len(name) and name[input_index] else None
        return name


class TemplateLibrary:
    """All rule templates, the op table and the composites, read once from the rules package (plus the user's
    rule folders, see user_rules.load_rules_dir)."""

    def __init__(self, user_dirs: tuple[str, ...] = ()) -> None:
        root = resources.files("onnxlrp.rules")
        self.functions: dict[str, FunctionProto] = {}
        self.linear_rules: dict[str, FunctionProto] = {}
        for sub in _SUBDIRS:
            for entry in sorted(root.joinpath(sub).iterdir(), key=lambda e: e.name):
                if not entry.name.endswith(".onnxtxt"):
                    continue
                function = onnx.parser.parse_function(entry.read_text())
                if sub == "linear":
                    self.linear_rules[entry.name[: -len(".onnxtxt")]] = function
                else:
                    self.functions[function.name] = function
        ops = tomllib.loads(root.joinpath("ops.toml").read_text())
        for directory in user_dirs:
            from .user_rules import load_rules_dir
            load_rules_dir(directory, self.functions, self.linear_rules, ops)
        self.ops = {name: _op_spec(name, table) for name, table in ops.items()}
        self.variant_of = {v: spec.linear for spec in self.ops.values() for v in spec.linear_variants}
        self.composites: dict = tomllib.loads(root.joinpath("composites.toml").read_text())

    def function(self, name: str) -> FunctionProto:
        """The function called ``name``; linear rules are instantiated on first use."""
        if name not in self.functions:
            prefix, _, rule = name.partition("_")
            if rule not in self.linear_rules or f"{prefix}_bwd" not in self.functions:
                raise KeyError(name)
            self.functions[name] = self._instantiate_linear(rule, prefix)
        return self.functions[name]

    def _instantiate_linear(self, rule: str, prefix: str) -> FunctionProto:
        generic = self.linear_rules[rule]
        # a variant (convs1, ...) has a transposed pass of its own but the forward of its op (conv_fwd)
        fwd = self.functions[f"{self.variant_of.get(prefix, prefix)}_fwd"]
        bwd = self.functions[f"{prefix}_bwd"]
        function = copy.deepcopy(generic)
        function.name = f"{prefix}_{rule}"
        types = {**attribute_types(fwd), **attribute_types(bwd)}
        for node in function.node:
            if node.domain == DOMAIN and node.op_type in ("fwd", "bwd"):
                target = fwd if node.op_type == "fwd" else bwd
                node.op_type = target.name
                for attr in target.attribute:
                    node.attribute.append(
                        AttributeProto(name=attr, ref_attr_name=attr, type=types[attr]))
        extra = [a for a in list(fwd.attribute) + list(bwd.attribute) if a not in function.attribute]
        function.attribute.extend(dict.fromkeys(extra))
        return function

    def closure(self, names: list[str]) -> list[FunctionProto]:
        """The named functions and every onnxlrp function they call, callees first."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            for node in self.function(name).node:
                if node.domain == DOMAIN:
                    visit(node.op_type)
            order.append(name)

        for name in names:
            visit(name)
        return [self.function(n) for n in order]

    def attribute_types(self, name: str) -> dict[str, int]:
        """Declared attribute name -> AttributeProto type, from the references inside the function (recursively)."""
        types: dict[str, int] = {}
        for node in self.function(name).node:
            for attr in node.attribute:
                if attr.ref_attr_name:
                    if node.domain == DOMAIN:
                        inner = self.attribute_types(node.op_type)
                        types[attr.ref_attr_name] = inner.get(attr.name, attr.type)
                    else:
                        types[attr.ref_attr_name] = attr.type
        return types


def attribute_types(function: FunctionProto) -> dict[str, int]:
    """Attribute types referenced directly in a function body."""
    return {a.ref_attr_name: a.type for n in function.node for a in n.attribute if a.ref_attr_name}


def _op_spec(name: str, table: dict) -> OpSpec:
    known = {"category", "category_one_activation", "linear", "linear_variants", "binder", "variant", "elementwise"}
    return OpSpec(
        op_type=name,
        category=table["category"],
        category_one_activation=table.get("category_one_activation"),
        linear=table.get("linear"),
        binder=table.get("binder"),
        variant=table.get("variant"),
        linear_variants=tuple(table.get("linear_variants", ())),
        elementwise=bool(table.get("elementwise", False)),
        templates={k: v for k, v in table.items() if k not in known},
    )


#: The user's rule folders (--rules DIR) in effect; set with ``user_rules_in_effect``.
_USER_DIRS: ContextVar[tuple[str, ...]] = ContextVar("onnxlrp_user_rule_dirs", default=())


def library() -> TemplateLibrary:
    """The template library: the package's rules plus the user's rule folders in effect."""
    return _library(_USER_DIRS.get())


@cache
def _library(user_dirs: tuple[str, ...]) -> TemplateLibrary:
    return TemplateLibrary(user_dirs)


@contextmanager
def user_rules_in_effect(directories):
    """Within the block, library() includes the templates and op rows of these folders (--rules DIR)."""
    dirs = tuple(str(Path(d).resolve()) for d in (directories or ()))
    token = _USER_DIRS.set(dirs)
    try:
        if dirs:
            _library(dirs)  # read (and check) the folders now
        yield
    finally:
        _USER_DIRS.reset(token)
