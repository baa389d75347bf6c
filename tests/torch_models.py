"""Small PyTorch models for the cross-checks, and their exports by both torch exporters (cached per session)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

EXPORTERS = ("torchscript17", "dynamo18")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                                 nn.Linear(10, 5))

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class GroupedAlexNet(nn.Module):
    """AlexNet-like: strided first conv, grouped convs, overlapping 3x3/2 max pools, dilation, odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12), nn.ReLU(),
            nn.Conv2d(12, 8, 1), nn.ReLU(),
            nn.AvgPool2d(3, 1, padding=1, count_include_pad=False))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                                        nn.Linear(16, 7))

    def forward(self, x):
        return self.classifier(self.features(x))


class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, two torchvision BasicBlocks (one downsampling), global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8)
        down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.layer2 = BasicBlock(8, 12, stride=2, downsample=down)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated on channels (inception-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 4 * 4, 5))

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.cat([self.a(s), self.b(s)], dim=1))


MODELS = {
    "mlp": (MLP, (1, 3, 4)),
    "lenet": (LeNet, (1, 16, 16)),
    "alexnet_grouped": (GroupedAlexNet, (3, 35, 35)),
    "resnet_small": (SmallResNet, (3, 16, 16)),
    "concat": (ConcatNet, (3, 8, 8)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with deterministic random weights (BatchNorm statistics randomised too), in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def sample_input(name: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, *MODELS[name][1])


def export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> Path:
    """Export with a dynamic batch by the TorchScript (opset 17) or the dynamo (opset 18) exporter."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript17":
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["x"],
                              output_names=["y"], dynamic_shapes=({0: torch.export.Dim("N")},),
                              external_data=False)
    return path
