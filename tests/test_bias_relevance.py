"""Bias relevance ("blame the bias", seed 000): with --bias-relevance, input relevance + bias relevance equals
the start relevance exactly (up to float error), per layer and per bias unit."""
from __future__ import annotations

import json

import numpy as np
import pytest

import onnxlrp


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet_small", "concat"])
@pytest.mark.parametrize("composite,epsilon", [("epsilon", 0.0), ("epsilon", 0.1), ("epsilon_plus_flat", 1e-6),
                                               ("epsilon_gamma_box", 1e-6)])
@pytest.mark.parametrize("mode", ["layers", "units"])
def test_input_plus_bias_relevance_is_the_start_relevance(exported, name, composite, epsilon, mode):
    from torch_models import sample_input
    compiled = onnxlrp.compile_model(exported(name, "dynamo18"), composite, epsilon=epsilon, bias_relevance=mode)
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    x = sample_input(name).numpy()
    target = np.array([0, 1, 2])
    y, relevance, bias = session.run(["y", "x_relevance", "bias_relevance"], {"x": x, "target": target})
    start = y[np.arange(3), target]
    total = relevance.reshape(3, -1).sum(1) + bias.sum(1)
    np.testing.assert_allclose(total, start, rtol=1e-4, atol=1e-5 * np.abs(start).max())
    columns = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.bias_relevance"])
    assert bias.shape == (3, sum(c["units"] for c in columns))
    if composite == "epsilon" and epsilon == 0.0:
        assert np.abs(bias).sum() > 0  # the biases of these nets do absorb relevance


def test_units_split_the_layer_totals(exported):
    path = exported("lenet", "dynamo18")
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    feeds = {"x": x, "target": np.array([-1, -1, -1])}
    results = {}
    for mode in ("layers", "units"):
        compiled = onnxlrp.compile_model(path, "epsilon", epsilon=0.01, bias_relevance=mode)
        bias = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"]).run(["bias_relevance"], feeds)[0]
        columns = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.bias_relevance"])
        edges = np.cumsum([0] + [c["units"] for c in columns])
        results[mode] = {c["node"]: bias[:, a:b].sum(1) for c, a, b in zip(columns, edges[:-1], edges[1:])}
    conv = [n for n in results["units"] if "conv" in n.lower()][0]
    assert len(results["layers"]) == len(results["units"])
    for node in results["layers"]:
        np.testing.assert_allclose(results["units"][node], results["layers"][node], rtol=1e-4, atol=1e-6)
    assert conv in results["units"]


def test_bias_relevance_errors(exported):
    with pytest.raises(onnxlrp.OnnxlrpError, match="relevance or gradient composite"):
        onnxlrp.compile_model(exported("mlp", "dynamo18"), "deeplift", bias_relevance="layers")
    with pytest.raises(onnxlrp.OnnxlrpError, match="layers or units"):
        onnxlrp.compile_model(exported("mlp", "dynamo18"), bias_relevance="all")
