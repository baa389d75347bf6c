"""Stage 5: relevance maps as images (symmetric colour scale: red positive, blue negative, as Zennit's
`bwr`/`coldnhot`), optionally overlaid on the input image, with an optional colour bar."""
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
                   alpha: float = 0.8, zoom: int = 1, channels_last: bool = False, scale: float | None = None,
                   colorbar: bool = False):
    """Render relevance as an RGB heatmap with a symmetric colour scale (0 = the colormap's centre).

    relevance: [N, C, H, W] (returns a list of PIL images), [C, H, W] or [H, W] (returns one PIL image).
    image: optional image to overlay the heatmap on (same H, W; PIL image or array, grey or RGB): each pixel's
    opacity is ``alpha`` times its |relevance| relative to the scale, so the image stays visible where the
    relevance is small.
    zoom: integer upscaling (nearest neighbour) of the result.
    scale: the |relevance| that maps to the colormap's ends (default: each map's own maximum); pass one value
    (e.g. ``shared_scale(maps)``) to render several maps on one comparable scale.
    colorbar: append a colour bar with the scale's values at its ends and centre.
    """
    relevance = np.asarray(relevance)
    if zoom < 1:
        raise ValueError(f"zoom must be a positive integer, got {zoom}")
    if relevance.ndim == 4:
        images = image if isinstance(image, (list, tuple)) else [image] * len(relevance)
        return [render_heatmap(r, cmap, i, alpha, zoom, channels_last, scale, colorbar)
                for r, i in zip(relevance, images)]
    values = relevance_map(relevance, channels_last)
    scale = float(np.abs(values).max()) if scale is None else float(scale)
    unit = np.clip(values / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(values)
    rgb = colormap(cmap)((unit + 1.0) / 2.0)[..., :3]
    if image is not None:
        base = _as_rgb(image, values.shape)
        opacity = alpha * np.abs(unit)[..., None]
        rgb = opacity * rgb + (1.0 - opacity) * base
    result = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    if zoom > 1:
        result = result.resize((result.width * zoom, result.height * zoom), Image.NEAREST)
    return _with_colorbar(result, cmap, scale) if colorbar else result


def shared_scale(maps) -> float:
    """One colour scale for several relevance maps: the largest |relevance| of any (for ``render_heatmap``)."""
    return max((float(np.abs(np.asarray(m)).max()) for m in maps), default=0.0)


def _with_colorbar(heatmap: Image.Image, cmap: str, scale: float) -> Image.Image:
    """The heatmap with a vertical colour bar and its values (+scale, 0, -scale) on the right."""
    from PIL import ImageDraw, ImageFont
    height = max(heatmap.height, 64)
    bar_width, gap = max(8, height // 16), 4
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(bar_width, axis=1)
    bar = Image.fromarray((colormap(cmap)(ramp)[..., :3] * 255).round().astype(np.uint8), mode="RGB")
    labels = [f"{scale:+.3g}", "0", f"{-scale:+.3g}"]
    font = ImageFont.load_default()
    text_width = max(ImageDraw.Draw(bar).textbbox((0, 0), t, font=font)[2] for t in labels)
    canvas = Image.new("RGB", (heatmap.width + gap + bar_width + 3 + text_width + 2, height), "white")
    canvas.paste(heatmap, (0, (height - heatmap.height) // 2))
    canvas.paste(bar, (heatmap.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    x = heatmap.width + gap + bar_width + 3
    for label, y in zip(labels, (0, height // 2 - 6, height - 12)):
        draw.text((x, y), label, fill="black", font=font)
    return canvas


def _as_rgb(image, shape: tuple[int, int]) -> np.ndarray:
    """The image as float RGB in [0, 1] with the heatmap's height and width (for the overlay)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        array = array.squeeze()
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        image = Image.fromarray((array * 255).astype(np.uint8))
    rgb = image.convert("RGB").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float64) / 255.0
