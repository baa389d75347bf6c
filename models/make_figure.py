"""Make docs/digits_heatmaps.png for the README: the shipped sample digits (top row) and their relevance
under two composites, through the public API (onnxlrp.Explainer and onnxlrp.render_heatmap)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import onnxlrp

HERE = Path(__file__).resolve().parent
ZOOM = 3


def main() -> None:
    images = np.stack([np.asarray(Image.open(HERE / "samples" / f"digit_{d}.png"), dtype=np.float32) / 255.0
                       for d in range(10)])[:, None]
    rows = [[Image.fromarray((im[0] * 255).astype(np.uint8)).convert("RGB").resize((32 * ZOOM, 32 * ZOOM))
             for im in images]]
    for composite, options in [("epsilon_gamma_box", {"low": 0.0, "high": 1.0}), ("epsilon_plus_flat", {})]:
        _, relevance = onnxlrp.Explainer(HERE / "digits_lrn.onnx", composite=composite, **options).explain(images)
        rows.append(onnxlrp.render_heatmap(relevance, zoom=ZOOM))
    figure = Image.new("RGB", (32 * ZOOM * 10, 32 * ZOOM * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            figure.paste(image, (32 * ZOOM * c, 32 * ZOOM * r))
    figure.save(HERE.parent / "docs" / "digits_heatmaps.png")


if __name__ == "__main__":
    main()
