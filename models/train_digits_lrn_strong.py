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

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_digits import DigitsNet, train_and_export  # noqa: E402

ALPHA, SIZE_N, BETA, K = 2.0, 5, 0.75, 1.0


def strong_net() -> DigitsNet:
    """DigitsNet with both LocalResponseNorm layers at alpha = ALPHA (train_digits.train seeds torch first)."""
    model = DigitsNet()
    for index in (3, 7):  # the two LocalResponseNorm layers
        assert isinstance(model.features[index], nn.LocalResponseNorm)
        model.features[index] = nn.LocalResponseNorm(SIZE_N, ALPHA, BETA, K)
    return model


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
    trained = train_and_export("digits_lrn_strong", strong_net, lambda model, x_test: {
        "lrn_normaliser_on_test_data": normaliser_statistics(model, x_test)})
    for s in trained.info["lrn_normaliser_on_test_data"]:
        print(f"{s['layer']}: normaliser mean {s['mean']:.3f}, CV {s['coefficient_of_variation']:.3f}, "
              f"range {s['min']:.3f}..{s['max']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
