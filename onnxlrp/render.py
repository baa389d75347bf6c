"""Stage 5: relevance maps as images (symmetric colour scale: red positive, blue negative, as Zennit's
`bwr`/`coldnhot`), optionally blended over the input image."""
from __future__ import annotations

import numpy as np
from PIL import Image

#: Zennit's "coldnhot": cyan - blue - black - red - yellow.
_COLDNHOT = [(0.0, "#00ffff"), (0.25, "#0000ff"), (0.5, "#000000"), (0.75, "#ff0000"), (1.0, "#ffff00")]


def colormap(name: str):
    """A matplotlib colormap by name, plus Zennit's "coldnhot"."""
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap
    if name == "coldnhot":
        return LinearSegmentedColormap.from_list("coldnhot", _COLDNHOT)
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r} (use a matplotlib name such as bwr, seismic, or coldnhot)")\
            from None


def relevance_map(relevance: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """[C, H, W] (or [H, W, C] / [H, W]) relevance -> [H, W], summed over channels."""
    relevance = np.asarray(relevance, dtype=np.float64)
    if relevance.ndim == 2:
        return relevance
    if relevance.ndim != 3:
        raise ValueError(f"expected a [C, H, W] relevance map, got shape {relevance.shape}")
    return relevance.sum(axis=-1 if channels_last else 0)


def render_heatmap(relevance: np.ndarray, cmap: str = "bwr", image: np.ndarray | Image.Image | None = None,
                   alpha: float = 0.6, zoom: int = 1, channels_last: bool = False):
    """Render relevance as an RGB heatmap with a symmetric colour scale (0 = the colormap's centre).

    relevance: [N, C, H, W] (returns a list of images), [C, H, W] or [H, W] (returns one PIL image).
    image: optional image to blend the heatmap over (same H, W; PIL image or array, grey or RGB).
    zoom: integer upscaling (nearest neighbour) of the result.
    """
    relevance = np.asarray(relevance)
    if relevance.ndim == 4:
        images = image if isinstance(image, (list, tuple)) else [image] * len(relevance)
        return [render_heatmap(r, cmap, i, alpha, zoom, channels_last) for r, i in zip(relevance, images)]
    values = relevance_map(relevance, channels_last)
    scale = np.abs(values).max()
    unit = values / scale if scale > 0 else np.zeros_like(values)
    rgb = colormap(cmap)((unit + 1.0) / 2.0)[..., :3]
    if image is not None:
        base = _as_rgb(image, values.shape)
        rgb = alpha * rgb + (1.0 - alpha) * base
    result = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    if zoom > 1:
        result = result.resize((result.width * zoom, result.height * zoom), Image.NEAREST)
    return result


def _as_rgb(image, shape: tuple[int, int]) -> np.ndarray:
    """The image as float RGB in [0, 1] with the heatmap's height and width (grey, for the overlay)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        array = array.squeeze()
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        image = Image.fromarray((array * 255).astype(np.uint8))
    grey = image.convert("L").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.repeat((np.asarray(grey, dtype=np.float64) / 255.0)[..., None], 3, axis=-1)
