"""The passes that leave the weights out (weights.py): the opset upgrade, constant folding, inlining and the
compiled model's assembly keep the model's own weight tensors, byte for byte, and give the same graph as the
passes run on the whole model; serialized_size equals ByteSize without encoding the weights."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import onnxscript
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import onnxlrp
from onnxlrp.canonical import fold_constants
from onnxlrp.load import upgrade_opset
from onnxlrp.weights import is_large, join_weights, serialized_size, split_weights


def _model(opset: int = 13) -> onnx.ModelProto:
    """Conv (large weight, small bias) -> ReduceMean (axes attribute before opset 18) -> MatMul with a large
    Transpose'd constant (folded) + a large unused initializer; metadata and doc strings set."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((10, 16 * 6 * 6)).astype(np.float32), "m_t"),
             numpy_helper.from_array(rng.standard_normal((40, 40)).astype(np.float32), "unused")]
    inits.append(helper.make_tensor("listed", TensorProto.FLOAT, [2000], rng.standard_normal(2000).tolist()))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[1], keepdims=1, name="mean"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Transpose", ["m_t"], ["m"], perm=[1, 0], name="transpose"),
             helper.make_node("MatMul", ["f", "m"], ["y"], name="matmul"),
             helper.make_node("Add", ["p", "listed_slice"], ["z"], name="add"),
             helper.make_node("ReduceSum", ["listed"], ["listed_slice"], keepdims=0, name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8]),
                                           helper.make_tensor_value_info("listed", TensorProto.FLOAT, [2000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits,
                              doc_string="graph doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], doc_string="model doc",
                              producer_name="test")
    model.ir_version = 8
    model.metadata_props.add(key="k", value="v")
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _canonical_bytes(model: onnx.ModelProto) -> bytes:
    """The model's bytes with its initializers sorted by name (their order carries no meaning)."""
    copy = _copy(model)
    inits = sorted(copy.graph.initializer, key=lambda t: t.name)
    ordered = [_tensor_copy(t) for t in inits]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(ordered)
    return copy.SerializeToString(deterministic=True)


def _tensor_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def test_split_and_join_restore_every_field_and_the_weight_objects():
    model = _model()
    originals = {t.name: t for t in model.graph.initializer if is_large(t)}
    before = _canonical_bytes(model)
    split = split_weights(model)
    assert split.large == {"w", "m_t", "unused", "listed"} and split.stubs == {"w", "m_t", "unused"}
    assert {t.name for t in split.light.graph.initializer} == {"b"}
    assert [vi.name for vi in split.light.graph.input] == ["x", "listed", "w", "m_t", "unused"]
    assert split.light.doc_string == "model doc" and split.light.metadata_props[0].value == "v"
    joined = join_weights(model, split.light, split.large, split.stubs, split.order)
    assert joined is model and _canonical_bytes(joined) == before
    assert all(originals[t.name] is t for t in joined.graph.initializer if t.name in originals)


def test_upgrading_without_the_weights_equals_upgrading_the_whole_model():
    whole = version_converter.convert_version(_model(), 18)
    model = _model()
    upgraded = upgrade_opset(model, "m.onnx")
    assert upgraded is model
    assert [n.op_type for n in upgraded.graph.node] == [n.op_type for n in whole.graph.node]
    assert _canonical_bytes(upgraded) == _canonical_bytes(whole)


def test_folding_keeps_unchanged_weights_and_folds_large_constants_as_before():
    model = upgrade_opset(_model(), "m.onnx")
    whole = onnx_ir.serde.deserialize_model(_copy(model))
    onnxscript.optimizer.fold_constants(whole)
    onnxscript.optimizer.remove_unused_nodes(whole)
    expected = onnx_ir.serde.serialize_model(whole)
    w = next(t for t in model.graph.initializer if t.name == "w")
    folded = fold_constants(model, "m.onnx")
    assert "Transpose" not in [n.op_type for n in folded.graph.node]  # m_t^T became an initializer
    assert next(t for t in folded.graph.initializer if t.name == "w") is w  # kept, not copied
    assert _canonical_bytes(folded) == _canonical_bytes(expected)


def test_serialized_size_is_byte_size():
    model = _model()
    assert serialized_size(model) == model.ByteSize()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data * 40  # 2-byte length varints
    model.graph.initializer[0].dims[0] = 16 * 40
    assert serialized_size(model) == model.ByteSize()


@pytest.mark.parametrize("inline", [False, True])
def test_compiled_model_keeps_the_input_weights_byte_identical(exported, inline):
    path = exported("alexnet_grouped", "torchscript17")
    source = {t.name: t.raw_data for t in onnx.load(str(path)).graph.initializer}
    compiled = onnxlrp.compile_model(path, "epsilon", inline=inline)
    kept = {t.name: t.raw_data for t in compiled.graph.initializer if t.name in source}
    assert any(len(raw) > 4 * 1024 for raw in kept.values())
    assert all(kept[name] == source[name] for name in kept)
    assert serialized_size(compiled) == compiled.ByteSize()
