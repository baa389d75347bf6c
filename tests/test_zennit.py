"""Cross-check against Zennit, the reference LRP implementation, for every composite on five small models,
each exported by both torch exporters. Zennit's attribution with output relevance = score * one-hot must equal
the compiled model's input relevance to relative L2 <= 1e-3 (in practice ~1e-6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus,
                               EpsilonPlusFlat)
from zennit.torchvision import ResNetCanonizer

import onnxlrp
from helpers import exact_zennit_batch_norm
from torch_models import EXPORTERS, MODELS, build, sample_input

exact_zennit_batch_norm()  # Zennit 0.5.1 leaves eps in its merged BatchNorms (see helpers)

LOW, HIGH = -3.0, 3.0
COMPOSITES = {
    "epsilon_plus_flat": lambda c: EpsilonPlusFlat(canonizers=c),
    "epsilon_gamma_box": lambda c: EpsilonGammaBox(low=LOW, high=HIGH, canonizers=c),
    "epsilon_alpha2_beta1_flat": lambda c: EpsilonAlpha2Beta1Flat(canonizers=c),
    "epsilon_plus": lambda c: EpsilonPlus(canonizers=c),
    "epsilon_alpha2_beta1": lambda c: EpsilonAlpha2Beta1(canonizers=c),
}


def zennit_relevance(name: str, composite: str, x: torch.Tensor, target: np.ndarray) -> np.ndarray:
    model = build(name)
    canonizers = [ResNetCanonizer()] if name == "resnet_small" else [SequentialMergeBatchNorm()]
    one_hot = torch.eye(model(x).shape[1])[torch.as_tensor(target)]
    with Gradient(model=model, composite=COMPOSITES[composite](canonizers)) as attributor:
        _, relevance = attributor(x.clone(), lambda out: out * one_hot)
    return relevance.detach().numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_zennit(exported, name, composite, exporter):
    x = sample_input(name)
    explainer = onnxlrp.Explainer(exported(name, exporter), composite=composite, low=LOW, high=HIGH)
    outputs, relevance = explainer.explain(x.numpy())
    with torch.no_grad():
        scores = build(name)(x).numpy()
    np.testing.assert_allclose(outputs["y"], scores, rtol=1e-4, atol=1e-5)
    target = scores.argmax(1)
    expected = zennit_relevance(name, composite, x, target)
    assert relevance.shape == x.shape
    assert np.abs(expected).sum() > 0
    assert rel_l2(relevance, expected) <= 1e-3


@pytest.mark.parametrize("name", ["lenet", "concat"])
def test_explicit_target_equals_zennit(exported, name):
    x = sample_input(name)
    target = np.array([1, 0, 2])
    explainer = onnxlrp.Explainer(exported(name, "dynamo18"), composite="epsilon_plus_flat")
    _, relevance = explainer.explain(x.numpy(), target=target)
    assert rel_l2(relevance, zennit_relevance(name, "epsilon_plus_flat", x, target)) <= 1e-3


class _FullyConvolutional(torch.nn.Module):
    """Strided, grouped and stride-1 convolutions, max pooling and a global average pool: any input size."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                                 nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_spatial_size_equals_zennit(tmp_path, exporter):
    """An export with dynamic height and width: the compiled model explains any input size, like Zennit."""
    import contextlib
    import io
    import warnings
    torch.manual_seed(0)
    model = _FullyConvolutional().eval()
    path = tmp_path / "dyn.onnx"
    example = torch.randn(2, 3, 20, 24)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript17":
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N"}})
        else:
            dims = ({0: torch.export.Dim("N"), 2: torch.export.Dim("H", min=8), 3: torch.export.Dim("W", min=8)},)
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["x"],
                              output_names=["y"], dynamic_shapes=dims, external_data=False)
    explainer = onnxlrp.Explainer(path, composite="epsilon_plus_flat")
    for size in [(20, 24), (17, 31)]:
        x = torch.randn(2, 3, *size)
        _, relevance = explainer.explain(x.numpy())
        with torch.no_grad():
            one_hot = torch.eye(5)[model(x).argmax(1)]
        with Gradient(model=model, composite=EpsilonPlusFlat()) as attributor:
            _, expected = attributor(x.clone(), lambda out: out * one_hot)
        assert rel_l2(relevance, expected.detach().numpy()) <= 1e-3
