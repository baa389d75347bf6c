"""The seed-003 table for our own LRN model: pixel-flipping AUC on held-out digits for the epsilon rule
(epsilon = 0.01 on every layer) and alpha2-beta1 (on convolutions), each with the LRN rule identity and
first-order Taylor, against gradient x input and a random order. Lower is better.

    python benchmarks/digits_pixel_flipping.py [--count 200] [--steps 16] [--patch 4] [--baseline mean]
                                               [--model models/digits_lrn_strong.onnx]
(needs scikit-learn for the held-out digits; same split and preprocessing as models/train_digits.py)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--baseline", default="mean")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits_lrn.onnx",
                        help="a model trained on the same split (digits_lrn.onnx or digits_lrn_strong.onnx)")
    args = parser.parse_args()
    from train_digits import load
    from onnxlrp.evaluate import evaluate, report
    _, x_test, _, _ = load()
    model = args.model
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(x_test[: args.count]):
            np.save(Path(tmp) / f"{i:04d}.npy", image)
        rows = []
        for composite, options in [("epsilon", {"epsilon": 0.01}), ("epsilon_alpha2_beta1", {})]:
            results, _ = evaluate(model, [Path(tmp)], [composite], ["identity", "taylor"], args.steps, args.patch,
                                  args.baseline, **options)
            rows += results if not rows else [r for r in results if r.label not in ("gradient x input", "random")]
    order = [r for r in rows if r.label not in ("gradient x input", "random")] + \
        [r for r in rows if r.label in ("gradient x input", "random")]
    print(f"{model.name}: {args.count} held-out digits, {args.steps} steps of {args.patch}x{args.patch} patches, "
          f"baseline {args.baseline}")
    print(report(order))


if __name__ == "__main__":
    main()
