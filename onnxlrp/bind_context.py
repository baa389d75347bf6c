"""What a binder sees of one template application: the node, the activation input explained and the output whose
relevance is redistributed (BindContext), and the two ways a binding can decline (Unsupported, NoRelevance)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .fusion import Fusion
from .graph import GraphView


class Unsupported(Exception):
    """This node cannot be bound (the message says why); collected into one UnsupportedError."""


class NoRelevance(Exception):
    """This input of the node receives no relevance under the rule (e.g. the gate of a product)."""


@dataclass
class BindContext:
    """One template application: node ``index``, explaining input ``x`` from output ``y``."""

    view: GraphView
    index: int
    x: int
    y: int
    add_constant: Callable[[str, np.ndarray], str]
    opset: int
    fusion: Fusion | None = None
    rule: str = ""
    add_node: Callable[[str, list[str], str], str] | None = None
    reference: dict[str, str] | None = None  # activation -> its value on the baseline (DeepLIFT)
    portable: bool = False  # choose only variants that every mainstream runtime runs (see PORTABLE_VARIANTS)

    @property
    def output(self) -> str:
        """The layer's output: the node's output ``y``, or the last output of a fused layer."""
        return self.fusion.output if self.fusion else self.node.output[self.y]

    def weight(self) -> str:
        """The weight the rules see (folded for fused layers)."""
        if self.fusion and self.fusion.weight is not None:
            return self.add_constant(f"{self.node.name}__folded_weight", self.fusion.weight)
        return self.node.input[1]

    def bias(self, units: int) -> str:
        """The bias the rules see: folded, the node's own, or zeros."""
        if self.fusion and self.fusion.bias is not None:
            return self.add_constant(f"{self.node.name}__folded_bias", self.fusion.bias)
        if len(self.node.input) > 2 and self.node.input[2]:
            return self.node.input[2]
        return self.add_constant(f"{self.node.name}__zero_bias", np.zeros([units], dtype=self.dtype(self.node.input[1])))

    @property
    def node(self) -> onnx.NodeProto:
        return self.view.nodes[self.index]

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def text(self, name: str, default: str) -> str:
        """A string attribute (stored as bytes in the proto) as str."""
        value = self.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def static_shape(self, tensor: str, start: int = 0, axis: int | None = None) -> list[int | None]:
        """The tensor's shape, requiring static sizes from axis ``start`` on (or just on ``axis``)."""
        shape = self.view.shape(tensor)
        needed = range(start, len(shape)) if shape is not None and axis is None else [axis]
        if shape is None or any(shape[a] is None for a in needed):
            what = f"axis {axis}" if axis is not None else f"axes {start}.." if start else "all axes"
            raise Unsupported(f"needs the static size of {tensor!r} ({what}), which shape inference could not "
                              f"determine")
        return list(shape)

    def rank(self, tensor: str) -> int:
        shape = self.view.shape(tensor)
        if shape is None:
            raise Unsupported(f"needs the rank of {tensor!r}, which shape inference could not determine")
        return len(shape)

    def dtype(self, tensor: str) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.view.info[tensor].elem_type or onnx.TensorProto.FLOAT)

Binding = tuple[dict[str, str], dict[str, Any]]  # formal input -> tensor, attribute -> value


def axis_attribute(ctx: BindContext, tensor: str, default: int = 0) -> int:
    """The node's ``axis`` attribute, made non-negative against the rank of ``tensor``."""
    axis = int(ctx.attr("axis", default))
    return axis + ctx.rank(tensor) if axis < 0 else axis
