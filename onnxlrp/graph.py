"""A read-only view of a (canonical, shape-inferred) graph: which tensors carry activations, who produces and
consumes what, and which nodes lie on the relevance path to the explained tensor (networkx for reachability)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto

from .lookups import INTEGER_TYPES, TokenLookup, choose_ids_input, find_lookups

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
#: Quantized activations (see quantized.py): the integer outputs of these ops, and the 8/16-bit integer outputs
#: of any op reading an activation (a MaxPool or Reshape on int8 data in QOperator models), carry activations.
QUANTIZING_OPS = {"QuantizeLinear", "DynamicQuantizeLinear"}
QUANTIZED_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16}


@dataclass
class TensorInfo:
    """Static element type and shape (None for an unknown dimension; shape None if even the rank is unknown)."""

    elem_type: int = 0
    shape: list[int | None] | None = None


@dataclass
class GraphView:
    """Indexes over one graph; nodes are referred to by their position in topological order.

    ``rule_nodes``: the nodes the rules see, when patterns (onnxlrp.patterns) replaced groups of forward nodes by
    one recognised node; ``model`` keeps the forward graph that the compiled model runs."""

    model: onnx.ModelProto
    rule_nodes: list[onnx.NodeProto] | None = None
    constant_inputs: frozenset[str] = frozenset()  # inputs that are parameters (--constant-input): no relevance
    nodes: list[onnx.NodeProto] = field(init=False)
    info: dict[str, TensorInfo] = field(init=False)
    producer: dict[str, tuple[int, int]] = field(init=False)
    consumers: dict[str, list[int]] = field(init=False)
    initializers: dict[str, onnx.TensorProto] = field(init=False)
    activations: set[str] = field(init=False)
    subgraph_reads: dict[int, list[str]] = field(init=False)  # outer-scope names read inside a node's subgraphs
    token_lookups: list[TokenLookup] = field(init=False)  # word-embedding lookups of the token-ids input
    _nonneg: dict[str, bool] = field(init=False, default_factory=dict)  # memo of nonnegative()

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.nodes = list(graph.node if self.rule_nodes is None else self.rule_nodes)
        self.initializers = {t.name: t for t in graph.initializer}
        self.info = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            self.info[vi.name] = _tensor_info(vi)
        for t in graph.initializer:
            self.info[t.name] = TensorInfo(t.data_type, list(t.dims))
        self.producer, self.consumers, self.subgraph_reads = {}, {}, {}
        for i, node in enumerate(self.nodes):
            for j, out in enumerate(node.output):
                if out:
                    self.producer[out] = (i, j)
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
            inner = _outer_scope_reads(node)
            if inner:
                self.subgraph_reads[i] = inner
                for name in inner:
                    if i not in self.consumers.get(name, []):
                        self.consumers.setdefault(name, []).append(i)
        self.token_lookups = self._find_token_lookups()
        self.activations = self._find_activations()

    @property
    def float_inputs(self) -> list[onnx.ValueInfoProto]:
        """The inputs that receive relevance: floating-point inputs, and integer inputs (raw uint8 images) that
        the model only casts to a floating-point type, unless it is a text model (then they are masks)."""
        chosen = []
        for vi in self.model.graph.input:
            if vi.name in self.initializers or vi.name in self.constant_inputs:
                continue
            if vi.type.tensor_type.elem_type in FLOAT_TYPES or (
                    not self.token_lookups and self._cast_to_float_only(vi.name)):
                chosen.append(vi)
        return chosen

    def _cast_to_float_only(self, name: str) -> bool:
        readers = [self.nodes[i] for i in self.consumers.get(name, [])]
        return bool(readers) and all(
            n.op_type == "Cast" and any(a.name == "to" and a.i in FLOAT_TYPES for a in n.attribute) for n in readers)

    def _find_token_lookups(self) -> list[TokenLookup]:
        """The embedding lookups of the token-ids input (none for models without one): see lookups.py."""
        integers = [vi.name for vi in self.model.graph.input if vi.name not in self.initializers
                    and vi.type.tensor_type.elem_type in INTEGER_TYPES]
        candidates = find_lookups(self, integers)
        ids = choose_ids_input(candidates)
        return [lookup for lookup in candidates if lookup.input == ids]

    @property
    def ids_input(self) -> onnx.ValueInfoProto | None:
        """The token-ids input whose lookups are relevance leaves, if the model has one."""
        if not self.token_lookups:
            return None
        return next(vi for vi in self.model.graph.input if vi.name == self.token_lookups[0].input)

    def _find_activations(self) -> set[str]:
        """Float tensors that depend on a float graph input or on a token-ids lookup (everything else is a
        constant or shape data); quantized copies of activations carry them too."""
        active = {vi.name for vi in self.float_inputs} | {lookup.output for lookup in self.token_lookups}
        for i, node in enumerate(self.nodes):
            if any(name in active for name in list(node.input) + self.subgraph_reads.get(i, []) if name):
                quantizing = node.op_type in QUANTIZING_OPS
                for out in node.output:
                    elem = self.info.get(out, TensorInfo()).elem_type
                    if out and (quantizing or elem in FLOAT_TYPES | QUANTIZED_TYPES | {0}):
                        active.add(out)
        return active

    def subgraph_activations(self, index: int) -> list[str]:
        """Activations that the node reads inside its subgraphs (If branches, Loop/Scan bodies)."""
        return [name for name in self.subgraph_reads.get(index, []) if name in self.activations]

    @functools.cached_property
    def forward_index(self) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
        """(producer, readers) of every tensor in the forward graph (``nodes`` may hold recognised patterns)."""
        producer, readers = {}, {}
        for node in self.model.graph.node:
            for out in node.output:
                producer[out] = node
            for inp in node.input:
                readers.setdefault(inp, []).append(node)
        return producer, readers

    def activation_inputs(self, index: int) -> list[int]:
        """Positions of the node's inputs that carry activations."""
        return [k for k, name in enumerate(self.nodes[index].input) if name in self.activations]

    def relevance_path(self, target: str) -> list[int]:
        """Nodes through which relevance flows from ``target`` back to the inputs, in topological order."""
        flow = nx.DiGraph()
        for i, node in enumerate(self.nodes):
            for inp in list(node.input) + self.subgraph_reads.get(i, []):
                if inp in self.activations:
                    for out in node.output:
                        if out in self.activations:
                            flow.add_edge(inp, out)
        if target not in flow:
            return []
        upstream = nx.ancestors(flow, target) | {target}
        return [i for i, node in enumerate(self.nodes)
                if any(o in upstream for o in node.output)
                and (self.activation_inputs(i) or self.subgraph_activations(i))]

    def fill_shapes(self, shapes: dict[str, list[int | None] | None]) -> None:
        """Complete unknown dimensions with probed ones (see shapes.probe_shapes)."""
        for name, probed in shapes.items():
            if probed is None:
                continue
            info = self.info.setdefault(name, TensorInfo())
            if info.shape is None or len(info.shape) != len(probed):
                info.shape = list(probed)
            else:
                info.shape = [d if d is not None else p for d, p in zip(info.shape, probed)]

    def incomplete_shapes(self, names) -> list[str]:
        """Tensors among ``names`` with an unknown rank or unknown non-batch dimension."""
        return [n for n in names if self.shape(n) is None or None in self.shape(n)[1:]]

    def shape(self, name: str) -> list[int | None] | None:
        """Static shape of a tensor as far as shape inference knows it."""
        return self.info.get(name, TensorInfo()).shape

    def constant_value(self, name: str):
        """The value of an initializer or Constant-node output as a numpy array, or None if not constant."""
        from onnx import numpy_helper
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.producer:
            node = self.nodes[self.producer[name][0]]
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        return numpy_helper.to_array(attr.t)
                    if attr.name in ("value_float", "value_int"):
                        return onnx.helper.get_attribute_value(attr)
                    if attr.name in ("value_floats", "value_ints"):
                        return list(onnx.helper.get_attribute_value(attr))
        return None

    def nonnegative(self, name: str) -> bool:
        """Whether a tensor is known to be >= 0 everywhere (after Relu, through pooling, shape ops, sums of
        non-negative tensors, ...), so rules can skip their terms for negative inputs."""
        if name in self._nonneg:
            return self._nonneg[name]
        self._nonneg[name] = False  # cycles cannot occur, but be safe
        result = self._nonnegative(name)
        self._nonneg[name] = result
        return result

    def _nonnegative(self, name: str) -> bool:
        value = self.constant_value(name)
        if value is not None:
            return bool((np.asarray(value) >= 0).all())
        if name not in self.producer:
            return False
        node = self.nodes[self.producer[name][0]]
        op, inputs = node.op_type, [i for i in node.input if i]
        if op in ("Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Softplus"):
            return True
        if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
                  "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Slice",
                  "Gather", "Split", "LRN", "Expand", "Cast"):
            return self.nonnegative(inputs[0])
        if op in ("Concat", "Add", "Sum", "Mul", "Max"):
            return all(self.nonnegative(i) for i in inputs)
        if op == "Clip":
            low = self.constant_value(inputs[1]) if len(inputs) > 1 else None
            return low is not None and float(np.asarray(low)) >= 0
        if op == "Pad":
            fill = self.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
            return fill is not None and float(np.asarray(fill)) >= 0 and self.nonnegative(inputs[0])
        return False

    def node_name(self, index: int) -> str:
        """The node's name (canonicalisation gives every node one)."""
        node = self.nodes[index]
        return node.name or f"{node.op_type}_{index}"


def _outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    """Names that the node's subgraphs (If branches, Loop/Scan bodies, recursively) read from enclosing scopes."""
    reads: list[str] = []
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
            local |= {o for n in graph.node for o in n.output if o}
            for inner in graph.node:
                for name in list(inner.input) + _outer_scope_reads(inner):
                    if name and name not in local and name not in reads:
                        reads.append(name)
    return reads


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return TensorInfo(tt.elem_type, dims)
