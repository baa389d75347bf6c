"""LRP against black-box references on the shipped digits model: every CNN composite (the default
``epsilon_plus_flat`` first; LRN rule: compile's default, taylor), gradient x input, occlusion, RISE and a random
order, scored by pixel flipping (fill: the image mean), the mean of pixel flipping over the fills mean / 0 / blur,
and ROAD (noisy linear imputation, most and least relevant pixels first), with each map's cost in ms per input.

    python benchmarks/digits_faithfulness.py [--count 200] [--steps 16] [--patch 4] [--rise-masks 1000]
                                             [--model models/digits_lrn.onnx]
(needs scikit-learn for the held-out digits, same split and preprocessing as models/train_digits.py, and scipy)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
COMPOSITES = ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat", "epsilon_plus",
              "epsilon_alpha2_beta1", "epsilon", "deeplift"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits_lrn.onnx")
    args = parser.parse_args()
    from train_digits import load
    from onnxlrp.evaluate import evaluate, report
    from onnxlrp.perturbation_metrics import RiseSettings
    _, x_test, _, _ = load()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(x_test[: args.count]):
            np.save(Path(tmp) / f"{i:04d}.npy", image)
        results, failures = evaluate(args.model, [Path(tmp)], COMPOSITES, ["taylor"], args.steps, args.patch,
                                     "mean", references=["occlusion", "rise"],
                                     metrics=["pixel-flipping", "fills", "road"],
                                     rise=RiseSettings(masks=args.rise_masks))
    assert not failures, failures
    print(f"{args.model.name}: {args.count} held-out digits, {args.steps} steps, {args.patch}x{args.patch} patches "
          f"(pixel flipping, fills), RISE {args.rise_masks} masks of 8x8 cells, p = 0.5; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(report(results))
    print()

    def cell(aucs: np.ndarray) -> str:
        return f"{aucs.mean():.3f} ± {aucs.std(ddof=1) / np.sqrt(len(aucs)):.3f}"

    def name_of(r) -> str:
        return r.label.replace(" / lrn taylor", "").replace("gradient x input", "gradient × input")

    print("| method | pixel flipping (mean fill) ↓ | mean over fills ↓ | ROAD MoRF ↓ | ROAD LeRF ↑ | ms / input |")
    print("|---|---|---|---|---|---|")
    for r in results:
        label = name_of(r)
        cost = "–" if r.cost_ms is None else f"{r.cost_ms:.2f}"
        print(f"| {label} | {cell(r.aucs)} | {cell(r.metrics['fills'].aucs)} | "
              f"{cell(r.metrics['road-morf'].aucs)} | {cell(r.metrics['road-lerf'].aucs)} | {cost} |")
    print()
    for name, key, sign in (("pixel flipping", None, 1), ("mean over fills", "fills", 1),
                            ("ROAD MoRF", "road-morf", 1), ("ROAD LeRF", "road-lerf", -1)):
        aucs = {name_of(r): (r.aucs if key is None else r.metrics[key].aucs).mean() for r in results}
        print(f"ranking by {name}, best first: " + (" < " if sign > 0 else " > ").join(
            sorted(aucs, key=lambda k: sign * aucs[k])))


if __name__ == "__main__":
    main()
