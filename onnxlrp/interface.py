"""The compiled model's interface: the names of its own input (``target`` or ``target_mask``) and outputs
(``<input>_relevance``, layer and bias relevance), reserved clear of the model's names when compiling and read
back from the metadata by its callers."""
from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from .builder import Builder
from .graph import GraphView
from .targets import TARGET_INPUT, TARGET_MASK_INPUT

RELEVANCE_SUFFIX = "_relevance"
BIAS_OUTPUT = "bias_relevance"
LAYER_PREFIX = "layer_relevance__"
ARRIVING_PREFIX = "layer_arriving__"


def reserve(view: GraphView, builder: Builder, target_mask: bool = False) -> None:
    """The compiled model's own input and outputs: ``target`` (or ``target_mask``) and ``<input>_relevance``, or,
    where the model already uses such a name (an input called target, ...), the first free ``<name>_1``,
    ``<name>_2``, ... (recorded in the metadata ``onnxlrp.target_input`` and ``onnxlrp.relevance_outputs``)."""
    builder.target_input = builder.fresh(TARGET_MASK_INPUT if target_mask else TARGET_INPUT)
    inputs = view.float_inputs + ([view.ids_input] if view.ids_input is not None else [])  # + a text model's ids
    builder.relevance_outputs = {vi.name: builder.fresh(vi.name + RELEVANCE_SUFFIX) for vi in inputs}


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
