"""The metrics of ``onnxlrp evaluate --metric`` beside pixel flipping, and the reference methods' maps:

- ``fills``: the pixel-flipping curve averaged over three fills, each channel's mean, the constant 0 and a 7x7
  blur (its AUC is the mean of the three AUCs): less tied to what one fill value signals to the model;
- ``road``: ROAD (road.py), pixels imputed by noisy linear imputation most relevant first (MoRF, lower AUC is
  better) and least relevant first (LeRF, higher is better), at the fractions 0, 1/steps, ..., (steps - 1)/steps;
  curve = score / unperturbed score as for pixel flipping.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OnnxlrpError

METRICS = ("pixel-flipping", "fills", "road")
FILLS = (("mean", 0.0), ("value", 0.0), ("blur", 0.0))  # fills: mean, zero, blur
TITLES = {"pixel-flipping": "pixel flipping", "fills": "mean over fills", "road-morf": "ROAD MoRF",
          "road-lerf": "ROAD LeRF"}
HIGHER_IS_BETTER = {"road-lerf"}


@dataclass
class RiseSettings:
    """RISE's masks (reference_methods.rise_masks): how many, the grid's cells per side, P(cell kept)."""

    masks: int = 1000
    grid: int = 8
    p: float = 0.5


def check_metrics(metrics: list[str], definition: str) -> None:
    for metric in metrics:
        if metric not in METRICS:
            raise OnnxlrpError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if definition != "onnxlrp" and set(metrics) - {"pixel-flipping"}:
        raise OnnxlrpError(f"--definition {definition} computes Quantus's metric alone: drop --metric "
                           f"{' / '.join(m for m in metrics if m != 'pixel-flipping')}")


def reference_map(name: str, predict, x: np.ndarray, target: np.ndarray, channels_last: bool, fill: str,
                  fill_value: float, patch: int, rise_settings: RiseSettings, seed: int) -> np.ndarray:
    """[N, H, W] map of reference method ``name`` (occlusion with evaluate's fill, patch and stride = patch; RISE
    with masks drawn from ``seed``)."""
    from . import reference_methods as ref
    from .evaluate import make_baseline
    if name == "occlusion":
        kind = fill if fill in ("mean", "value", "blur") else "mean"  # Quantus's black / white: the mean here
        baselines = np.stack([make_baseline(s, kind, fill_value, channels_last) for s in x])
        return ref.occlusion(predict, x, target, baselines, patch, patch, channels_last)
    if name == "rise":
        size = x.shape[1:3] if channels_last else x.shape[-2:]
        masks = ref.rise_masks(rise_settings.masks, rise_settings.grid, rise_settings.p, size,
                               np.random.default_rng(seed))
        return ref.rise(predict, x, target, masks, rise_settings.p, channels_last)
    raise OnnxlrpError(f"--reference must be occlusion, rise or none, got {name!r}")


def channel_sum(relevance: np.ndarray, channels_last: bool) -> np.ndarray:
    """[H, W] from a relevance map [C, H, W] / [H, W, C] / [H, W]."""
    if relevance.ndim == 3:
        return relevance.sum(axis=-1 if channels_last else 0)
    return relevance


def add_metrics(results: list, maps: dict, predict, x: np.ndarray, target: np.ndarray, channels_last: bool,
                patch: int, steps: int, metrics: list[str], rng: np.random.Generator, seed: int,
                progress: bool = False) -> None:
    """Fill each result's ``metrics`` with the ``fills`` / ``road-morf`` / ``road-lerf`` curves of its map
    (maps[label]; None: a random order)."""
    import sys

    from tqdm import tqdm

    from .evaluate import Curves, flip_curve
    wanted = [m for m in metrics if m != "pixel-flipping"]
    bar = tqdm(total=len(results) * len(wanted), desc=" / ".join(wanted), unit="method", file=sys.stderr,
               leave=False, disable=not progress or not wanted)
    for curves in results:
        relevance = maps[curves.label]
        if "fills" in wanted:
            fills = Curves(curves.label)
            for i, sample in enumerate(x):
                fills.curves.append(np.mean([flip_curve(predict, sample, None if relevance is None else relevance[i],
                                                        target[i], patch, steps, kind, value, channels_last, rng)
                                             for kind, value in FILLS], axis=0, dtype=np.float64))
            curves.metrics["fills"] = fills
            bar.update(1)
        if "road" in wanted:
            noise = np.random.RandomState(seed)
            for order in ("morf", "lerf"):
                curves.metrics[f"road-{order}"] = Curves(curves.label, road_curves(
                    predict, x, relevance, target, channels_last, steps, order, rng, noise))
            bar.update(1)
    bar.close()


def road_fractions(steps: int) -> np.ndarray:
    return np.arange(steps) / steps


def road_curves(predict, x: np.ndarray, relevance: np.ndarray | None, target: np.ndarray, channels_last: bool,
                steps: int, order: str, rng: np.random.Generator, noise_rng: np.random.RandomState,
                noise: float = 0.01) -> list[np.ndarray]:
    """Per input: score / unperturbed score with the first fraction of pixels (``order`` morf / lerf; a random
    permutation if relevance is None) imputed, at road_fractions(steps)."""
    from .road import pixel_order, removal_counts, road_scores
    first = np.moveaxis(x, -1, 1) if channels_last else x
    to_model = (lambda b: np.ascontiguousarray(np.moveaxis(b, 1, -1))) if channels_last else (lambda b: b)
    if relevance is None:
        orders = pixel_order(np.zeros((len(x), *first.shape[2:])), "random", rng)
    else:
        orders = pixel_order(np.stack([channel_sum(m, channels_last) for m in relevance]), order)
    counts = removal_counts(road_fractions(steps), first.shape[2] * first.shape[3])
    scores = road_scores(lambda b: predict(to_model(b)), np.ascontiguousarray(first), orders, counts, noise,
                         noise_rng)
    values = scores[np.arange(len(x)), :, target]  # [N, points]
    return [v / v[0] if v[0] != 0 else v for v in values]
