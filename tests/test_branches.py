"""RepVGG's training form (3x3 conv + BN, 1x1 conv + BN and an identity BN, summed) is fused into one conv for the
rules (onnxlrp/branches.py): its relevance equals Zennit's on the deployed (re-parameterised) RepVGG block; the
forward stays bit-identical."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlus

from onnxlrp import compile_model
from torch_models import export


class RepVGGBlock(nn.Module):
    def __init__(self, channels: int, identity: bool = True) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.one = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels) if identity else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)

    def deployed(self) -> nn.Conv2d:
        """RepVGG's re-parameterisation: one 3x3 conv with the summed kernels and biases."""
        def fold(conv_weight, bn):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return conv_weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

        w3, b3 = fold(self.dense[0].weight, self.dense[1])
        w1, b1 = fold(nn.functional.pad(self.one[0].weight, [1, 1, 1, 1]), self.one[1])
        weight, bias = w3 + w1, b3 + b1
        if self.identity is not None:
            delta = torch.zeros_like(weight)
            delta[range(weight.shape[0]), range(weight.shape[0]), 1, 1] = 1.0
            wi, bi = fold(delta, self.identity)
            weight, bias = weight + wi, bias + bi
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
        conv.weight.data, conv.bias.data = weight.detach(), bias.detach()
        return conv


class Net(nn.Module):
    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = RepVGGBlock(6, identity)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))))


def _randomise(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(-1.0, 1.5)  # some negative scales: branches that cancel
            m.bias.data.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_repvgg_training_form_equals_zennit_on_deployed(tmp_path, identity, composite):
    torch.manual_seed(0)
    net = Net(identity)
    _randomise(net)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    path = export(net, x, tmp_path / "repvgg.onnx", "torchscript17")
    compiled = compile_model(str(path), composite)
    rules = json.loads({p.key: p.value for p in compiled.metadata_props}["onnxlrp.rules"])
    fused = [r for r in rules if str(r["rule"]).startswith("fused into")]
    assert len(fused) == (4 if identity else 2)  # the 1x1 conv, the Adds, the identity BN (export folds the others)
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    y, relevance = session.run(None, {"x": x.numpy(), "target": np.full(2, -1, np.int64)})
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(y, original)

    deployed = nn.Sequential(net.stem, nn.ReLU(), net.block.deployed(), nn.ReLU(), net.head).eval()
    with torch.no_grad():
        np.testing.assert_allclose(deployed(x).numpy(), y, rtol=1e-4, atol=1e-5)
    one_hot = torch.eye(4)[torch.as_tensor(y.argmax(1))]
    zennit = {"epsilon_plus": EpsilonPlus, "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}[composite]()
    with Gradient(model=deployed, composite=zennit) as attributor:
        _, expected = attributor(x.clone(), lambda out: out * one_hot)
    expected = expected.detach().numpy()
    error = float(np.linalg.norm(relevance - expected) / np.linalg.norm(expected))
    assert error <= 1e-4, error
