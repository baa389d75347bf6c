"""Train the shipped example: a small CaffeNet-style CNN (overlapping 3x3/2 max pools, LRN after the first two
conv blocks, dropout) on scikit-learn's bundled handwritten digits (no download), and write

    models/digits_lrn.onnx     the model (input "image": float32 [N, 1, 32, 32] in [0, 1]; output "logits")
    models/samples/*.png       a few held-out test digits as 32x32 grayscale images

Deterministic (fixed seeds, deterministic torch algorithms, one thread) and about a minute on 2 CPU cores.
Run:  python models/train_digits.py      (needs the test extra: torch; and scikit-learn)
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SIZE = 32


class DigitsNet(nn.Module):
    """conv5-relu-maxpool3/2-LRN, conv3-relu-maxpool3/2-LRN, conv3-relu, fc-relu-dropout, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.LocalResponseNorm(5, 1e-3, 0.75, 1.0),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.LocalResponseNorm(5, 1e-3, 0.75, 1.0),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.3),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load() -> tuple[np.ndarray, ...]:
    """Digits (8x8, values 0..16) scaled to [0, 1] and resized to 32x32 (bilinear), split 75/25."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    return train_test_split(images, digits.target, test_size=0.25, random_state=0, stratify=digits.target)


def train(x_train, y_train, epochs: int = 30, make_model: Callable[[], nn.Module] = DigitsNet) -> nn.Module:
    """``make_model()``'s network trained deterministically: torch seeded 0 before it is built, deterministic
    algorithms, one thread; Adam (lr 2e-3), cross-entropy, batches of 64 in an order seeded 0."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.tensor(x_train), torch.tensor(y_train)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    """ONNX export (dynamo, opset 18, dynamic batch); the decomposed LocalResponseNorm is written back as the
    LRN op (onnxlrp's canonicalisation), as Caffe-converted models have it."""
    from onnxlrp.canonical import recognise_lrn, remove_dead_nodes
    example = torch.zeros(2, 1, SIZE, SIZE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                          external_data=False)
    proto = remove_dead_nodes(recognise_lrn(onnx.load(str(path)), str(path)), str(path))
    proto.ir_version = 10
    del proto.metadata_props[:]
    for node in proto.graph.node:  # the exporter's stack traces name this machine's source paths
        del node.metadata_props[:]
    proto.doc_string = "CaffeNet-style CNN with LRN trained on scikit-learn's digits; input [N,1,32,32] in [0,1]"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


class Trained(NamedTuple):
    model: nn.Module
    info: dict
    x_test: np.ndarray
    y_test: np.ndarray


def train_and_export(name: str, make_model: Callable[[], nn.Module] = DigitsNet,
                     details: Callable[[nn.Module, np.ndarray], dict] = lambda model, x_test: {}) -> Trained:
    """Train ``make_model()``'s network on the digits split (:func:`train`), write models/<name>.onnx
    (:func:`export`) and models/<name>.json (test accuracy, sample counts, input, classes, then the entries of
    ``details(model, x_test)``) and print the test accuracy."""
    x_train, x_test, y_train, y_test = load()
    model = train(x_train, y_train, make_model=make_model)
    with torch.no_grad():
        accuracy = float((model(torch.tensor(x_test)).argmax(1).numpy() == y_test).mean())
    path = HERE / f"{name}.onnx"
    export(model, path)
    info = {"test_accuracy": round(accuracy, 4), "test_samples": int(len(y_test)),
            "train_samples": int(len(y_train)), "input": "image float32 [N,1,32,32] in [0,1]",
            "classes": list(range(10)), **details(model, x_test)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} held-out digits; wrote {path}")
    return Trained(model, info, x_test, y_test)


def main() -> None:
    trained = train_and_export("digits_lrn")
    samples = HERE / "samples"
    samples.mkdir(exist_ok=True)
    for digit in range(10):
        index = int(np.flatnonzero(trained.y_test == digit)[0])
        Image.fromarray((trained.x_test[index, 0] * 255).round().astype(np.uint8), mode="L").save(
            samples / f"digit_{digit}.png")


if __name__ == "__main__":
    sys.exit(main())
