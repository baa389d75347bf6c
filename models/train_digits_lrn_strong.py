"""Train a second shipped example whose LRN layers really normalise: models/train_digits.py's CaffeNet-style CNN
with LRN alpha = ALPHA (instead of PyTorch's default 1e-3), same data, split, seeds and training loop, and write

    models/digits_lrn_strong.onnx   the model (input "image": float32 [N, 1, 32, 32] in [0, 1]; output "logits")
    models/digits_lrn_strong.json   test accuracy and, per LRN layer over the test digits, the normaliser
                                    d = (k + alpha/n sum_window x^2)^beta over positions and channels: its mean,
                                    coefficient of variation (std / mean), min, max and max / min

Deterministic (fixed seeds, deterministic torch algorithms, one thread).
Run:  python models/train_digits_lrn_strong.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_digits import DigitsNet, export, load  # noqa: E402

ALPHA, SIZE_N, BETA, K = 2.0, 5, 0.75, 1.0


def strong_net() -> DigitsNet:
    torch.manual_seed(0)
    model = DigitsNet()
    for index in (3, 7):  # the two LocalResponseNorm layers
        assert isinstance(model.features[index], nn.LocalResponseNorm)
        model.features[index] = nn.LocalResponseNorm(SIZE_N, ALPHA, BETA, K)
    return model


def train(x_train, y_train, epochs: int = 30) -> DigitsNet:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = strong_net()
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


def normaliser(x: np.ndarray, lrn: nn.LocalResponseNorm) -> np.ndarray:
    """(k + alpha/n sum over the n-channel window of x^2)^beta, as ONNX's LRN (and PyTorch's) define it."""
    n, half = lrn.size, (lrn.size - 1) // 2
    squares = np.pad(x.astype(np.float64) ** 2, ((0, 0), (half, n - 1 - half), (0, 0), (0, 0)))
    window = sum(squares[:, i:i + x.shape[1]] for i in range(n))
    return (lrn.k + lrn.alpha / n * window) ** lrn.beta


def normaliser_statistics(model: DigitsNet, x_test: np.ndarray) -> list[dict]:
    stats, inputs = [], {}
    hooks = [model.features[i].register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].numpy()))
             for i in (3, 7)]
    with torch.no_grad():
        model(torch.tensor(x_test))
    for hook in hooks:
        hook.remove()
    for i in (3, 7):
        d = normaliser(inputs[i], model.features[i])
        stats.append({"layer": f"features.{i}", "alpha": ALPHA, "beta": BETA, "k": K, "size": SIZE_N,
                      "mean": float(d.mean()), "coefficient_of_variation": float(d.std() / d.mean()),
                      "min": float(d.min()), "max": float(d.max()), "max_over_min": float(d.max() / d.min()),
                      "values": int(d.size)})
    return stats


def main() -> None:
    x_train, x_test, y_train, y_test = load()
    model = train(x_train, y_train)
    with torch.no_grad():
        accuracy = float((model(torch.tensor(x_test)).argmax(1).numpy() == y_test).mean())
    export(model, HERE / "digits_lrn_strong.onnx")
    stats = normaliser_statistics(model, x_test)
    (HERE / "digits_lrn_strong.json").write_text(json.dumps(
        {"test_accuracy": round(accuracy, 4), "test_samples": int(len(y_test)), "train_samples": int(len(y_train)),
         "input": "image float32 [N,1,32,32] in [0,1]", "classes": list(range(10)),
         "lrn_normaliser_on_test_data": stats}, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} held-out digits; wrote {HERE / 'digits_lrn_strong.onnx'}")
    for s in stats:
        print(f"{s['layer']}: normaliser mean {s['mean']:.3f}, CV {s['coefficient_of_variation']:.3f}, "
              f"range {s['min']:.3f}..{s['max']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
