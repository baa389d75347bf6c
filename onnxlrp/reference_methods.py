"""Black-box reference attributions for ``onnxlrp evaluate --reference``, computed from the model's scores alone in
batched ONNX Runtime runs of the model itself:

- occlusion (Zeiler & Fergus 2014, as Captum's ``Occlusion``): a ``patch`` x ``patch`` window slides with
  ``stride`` over the image, all channels at once, and is replaced by the fill; each pixel gets the drop of the
  explained score, averaged over the windows that cover it. One window more, flush with the right/bottom edge,
  covers what the stride does not reach (Captum leaves those pixels at 0);
- RISE (Petsiuk et al. 2018, as the authors' ``eclique/RISE``): ``n`` random binary ``grid`` x ``grid`` masks
  (each cell 1 with probability ``p``) upsampled bilinearly to ``(grid + 1) * ceil(H / grid)`` pixels and cropped at
  a random shift below one cell; saliency = sum_i score(x * mask_i) * mask_i / (n * p).

Maps are [N, H, W]: one value per pixel (the perturbations cover all channels of a pixel). Scores are the model's
first output as is (evaluate's score; the RISE paper used softmax probabilities)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]  # a batch in the model's layout -> scores [B, classes]
REFERENCES = ("occlusion", "rise")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along one axis: 0, stride, ... (Captum's), plus one flush with the far edge if the
    stride stops short of it."""
    window = min(window, size)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _to_first(a: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(a, -1, 0) if channels_last else a


def _from_first(a: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if channels_last else a


def occlusion(predict: Predict, x: np.ndarray, target: np.ndarray, baselines: np.ndarray, patch: int,
              stride: int | None = None, channels_last: bool = False, batch_size: int = 256) -> np.ndarray:
    """[N, H, W]: the explained score's drop when each window is filled from ``baselines`` (x's shape), averaged
    over the windows covering each pixel (Captum's Occlusion with sliding window (C, patch, patch))."""
    stride = stride or patch
    first = np.stack([_to_first(s, channels_last) for s in x])  # [N, C, H, W]
    fills = np.stack([_to_first(b, channels_last) for b in baselines])
    n, _, h, w = first.shape
    windows = [(r, c) for r in window_starts(h, patch, stride) for c in window_starts(w, patch, stride)]
    total = np.zeros((n, h, w))
    counts = np.zeros((h, w))
    for r, c in windows:
        counts[r:r + patch, c:c + patch] += 1
    reference = predict(x)[np.arange(n), target].astype(np.float64)
    per_batch = max(1, batch_size)
    for i in range(n):
        for start in range(0, len(windows), per_batch):
            chunk = windows[start:start + per_batch]
            batch = np.repeat(first[i:i + 1], len(chunk), axis=0)
            for k, (r, c) in enumerate(chunk):
                batch[k, :, r:r + patch, c:c + patch] = fills[i, :, r:r + patch, c:c + patch]
            drops = reference[i] - predict(np.ascontiguousarray(_from_first(batch, channels_last)))[:, target[i]]
            for (r, c), drop in zip(chunk, drops):
                total[i, r:r + patch, c:c + patch] += drop
    return total / counts


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of skimage's ``resize(order=1, mode='reflect', anti_aliasing=False)`` along one
    axis: output pixel o samples the input at (o + 0.5) * size_in / size_out - 0.5, mirrored at the edge samples."""
    u = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    if size_in > 1:
        period = 2 * (size_in - 1)
        u = np.abs(np.mod(u, period))
        u = np.where(u > size_in - 1, period - u, u)
    else:
        u = np.zeros_like(u)
    low = np.clip(np.floor(u).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = u - low
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), low), 1 - frac)
    np.add.at(weights, (np.arange(size_out), high), frac)
    return weights


def rise_masks(n: int, grid: int, p: float, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[n, H, W] float32 RISE masks: binary grid x grid cells (1 with probability p), bilinearly upsampled to
    (grid + 1) * ceil(size / grid) and cropped at a random shift in [0, cell) per axis (eclique/RISE's
    generate_masks, with this generator's draws)."""
    h, w = size
    cell = (math.ceil(h / grid), math.ceil(w / grid))
    cells = (rng.random((n, grid, grid)) < p).astype(np.float64)
    shift_y, shift_x = rng.integers(0, cell[0], n), rng.integers(0, cell[1], n)
    rows = bilinear_matrix(grid, (grid + 1) * cell[0])[shift_y[:, None] + np.arange(h)]  # [n, H, grid]
    cols = bilinear_matrix(grid, (grid + 1) * cell[1])[shift_x[:, None] + np.arange(w)]  # [n, W, grid]
    return np.einsum("nhs,nst,nwt->nhw", rows, cells, cols).astype(np.float32)


def rise(predict: Predict, x: np.ndarray, target: np.ndarray, masks: np.ndarray, p: float,
         channels_last: bool = False, batch_size: int = 256) -> np.ndarray:
    """[N, H, W] RISE saliency of the explained class: sum_i score(x * mask_i) * mask_i / (n * p)."""
    n_masks, h, w = masks.shape
    flat = masks.reshape(n_masks, -1).astype(np.float64)
    out = np.zeros((len(x), h * w))
    expand = (lambda m: m[:, :, :, None]) if channels_last else (lambda m: m[:, None])
    for i, sample in enumerate(x):
        for start in range(0, n_masks, batch_size):
            chunk = masks[start:start + batch_size]
            scores = predict(np.ascontiguousarray(expand(chunk) * sample[None]))[:, target[i]]
            out[i] += scores.astype(np.float64) @ flat[start:start + batch_size]
    return (out / n_masks / p).reshape(len(x), h, w)
