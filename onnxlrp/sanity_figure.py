"""The figure of `onnxlrp sanity`, like Adebayo et al.'s cascade figure: a grid of heatmaps (rows: method x input,
columns: the input, the intact model and each randomisation step; each map on its own symmetric colour scale, red
positive, blue negative) above a plot of the mean similarities against the steps (error bars: s.e.m.)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OnnxlrpError
from .sanity import SIMILARITIES, SanityResult, mean_sem

METRIC_STYLES = {"spearman_abs": ("Spearman |R|", "-"), "spearman": ("Spearman R", "--"), "ssim": ("SSIM", ":")}


def _display(sample: np.ndarray, channels_last: bool) -> np.ndarray:
    """An input as a [0, 1] grey or RGB image for imshow."""
    image = np.asarray(sample, dtype=np.float64)
    if image.ndim == 3:
        image = image if channels_last else image.transpose(1, 2, 0)
        image = image[..., 0] if image.shape[-1] == 1 else image[..., :3]
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def figure(result: SanityResult, show: int = 3):
    """The matplotlib figure: heatmaps of the first ``show`` inputs per method, then the similarity curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .render import render_heatmap
    labels = result.step_labels
    images = min(show, len(result.images)) if result.methods[0].maps[0].ndim == 3 else 0
    rows, cols = images * len(result.methods), len(labels) + 1
    fig = plt.figure(figsize=(max(8.0, 1.25 * cols), 1.15 * rows + 3.6), dpi=90)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [2.6], hspace=0.12, wspace=0.05)
    for m, method in enumerate(result.methods):
        for i in range(images):
            r = m * images + i
            ax = fig.add_subplot(grid[r, 0])
            ax.imshow(_display(result.images[i], result.channels_last), cmap="gray", vmin=0, vmax=1)
            ax.set_ylabel(f"{method.label}\n{result.files[i].name}", fontsize=6, rotation=0, ha="right",
                          va="center")
            for k, maps in enumerate(method.maps):
                cell = fig.add_subplot(grid[r, k + 1])
                cell.imshow(render_heatmap(maps[i], cmap="bwr"))
                if r == 0:
                    cell.set_title(labels[k], fontsize=7, rotation=30, ha="left")
                cell.set_xticks([]), cell.set_yticks([])
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("input", fontsize=7, rotation=30, ha="left")
    ax = fig.add_subplot(grid[rows, :])
    steps = np.arange(len(labels))
    colours = matplotlib.colormaps["tab10"]
    for m, method in enumerate(result.methods):
        for name in SIMILARITIES:
            stats = np.array([mean_sem(values) for values in method.scores[name]])
            title, style = METRIC_STYLES[name]
            ax.errorbar(steps, stats[:, 0], yerr=stats[:, 1], color=colours(m % 10), linestyle=style, marker="o",
                        markersize=3, capsize=2, label=f"{method.label}: {title}")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(steps, labels, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("similarity to the intact model")
    ax.set_xlabel("layers randomised, from the top (cumulative)" if result.mode == "cascade"
                  else "layer randomised (one at a time)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def check_format(path: Path) -> str:
    """The figure's file type from its suffix (png when none); OnnxlrpError for one matplotlib cannot write, and
    for a missing output folder (checked before the long computation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fmt = Path(path).suffix[1:].lower() or "png"
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise OnnxlrpError(f"{path}: cannot write a figure of type {fmt!r} (use .png, .pdf or .svg)")
    folder = Path(path).parent
    if not folder.is_dir():
        raise OnnxlrpError(f"{path}: output folder {folder} does not exist")
    if Path(path).is_dir():
        raise OnnxlrpError(f"{path}: is a folder; give a file name for the figure")
    return fmt


def plot(result: SanityResult, path: Path, show: int = 3) -> None:
    """Write the figure to a .png/.pdf/.svg file (atomically: no partial file)."""
    from .save import write_figure
    check_format(path)
    write_figure(figure(result, show), path, "figure")
