"""The torchvision classification families (random weights, small inputs), exported by both torch exporters
with a dynamic batch: compile -> onnx.checker full_check -> ORT run -> finite relevance of the input's shape ->
original outputs bit-identical to the uncompiled model; resnet18 and vgg11_bn equal Zennit with its canonizers."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import onnxlrp
from helpers import exact_zennit_batch_norm
from onnxlrp.load import weightless
from torch_models import EXPORTERS, export

exact_zennit_batch_norm()  # Zennit 0.5.1 leaves eps in its merged BatchNorms (see helpers)

# name -> input size (AlexNet and VGG need 224: their adaptive pools cannot be exported from smaller maps)
ZOO = {
    "alexnet": 224, "vgg11_bn": 224, "resnet18": 64, "resnet50": 64, "densenet121": 64, "squeezenet1_1": 64,
    "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64, "shufflenet_v2_x0_5": 64,
    "googlenet": 64, "regnet_y_400mf": 64,
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so that folding them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


def sample(name: str, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 3, ZOO[name], ZOO[name])


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            cache[(name, exporter)] = export(build(name), sample(name), folder / f"{name}_{exporter}.onnx", exporter)
        return cache[(name, exporter)]
    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_compiles_runs_and_keeps_outputs(zoo_export, name, exporter):
    path = zoo_export(name, exporter)
    compiled = onnxlrp.compile_model(path)
    onnx.checker.check_model(weightless(compiled), full_check=True)
    x = sample(name).numpy()
    session = onnxlrp.runtime.make_session(compiled, ["CPUExecutionProvider"])
    y, relevance = session.run(["y", "x_relevance"], {"x": x, "target": np.array([-1, 3], dtype=np.int64)})
    assert relevance.shape == x.shape and relevance.dtype == np.float32
    assert np.isfinite(relevance).all() and np.abs(relevance).sum() > 0
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(y, original)


SEEDS = (100, 101, 102)


@functools.cache
def zennit_float64(name: str, seed: int) -> np.ndarray:
    """Zennit's EpsilonPlusFlat with its torchvision canonizer, computed in float64 (the float32 reference has
    rounding errors of its own: on vgg11_bn it differs from its float64 self by up to 5e-3 relative L2 on some
    random inputs, where onnxlrp on ONNX Runtime stays within 5e-5 of the float64 reference)."""
    x = sample(name, seed).double()
    model = build(name).double()
    with torch.no_grad():
        one_hot = torch.eye(10, dtype=torch.float64)[model(x).argmax(1)]
    canonizer = {"resnet18": ResNetCanonizer, "vgg11_bn": VGGCanonizer}[name]
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[canonizer()])) as attributor:
        _, expected = attributor(x.clone(), lambda out: out * one_hot)
    return expected.detach().numpy()


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_zoo_model_equals_zennit(zoo_export, name, exporter):
    """On several random inputs, to 1e-4 relative L2 (Zennit's merged BatchNorms made exact, see helpers)."""
    explainer = onnxlrp.Explainer(zoo_export(name, exporter), providers=["CPUExecutionProvider"])
    for seed in SEEDS:
        _, relevance = explainer.explain(sample(name, seed).numpy())
        expected = zennit_float64(name, seed)
        assert np.linalg.norm(relevance - expected) / np.linalg.norm(expected) <= 1e-4, seed
