"""The plain-graph form of a compiled model (``--inline``, ``--portable``): the rule functions inlined, then two
small tidy-ups so that ONNX Runtime loads it without a warning. Which templates the portable form may use is
decided per node in variants.PORTABLE_VARIANTS."""
from __future__ import annotations

import onnx
import onnx.inliner
from onnx import helper

from .load import weightless
from .weights import join_weights, split_weights


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every model-local function inlined: inline_local_functions -> castlike_to_cast ->
    drop_unused_initializers (the metadata is kept). The inliner serialises what it is given: it inlines a copy
    without the large weights (weights.split_weights), and ``model`` takes the result, keeping its weights."""
    split = split_weights(model)
    inlined = onnx.inliner.inline_local_functions(split.light)
    model = join_weights(model, inlined, split.large, split.stubs, split.order)
    return drop_unused_initializers(castlike_to_cast(model))


def castlike_to_cast(model: onnx.ModelProto) -> onnx.ModelProto:
    """CastLike(x, like) -> Cast(x, to=<like's element type>) in the main graph, wherever shape inference knows
    that type (always, for an inlined compiled model).

    The templates use CastLike to stay dtype-generic. Once they are inlined, ONNX Runtime meets CastLikes whose
    inputs are all constants (ones_like of a weight, a rule parameter cast like a weight) before it expands them,
    and warns for each that it has no kernel to fold it ("Could not find a CPU kernel and hence can't constant
    fold CastLike node"). Cast has a kernel, and a Cast to the same type is removed."""
    castlikes = [n for n in model.graph.node if n.op_type == "CastLike" and n.domain in ("", "ai.onnx")]
    if not castlikes:
        return model
    graph = onnx.shape_inference.infer_shapes(weightless(model)).graph
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({vi.name: vi.type.tensor_type.elem_type
                  for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
                  if vi.type.tensor_type.elem_type})
    for node in castlikes:
        to = types.get(node.input[1])
        if to:
            node.CopyFrom(helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=to))
    return model


def drop_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove initializers that no node reads and that are not graph inputs or outputs.

    A template may take an input that its rule does not need (linear_epsilon takes the bias B like every linear
    rule, but reads the layer's output instead); once inlined, nothing reads the bias the compiler bound to it,
    and ONNX Runtime warns "Removing initializer ... It is not used by any node"."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {vi.name for vi in graph.input} \
        | {vi.name for vi in graph.output} | {name for node in graph.node for name in _subgraph_inputs(node)}
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name not in used:
            del graph.initializer[k]
    return model


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read inside the subgraphs of a node (If, Loop, Scan), which may refer to outer initializers."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
            names.update(sub.input)
            names.update(_subgraph_inputs(sub))
    return names
