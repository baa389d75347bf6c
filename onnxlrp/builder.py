"""The graph builder of the relevance pass: fresh names, constants, template calls and sums, collected beside the
forward graph by the reverse walk and the optional outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .targets import TARGET_INPUT
from .templates import DOMAIN


@dataclass
class Builder:
    """Collects the nodes and initializers that the relevance pass adds to the forward graph."""

    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    totals: dict[str, str] = field(default_factory=dict)  # see layer_outputs._sample_total
    target_input: str = TARGET_INPUT  # the compiled model's interface names, unique in the graph (interface.reserve)
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
