"""Stage 2: graph passes that bring any exported model into the form the rule templates expect.

Each pass takes and returns a ModelProto and says in one line what it did; `canonicalize` runs them in order and
returns the list of passes that changed something (recorded in the compiled model's metadata).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import onnx
import onnx_ir
import onnxscript
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules import common as common_rules

from .errors import OnnxlrpError
from .load import infer_shapes, upgrade_opset
from .patterns.lrn import recognise_lrn
from .weights import is_large, join_weights, without_data

Pass = Callable[[onnx.ModelProto, str], onnx.ModelProto]


@contextlib.contextmanager
def _quiet_onnxscript() -> Iterator[None]:
    """onnxscript logs notes (e.g. skipped deduplications) that are no concern of our users."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def drop_initializer_inputs(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """IR <= 3 models list their weights as graph inputs too; they are weights, not inputs."""
    weights = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in weights]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
        if model.ir_version < 4:
            model.ir_version = 4
    return model


def fold_constants(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """onnxscript: fold constant subgraphs and drop inference-mode Dropout. Nothing that changes the forward
    numerics: BatchNormalization and bias Adds are folded into their linear layer for the rules only
    (fusion.py), so the compiled model's original outputs stay bit-identical."""
    rules = [common_rules.dropout_inference_rule, common_rules.dropout_zero_rule]
    hidden = _hide_map_types(model)
    try:
        with _quiet_onnxscript():
            ir_model = onnx_ir.serde.deserialize_model(model)
            onnxscript.optimizer.fold_constants(ir_model)
            ir_model = rewrite(ir_model, pattern_rewrite_rules=rules)
            onnxscript.optimizer.remove_unused_nodes(ir_model)
            kept = _detach_unchanged_weights(ir_model, model)
            folded = onnx_ir.serde.serialize_model(ir_model)
            for vi in folded.graph.output:
                if vi.name in hidden:
                    vi.type.CopyFrom(hidden[vi.name])
            return join_weights(model, folded, kept)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrpError(f"{source}: graph optimisation failed: {first}") from None


def _detach_unchanged_weights(ir_model: onnx_ir.Model, model: onnx.ModelProto) -> set[str]:
    """Give the large initializers that folding left as they were (still ``model``'s own TensorProtos) a
    placeholder without data in ``ir_model``, so that serialising it copies no weights; ``model`` keeps them (see
    weights.join_weights). Returns their names."""
    large = {t.name: t for t in model.graph.initializer if is_large(t)}
    kept = set()
    for name, value in ir_model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, onnx_ir.serde.TensorProtoTensor) and large.get(name) is tensor.raw \
                and tensor.raw.name == name:
            value.const_value = onnx_ir.serde.TensorProtoTensor(without_data(tensor.raw))
            kept.add(name)
    return kept


def _hide_map_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """onnx_ir cannot read map types (skl2onnx's ZipMap outputs, seq(map)): clear them on the outputs and value
    infos of a copy's worth of fields, returning the outputs' types to restore after folding."""
    def has_map(t: onnx.TypeProto) -> bool:
        kind = t.WhichOneof("value")
        return kind == "map_type" or (kind == "sequence_type" and has_map(t.sequence_type.elem_type))

    hidden = {}
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if has_map(vi.type):
            hidden[vi.name] = onnx.TypeProto()
            hidden[vi.name].CopyFrom(vi.type)
            vi.ClearField("type")
    return hidden


def remove_dead_nodes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Drop nodes whose outputs nothing uses (left behind by the rewrites), and unused initializers."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(_node_reads(node))
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(reversed(kept))
    unused = [t for t in model.graph.initializer if t.name not in needed]
    for t in unused:
        model.graph.initializer.remove(t)
    return model


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, including outer-scope names used inside its subgraphs."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                names |= _node_reads(inner)
    return names


def name_nodes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Give every node a unique name, so errors and the audit trail can point at it."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


PASSES: list[tuple[str, Pass]] = [
    ("drop_initializer_inputs", drop_initializer_inputs),
    ("upgrade_opset", upgrade_opset),
    ("fold_constants", fold_constants),
    ("recognise_lrn", recognise_lrn),
    ("remove_dead_nodes", remove_dead_nodes),
    ("name_nodes", name_nodes),
    ("infer_shapes", infer_shapes),
]


def _signature(model: onnx.ModelProto) -> tuple:
    """What a pass may change, cheap to compare (no initializer data)."""
    graph = model.graph
    return (tuple(n.SerializeToString(deterministic=True) for n in graph.node),
            tuple(vi.SerializeToString(deterministic=True) for vi in list(graph.input) + list(graph.output)),
            tuple((t.name, tuple(t.dims)) for t in graph.initializer),
            tuple((o.domain, o.version) for o in model.opset_import))


def canonicalize(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, list[str]]:
    """Run every pass; return the canonical model and the names of the passes that changed it."""
    applied = []
    for name, run in PASSES:
        before = _signature(model)
        model = run(model, source)
        if name != "infer_shapes" and _signature(model) != before:
            applied.append(name)
    return model, applied
