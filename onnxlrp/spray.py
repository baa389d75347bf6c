"""`onnxlrp analyze`: Spectral Relevance Analysis (SpRAy; Lapuschkin et al., Nature Communications 2019) over
dataset-wide heatmaps, to find the strategies (and Clever Hans shortcuts) a model uses for one class.

Steps, as in the paper and CoRelAy: heatmaps summed over channels, downsampled by block averaging and
L2-normalised; a symmetric k-nearest-neighbour affinity graph; the eigenvalues of its normalised Laplacian, whose
largest gap among the smallest ones suggests the number of clusters (the eigengap heuristic); spectral clustering
(scikit-learn) on that affinity; a 2-D t-SNE embedding coloured by cluster; per cluster the mean heatmap and
example heatmaps. The report is an HTML page with those pictures and ``clusters.csv`` (input, cluster).
"""
from __future__ import annotations

import csv
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OnnxlrpError


@dataclass
class Analysis:
    """The result of SpRAy on one set of heatmaps."""

    ids: list[str]
    labels: np.ndarray                 # cluster per heatmap
    eigenvalues: np.ndarray            # smallest eigenvalues of the normalised Laplacian, ascending
    suggested: int                     # number of clusters from the eigengap
    embedding: np.ndarray              # [N, 2] t-SNE
    maps: np.ndarray                   # [N, h, w] downsampled, normalised heatmaps
    inputs: list[str | None] = field(default_factory=list)


def load_relevance(source: str | Path, klass: int | None = None) -> tuple[list[str], list[np.ndarray], list]:
    """Heatmaps from a folder of .npy files (``onnxlrp explain``'s output) or a Parquet sink (``--ray`` /
    ``onnxlrp.distributed``; error rows skipped). ``klass`` keeps the rows explained for that class (Parquet, or a
    folder holding results.parquet). Returns (ids, relevance arrays, input paths or None)."""
    source = Path(source)
    parquet = source if source.suffix == ".parquet" else source / "results.parquet"
    if parquet.exists():
        from .distributed import read_results
        frame = read_results(parquet)
        frame = frame[frame["error"].isna()]
        if klass is not None:
            frame = frame[frame["explained"] == klass]
        arrays, ids = [], []
        for row in frame.itertuples():
            if row.relevance is not None:
                arrays.append(row.relevance)
            elif isinstance(row.relevance_path, str):
                arrays.append(np.load(row.relevance_path, allow_pickle=False))
            else:
                continue
            ids.append(str(row.id))
        return ids, arrays, list(ids)
    if not source.is_dir():
        raise OnnxlrpError(f"{source}: not a folder of .npy relevance files nor a Parquet file")
    if klass is not None:
        raise OnnxlrpError(f"{source}: --class needs the explained classes: give a Parquet sink (explain --ray) "
                           f"or a folder explained for that class (explain --target K)")
    files = sorted(source.glob("*.npy"))
    return [f.stem for f in files], [np.load(f, allow_pickle=False) for f in files], [None] * len(files)


def prepare(arrays: list[np.ndarray], size: int = 16) -> np.ndarray:
    """[N, h, w]: each heatmap summed over channels (the smallest axis of a 3-D map), block-averaged to at most
    ``size`` pixels a side, and L2-normalised (an all-zero map stays zero)."""
    maps = []
    for r in arrays:
        r = np.asarray(r, dtype=np.float64)
        if r.ndim == 3:
            r = r.sum(axis=int(np.argmin(r.shape)))
        if r.ndim != 2:
            raise OnnxlrpError(f"SpRAy needs 2-D or 3-D heatmaps, got shape {list(r.shape)}")
        fy, fx = max(1, -(-r.shape[0] // size)), max(1, -(-r.shape[1] // size))
        h, w = r.shape[0] // fy, r.shape[1] // fx
        r = r[: h * fy, : w * fx].reshape(h, fy, w, fx).mean(axis=(1, 3))
        maps.append(r)
    shapes = {m.shape for m in maps}
    if len(shapes) != 1:
        raise OnnxlrpError(f"heatmaps of different sizes: {sorted(shapes)}")
    stack = np.stack(maps)
    norms = np.linalg.norm(stack.reshape(len(stack), -1), axis=1)
    return stack / np.where(norms > 0, norms, 1.0)[:, None, None]


def affinity(features: np.ndarray, neighbors: int):
    """Symmetric k-nearest-neighbour connectivity (scipy sparse)."""
    from sklearn.neighbors import kneighbors_graph
    graph = kneighbors_graph(features, n_neighbors=neighbors, mode="connectivity", include_self=False)
    return ((graph + graph.T) > 0).astype(np.float64)


def eigengap(graph, count: int) -> tuple[np.ndarray, int]:
    """The ``count`` smallest eigenvalues of the normalised Laplacian and the number of clusters the largest gap
    among them suggests (at least 2)."""
    from scipy.sparse.csgraph import laplacian
    lap = laplacian(graph, normed=True).toarray()
    values = np.sort(np.linalg.eigvalsh(lap))[:count]
    gaps = np.diff(values)
    return values, int(np.argmax(gaps[1:]) + 2) if len(gaps) > 1 else 2


def analyze(ids: list[str], arrays: list[np.ndarray], *, clusters: int | None = None, neighbors: int = 10,
            size: int = 16, max_clusters: int = 10, seed: int = 0, inputs: list | None = None) -> Analysis:
    """SpRAy on heatmaps: clusters (``clusters``, or the eigengap's suggestion), eigenvalues, t-SNE embedding."""
    from sklearn.cluster import SpectralClustering
    from sklearn.manifold import TSNE
    if len(arrays) < 4:
        raise OnnxlrpError(f"SpRAy needs at least 4 heatmaps, got {len(arrays)}")
    maps = prepare(arrays, size)
    features = maps.reshape(len(maps), -1)
    k = min(neighbors, len(maps) - 1)
    graph = affinity(features, k)
    values, suggested = eigengap(graph, min(max_clusters + 1, len(maps)))
    n_clusters = clusters or suggested
    labels = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                                assign_labels="cluster_qr").fit_predict(graph.toarray())
    perplexity = float(min(30, max(2, (len(maps) - 1) // 3)))
    embedding = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)
    return Analysis(ids, labels, values, suggested, embedding, maps, list(inputs or [None] * len(ids)))


def write_report(result: Analysis, outdir: Path, title: str = "SpRAy", examples: int = 8) -> Path:
    """``outdir/index.html`` with the eigenvalues, the embedding and each cluster's mean and example heatmaps;
    ``outdir/clusters.csv``. Returns the HTML path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    outdir.mkdir(parents=True, exist_ok=True)
    n = int(result.labels.max()) + 1
    colors = plt.get_cmap("tab10")

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(1, len(result.eigenvalues) + 1), result.eigenvalues, "o-")
    ax.axvline(result.suggested + 0.5, color="grey", ls="--", lw=1)
    ax.set(xlabel="index", ylabel="eigenvalue", title=f"eigengap: {result.suggested} clusters")
    fig.tight_layout()
    fig.savefig(outdir / "eigenvalues.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for c in range(n):
        pts = result.embedding[result.labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=10, color=colors(c % 10), label=f"cluster {c} ({len(pts)})")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    ax.set(title="t-SNE of the heatmaps", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(outdir / "embedding.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(n, examples + 1, figsize=(1.3 * (examples + 1), 1.4 * n), squeeze=False)
    for c in range(n):
        members = np.flatnonzero(result.labels == c)
        shown = [result.maps[members].mean(axis=0)] + [result.maps[i] for i in members[:examples]]
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(shown):
                m = shown[j]
                v = float(np.abs(m).max()) or 1.0
                ax.imshow(m, cmap="bwr", vmin=-v, vmax=v)
            else:
                ax.axis("off")
        axes[c][0].set_ylabel(f"{c} ({len(members)})")
    axes[0][0].set_title("mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "clusters.png", dpi=100)
    plt.close(fig)

    with open(outdir / "clusters.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "cluster"])
        writer.writerows(zip(result.ids, result.labels.tolist()))
    sizes = ", ".join(f"cluster {c}: {int((result.labels == c).sum())}" for c in range(n))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family: sans-serif"><h1>{html.escape(title)}</h1>
<p>{len(result.ids)} heatmaps; the eigengap suggests {result.suggested} clusters; {sizes}.
Inputs per cluster: <a href="clusters.csv">clusters.csv</a>.</p>
<h2>Eigenvalues of the affinity graph's Laplacian</h2><img src="eigenvalues.png">
<h2>Embedding</h2><img src="embedding.png">
<h2>Clusters: mean heatmap, then examples</h2><img src="clusters.png">
</body></html>
"""
    (outdir / "index.html").write_text(page)
    return outdir / "index.html"
