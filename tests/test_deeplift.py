"""DeepLIFT (rescale) as the composite `deeplift`: equal to Captum's DeepLift on ReLU networks of Linear/Conv
layers, summation to delta, and (seed 000's claim) equal to LRP-0 for a zero baseline on bias-free ReLU nets."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from captum.attr import DeepLift

import onnxlrp
from torch_models import EXPORTERS, export


def _net(bias: bool = True, maxpool: bool = False) -> nn.Module:
    torch.manual_seed(2)
    pool = nn.MaxPool2d(2) if maxpool else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=bias), nn.ReLU(), pool, nn.Conv2d(4, 6, 3, bias=bias), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 8, bias=bias), nn.ReLU(), nn.Linear(8, 3, bias=bias)).eval()


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)).eval()


CASES = {"conv": (_net, (1, 10, 10)), "mlp": (_mlp, (6,))}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("baseline_kind", ["zeros", "file"])
def test_equals_captum_and_sums_to_delta(tmp_path, case, exporter, baseline_kind):
    build, shape = CASES[case]
    model = build()
    torch.manual_seed(4)
    x = torch.randn(4, *shape)
    base = torch.zeros(1, *shape) if baseline_kind == "zeros" else torch.randn(1, *shape) * 0.5
    baseline = "zeros"
    if baseline_kind == "file":
        baseline = str(tmp_path / "base.npy")
        np.save(baseline, base.numpy()[0])
    path = export(model, x, tmp_path / "m.onnx", exporter)
    target = [0, 1, 2, 0]
    outputs, relevance = onnxlrp.Explainer(path, composite="deeplift", baseline=baseline).explain(x.numpy(),
                                                                                                  target=target)
    expected = DeepLift(model).attribute(x, baselines=base.expand_as(x), target=torch.tensor(target))
    expected = expected.detach().numpy()
    assert np.linalg.norm(relevance - expected) / np.linalg.norm(expected) <= 1e-4
    with torch.no_grad():
        delta = (model(x) - model(base.expand_as(x)))[torch.arange(4), torch.tensor(target)].numpy()
    np.testing.assert_allclose(relevance.reshape(4, -1).sum(1), delta, rtol=1e-4, atol=1e-6)


def test_baseline_is_an_input_with_a_default(tmp_path):
    path = export(_net(), torch.zeros(2, 1, 10, 10), tmp_path / "m.onnx", "dynamo18")
    compiled = onnxlrp.compile_model(path, "deeplift")
    assert [i.name for i in compiled.graph.input] == ["x", "target", "x_baseline"]
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 10, 10)).astype(np.float32)
    base = np.random.default_rng(1).standard_normal((2, 1, 10, 10)).astype(np.float32)
    y, r = session.run(["y", "x_relevance"], {"x": x, "target": np.array([0, 1]), "x_baseline": base})
    y0 = session.run(["y"], {"x": base, "target": np.array([0, 1])})[0]
    np.testing.assert_allclose(r.reshape(2, -1).sum(1), (y - y0)[[0, 1], [0, 1]], rtol=1e-4, atol=1e-6)


def test_maxpool_rule_sums_to_delta(tmp_path):
    """Our MaxPool rule (README: winners of x, divided by x - x0) is not Captum's cross-maximum rule, but it keeps
    summation to delta."""
    model = _net(maxpool=True)
    x = torch.randn(3, 1, 10, 10)
    path = export(model, x, tmp_path / "m.onnx", "torchscript17")
    _, relevance = onnxlrp.Explainer(path, composite="deeplift").explain(x.numpy(), target=[0, 1, 2])
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x)))[torch.arange(3), torch.tensor([0, 1, 2])].numpy()
    np.testing.assert_allclose(relevance.reshape(3, -1).sum(1), delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("maxpool", [False, True])
def test_zero_baseline_on_bias_free_relu_nets_equals_lrp0(tmp_path, maxpool):
    """Seed 000: DeepLIFT (rescale) and LRP-0 differ only in how they treat biases. With no biases and a zero
    baseline every reference activation is 0, so the secant slopes equal the LRP-0 ratios."""
    model = _net(bias=False, maxpool=maxpool)
    x = torch.randn(3, 1, 10, 10)
    path = export(model, x, tmp_path / "m.onnx", "dynamo18")
    _, deeplift = onnxlrp.Explainer(path, composite="deeplift").explain(x.numpy(), target=[0, 1, 2])
    _, lrp0 = onnxlrp.Explainer(path, composite="epsilon", epsilon=0.0).explain(x.numpy(), target=[0, 1, 2])
    # (tolerance: LRP-0 keeps the 1e-6 stabilizer of the norm rule on the average pool)
    np.testing.assert_allclose(deeplift, lrp0, rtol=1e-3, atol=1e-4 * np.abs(lrp0).max())


def test_cli_baseline_option(tmp_path):
    path = export(_mlp(), torch.zeros(2, 6), tmp_path / "m.onnx", "dynamo18")
    np.save(tmp_path / "b.npy", np.ones(6, np.float32))
    out = tmp_path / "o.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "-o", str(out),
                             "--composite", "deeplift", "--baseline", str(tmp_path / "b.npy")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    default = [t for t in onnx.load(str(out)).graph.initializer if t.name == "x_baseline"][0]
    assert onnx.numpy_helper.to_array(default).tolist() == [[1.0] * 6]
    np.save(tmp_path / "bad.npy", np.ones(5, np.float32))
    result = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "-o", str(out),
                             "--composite", "deeplift", "--baseline", str(tmp_path / "bad.npy")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not fit input 'x'" in result.stderr
