"""Quantus 0.6's definitions of pixel flipping and region perturbation (``onnxlrp evaluate --definition``),
re-implemented step for step so that the curves equal ``quantus.PixelFlipping`` / ``quantus.RegionPerturbation``
(tests/test_quantus.py checks them against Quantus itself to 1e-6). How they differ from onnxlrp's own definition
(``evaluate.py``):

- relevance: normalised by its largest magnitude over *all* inputs (Quantus's ``normalise_by_max``), ordered by
  ``np.argsort(-a)`` (unstable on ties); pixel flipping orders single features (channels broadcast), region
  perturbation sums ``patch x patch`` tiles, padding the image symmetrically (edge values) to a multiple of it;
- steps: one tile (region perturbation, the first ``regions`` tiles) or ``features_in_step`` features (pixel
  flipping, until every feature is flipped) per step; the unperturbed input is not a point of the curve;
- curve: the raw score of the explained class (pixel flipping; lower AUC = better) or the drop
  ``score(x) - score(perturbed)`` (region perturbation; *higher* AUC = better), not divided by ``score(x)``;
- AUC: ``np.trapz(curve, dx=1)`` (trapezoids of width 1: grows with the number of steps), not the mean over [0, 1];
- fill ``mean``: the mean over all channels and pixels of the *current, already perturbed* image (it drifts as
  patches are flipped), ``black`` / ``white`` (Quantus's default / its other choice): its min / max, ``value``: a
  constant; Quantus has no blur fill.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import OnnxlrpError

Predict = Callable[[np.ndarray], np.ndarray]  # [N, C, H, W] float32 -> scores [N, classes]


def normalise_by_max(a: np.ndarray) -> np.ndarray:
    """Quantus's default normalisation: a / max |a| over the whole batch (unchanged when all zeros)."""
    if np.all(a == 0.0):
        return a
    return np.divide(a, np.max(np.abs(a), axis=tuple(range(a.ndim)), keepdims=True))


def replace(arr: np.ndarray, indices: np.ndarray, fill: str, fill_value: float) -> np.ndarray:
    """[N, F] arr with arr[n, indices[n]] set to the fill (Quantus's batch_baseline_replacement_by_indices)."""
    if fill == "mean":
        value = np.full(indices.shape, arr.mean(axis=1)[:, None])
    elif fill in ("black", "white"):  # Quantus's names for the current image's min / max
        value = np.full(indices.shape, (arr.min(axis=1) if fill == "black" else arr.max(axis=1))[:, None])
    elif fill == "value":
        value = np.full(indices.shape, fill_value)
    else:
        raise OnnxlrpError(f"--definition quantus-*: --fill must be mean, value, black or white (Quantus has no "
                           f"{fill!r} fill)")
    out = arr.copy()
    out[np.arange(arr.shape[0])[:, None], indices] = value
    return out


def pixel_flipping(predict: Predict, x: np.ndarray, a: np.ndarray, target: np.ndarray, features_in_step: int,
                   fill: str, fill_value: float) -> np.ndarray:
    """quantus.PixelFlipping curves [N, ceil(features / features_in_step)] (a already normalised)."""
    n = x.shape[0]
    a = np.broadcast_to(a, x.shape).reshape(n, -1)
    order = np.argsort(-a, axis=1)
    flipped, curve = x.copy(), []
    for step in range(math.ceil(a.shape[1] / features_in_step)):
        indices = order[:, step * features_in_step:(step + 1) * features_in_step]
        flipped = replace(flipped.reshape(n, -1), indices, fill, fill_value).reshape(x.shape)
        curve.append(predict(flipped)[np.arange(n), target])
    return np.stack(curve, axis=1).astype(np.float64)  # Quantus keeps these as Python floats (tolist)


def padding(size: int, patch: int) -> tuple[int, int]:
    total = (patch - size % patch) % patch
    return total // 2, total - total // 2


def region_perturbation(predict: Predict, x: np.ndarray, a: np.ndarray, target: np.ndarray, patch: int,
                        regions: int, fill: str, fill_value: float,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """quantus.RegionPerturbation (order "morf", or a random tile order if rng) curves [N, min(regions, tiles)]:
    score(x) - score(x with the first k tiles filled) (a already normalised)."""
    n, c, h, w = x.shape
    a = np.broadcast_to(a, x.shape)
    (top, bottom), (left, right) = padding(h, patch), padding(w, patch)
    pads = ((0, 0), (0, 0), (top, bottom), (left, right))
    a_pad = np.pad(a, pads, mode="constant").reshape(n, -1)
    x_pad = np.pad(x, pads, mode="edge")
    hp, wp = x_pad.shape[2:]
    flat = np.arange(c * hp * wp).reshape(c, hp, wp)
    tiles = np.stack([flat[:, r:r + patch, s:s + patch].reshape(-1) for r in range(0, hp, patch)
                      for s in range(0, wp, patch)])  # [tiles, c * patch * patch], row-major tile order
    sums = np.stack([a_pad[:, t].sum(axis=-1) for t in tiles], axis=-1)
    order = np.array([rng.permutation(len(tiles)) for _ in range(n)]) if rng is not None \
        else np.argsort(-sums, -1)
    score = predict(x)[np.arange(n), target]
    curve = []
    for k in range(min(regions, len(tiles))):
        x_pad = replace(x_pad.reshape(n, -1), tiles[order[:, k]], fill, fill_value).reshape(x_pad.shape)
        flipped = x_pad[:, :, top:hp - bottom, left:wp - right]
        curve.append(score - predict(flipped)[np.arange(n), target])
    return np.stack(curve, axis=1)  # in the model's dtype, as Quantus keeps them


def area_under_curve(curve: np.ndarray) -> float:
    """Quantus's calculate_auc: np.trapz(curve, dx=1), in the curve's dtype (float32 for region perturbation)."""
    return float(np.trapezoid(np.asarray(curve), dx=1))
