"""Conservation, the gradient composite, and the same numbers on ORT and onnx.reference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx.reference import ReferenceEvaluator

import onnxlrp
from torch_models import export, sample_input


def _bias_free_relu_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 1 * 1, 5, bias=False)).eval()


@pytest.fixture(scope="module")
def bias_free(tmp_path_factory):
    x = torch.randn(4, 3, 8, 8)
    return export(_bias_free_relu_net(), x, tmp_path_factory.mktemp("cons") / "relu.onnx", "dynamo18"), x.numpy()


def test_lrp0_conserves_the_target_score(bias_free):
    path, x = bias_free
    outputs, relevance = onnxlrp.Explainer(path, composite="epsilon", epsilon=0.0).explain(x, target=[0, 1, 2, 3])
    scores = outputs["y"][np.arange(4), [0, 1, 2, 3]]
    np.testing.assert_allclose(relevance.reshape(4, -1).sum(1), scores, rtol=1e-5, atol=1e-6)


def test_gradient_composite_equals_lrp0_without_biases(bias_free):
    path, x = bias_free
    _, lrp0 = onnxlrp.Explainer(path, composite="epsilon", epsilon=0.0).explain(x)
    _, gxi = onnxlrp.Explainer(path, composite="gradient").explain(x)
    np.testing.assert_allclose(gxi, lrp0, rtol=1e-4, atol=1e-6)
    model = _bias_free_relu_net()
    xt = torch.tensor(x, requires_grad=True)
    out = model(xt)
    out[torch.arange(4), out.argmax(1)].sum().backward()
    np.testing.assert_allclose(gxi, (xt.grad * xt).detach().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["lenet", "alexnet_grouped", "resnet_small", "concat"])
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "gradient"])
@pytest.mark.parametrize("inline", [False, True])
def test_reference_evaluator_equals_ort(exported, name, composite, inline):
    compiled = onnxlrp.compile_model(exported(name, "torchscript17"), composite, inline=inline)
    onnx.checker.check_model(compiled, full_check=True)
    if inline:
        assert not compiled.functions
    x = sample_input(name).numpy()
    feeds = {"x": x, "target": np.array([-1, 2, 0], dtype=np.int64)}
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    ort_out = session.run(None, feeds)
    ref_out = ReferenceEvaluator(compiled).run(None, feeds)
    for a, b in zip(ort_out, ref_out):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_contract_inputs_outputs_metadata(exported):
    compiled = onnxlrp.compile_model(exported("lenet", "dynamo18"))
    inputs = {i.name: i for i in compiled.graph.input}
    assert set(inputs) == {"x", "target"}
    assert inputs["target"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in compiled.graph.output] == ["y", "x_relevance"]
    relevance = compiled.graph.output[1].type.tensor_type
    assert relevance.shape.dim[0].dim_param  # the dynamic batch stays dynamic
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.composite"] == "epsilon_plus_flat"
    assert '"rule": "flat"' in meta["onnxlrp.rules"] and '"rule": "zplus"' in meta["onnxlrp.rules"]
    assert compiled.ir_version <= 10
