"""ROAD: RemOve And Debias (Rong et al., ICML 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods"), ``onnxlrp evaluate --metric road``.

Removed pixels are not set to one fill value (whose shape itself leaks which pixels were removed) but imputed by
noisy linear imputation: every removed pixel equals the weighted mean of its 8 neighbours (1/6 for the 4 direct,
1/12 for the 4 diagonal ones; neighbours outside the image are left out of the weights), the removed neighbours
being unknowns too: one sparse linear system per image and removal set, all channels solved at once, then
``noise`` x N(0, 1) is added to each imputed value. Pixels are ordered one by one (relevance summed over channels)
most relevant first (MoRF) or least relevant first (LeRF), and the explained score is followed as a growing
fraction of them is imputed.

The imputation, the ordering (``np.argsort`` of the relevance divided by its largest magnitude over all inputs)
and the order in which the noise is drawn (per chunk of 64 inputs, per removal fraction, per input) are those of
Quantus 0.6's ``ROAD`` / ``noisy_linear_imputation`` (the authors' ``tleemann/road_evaluation``), so with the
same ``np.random`` seed the perturbed inputs equal Quantus's (tests/test_road.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import OnnxlrpError

Predict = Callable[[np.ndarray], np.ndarray]  # [B, C, H, W] float32 -> scores [B, classes]
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6),
              (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))  # (row offset, column offset, weight)
QUANTUS_BATCH = 64  # Quantus's default batch_size: its noise is drawn chunk by chunk


def _sparse():
    try:
        from scipy.sparse import csc_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError as exc:
        raise OnnxlrpError("--metric road needs scipy (pip install scipy)") from exc
    return csc_matrix, spsolve


def impute(x: np.ndarray, removed: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """x [C, H, W] with the pixels ``removed`` (flat indices into H x W) replaced by the linear imputation plus
    ``noise`` ([C, len(removed)], already scaled) where given."""
    csc_matrix, spsolve = _sparse()
    c, h, w = x.shape
    removed = np.asarray(removed, dtype=np.int64)
    k = removed.size
    out = x.reshape(c, -1).copy()
    if k == 0:
        return out.reshape(x.shape)
    if k == h * w:
        raise OnnxlrpError("ROAD cannot impute an image with every pixel removed (no neighbour is known)")
    unknown = np.full(h * w, -1, dtype=np.int64)
    unknown[removed] = np.arange(k)
    row, col = np.divmod(removed, w)
    diagonal = np.zeros(k)
    rhs = np.zeros((k, c))
    rows, cols, values = [np.arange(k)], [np.arange(k)], []
    known = x.reshape(c, -1).astype(np.float64)
    for dr, dc, weight in NEIGHBOURS:
        r, s = row + dr, col + dc
        valid = np.nonzero((r >= 0) & (r < h) & (s >= 0) & (s < w))[0]
        neighbour = r[valid] * w + s[valid]
        diagonal[valid] += weight
        is_unknown = unknown[neighbour] >= 0
        rows.append(valid[is_unknown])
        cols.append(unknown[neighbour[is_unknown]])
        values.append(np.full(int(is_unknown.sum()), -weight))
        rhs[valid[~is_unknown]] += weight * known[:, neighbour[~is_unknown]].T
    system = csc_matrix((np.concatenate([diagonal, *values]), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(k, k))
    solution = spsolve(system, rhs).reshape(k, c).T  # [C, k]
    if noise is not None:
        solution = solution + noise
    out[:, removed] = solution
    return out.reshape(x.shape)


def normalise_by_max(a: np.ndarray) -> np.ndarray:
    """Quantus's default normalisation: a / max |a| over the whole batch (unchanged when all zeros)."""
    return a if np.all(a == 0.0) else a / np.max(np.abs(a))


def pixel_order(a: np.ndarray, order: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """[N, H*W] pixel indices per input: ``morf`` most relevant first, ``lerf`` least relevant first (a: [N, H, W],
    relevance summed over channels), ``random`` a permutation from rng."""
    n = a.shape[0]
    flat = a.reshape(n, -1)
    if order == "random":
        return np.stack([rng.permutation(flat.shape[1]) for _ in range(n)])
    normalised = normalise_by_max(flat)
    return np.argsort(-normalised if order == "morf" else normalised, axis=1)


def removal_counts(fractions, pixels: int) -> list[int]:
    """Pixels removed at each fraction (Quantus's int(pixels * percentage / 100) for percentages)."""
    return [int(round(f * pixels)) for f in fractions]


def road_scores(predict: Predict, x: np.ndarray, orders: np.ndarray, counts: list[int], noise: float = 0.01,
                rng: np.random.RandomState | None = None) -> np.ndarray:
    """[N, len(counts), classes]: the scores of x [N, C, H, W] with the first counts[j] pixels of orders[n]
    imputed. Noise is drawn from rng (np.random if None) as Quantus draws it: per chunk of 64 inputs, per count,
    per input, one randn(C, count) each (drawn even when noise is 0)."""
    draw = (rng or np.random).randn
    n = x.shape[0]
    out = None
    for chunk in range(0, n, QUANTUS_BATCH):
        members = range(chunk, min(chunk + QUANTUS_BATCH, n))
        for j, count in enumerate(counts):
            batch = np.stack([impute(x[i], orders[i, :count], noise * draw(x.shape[1], count)) for i in members])
            scores = predict(batch.astype(x.dtype))
            if out is None:
                out = np.zeros((n, len(counts), scores.shape[-1]))
            out[chunk:chunk + len(members), j] = scores
    return out
