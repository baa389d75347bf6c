"""Explaining datasets on Ray Data: compile once, ship the compiled bytes through the object store, and run one
ONNX Runtime session per actor of a `map_batches` actor pool, streaming, so memory stays bounded whatever the
dataset's size.

Sources: image / .npy files, folders and globs (rows are batches of paths, grouped exactly as the local
``onnxlrp explain`` groups them, so the relevance is bit-identical to it), Parquet files with an ``input`` column
(one sample per row, optional ``id``), or any ``ray.data.Dataset`` with such a column (e.g.
``ray.data.read_numpy``'s ``data``). Sink: Parquet, one row per input and target: ``id``, ``target``,
``predicted``, ``score``, ``explained``, ``explained_score``, ``relevance_sum``, ``relevance`` (flattened
float32) and ``relevance_shape``, or ``relevance_path`` when the arrays are written as .npy files, and ``error``
(an input that cannot be used becomes an error row, never a failed job).
"""
from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OnnxlrpError
from .inputs import IMAGE_SUFFIXES, expand_inputs, input_spec, load_input

#: Columns of the Parquet sink (see the module docstring).
COLUMNS = ("id", "target", "predicted", "score", "explained", "explained_score", "relevance_sum", "relevance",
           "relevance_shape", "relevance_path", "heatmap_path", "error")


@dataclass
class DatasetSummary:
    """What a dataset run did."""

    rows: int
    errors: int
    sink: Path


def _schema():
    import pyarrow as pa
    return pa.schema([("id", pa.string()), ("target", pa.int64()), ("predicted", pa.int64()),
                      ("score", pa.float64()), ("explained", pa.int64()), ("explained_score", pa.float64()),
                      ("relevance_sum", pa.float64()), ("relevance", pa.list_(pa.float32())),
                      ("relevance_shape", pa.list_(pa.int64())), ("relevance_path", pa.string()),
                      ("heatmap_path", pa.string()), ("error", pa.string())])


def _row(ident: str, **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(id=ident, relevance=[], relevance_shape=[], **values)
    return row


class _Explain:
    """The actor of the pool: one ORT session, built once from the compiled model's bytes."""

    def __init__(self, compiled: bytes, normalize: str, resize: str, size, targets: list[int | None],
                 outdir: str | None, render: dict, threads: int | None) -> None:
        import onnx

        from .outputs import OutputFolder
        from .runtime import Explainer
        model = onnx.load_model_from_string(compiled)
        self.explainer = Explainer.from_compiled(model, threads=threads or 1)
        self.spec = input_spec(model, size)
        self.normalize, self.resize, self.targets = normalize, resize, targets
        self.folder = OutputFolder(Path(outdir), []) if outdir else None
        self.render = render  # cmap, zoom, colorbar, overlay of the heatmaps written to outdir
        shape0 = self.spec.shape[0] if self.spec.shape else None
        self.fixed = shape0 if isinstance(shape0, int) and shape0 > 0 else None

    def __call__(self, batch: dict):
        import pyarrow as pa
        if "paths" in batch:  # one row = one batch of files, as the local explain groups them
            rows = []
            for paths, stems in zip(batch["paths"], batch["stems"]):
                rows += self._files(list(paths), list(stems))
        else:
            rows = self._arrays([str(i) for i in batch["id"]], batch["input"])
        return pa.Table.from_pylist(rows, schema=_schema())

    def _files(self, paths: list[str], stems: list[str]) -> list[dict]:
        rows, loaded = [], []
        for path, stem in zip(paths, stems):
            try:
                array, display = load_input(Path(path), self.spec, self.normalize, self.resize)
                loaded.append((path, stem, array, display if display is not None else array))
            except OnnxlrpError as exc:
                rows.append(_row(path, error=str(exc)))
        if loaded:
            rows += self._run([p for p, _, _, _ in loaded], np.stack([a for _, _, a, _ in loaded]),
                              [s for _, s, _, _ in loaded], [d for _, _, _, d in loaded])
        return rows

    def _arrays(self, ids: list[str], inputs) -> list[dict]:
        rows, good, arrays = [], [], []
        for ident, array in zip(ids, inputs):
            array = np.asarray(array, dtype=self.spec.dtype)
            expected = self.spec.shape[1:]
            if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected, array.shape)):
                rows.append(_row(ident, error=f"{ident}: array of shape {list(array.shape)} does not fit the model "
                                              f"input {self.spec.name!r} of shape {['N', *expected]}"))
            elif array.dtype.kind == "f" and not np.isfinite(array).all():
                rows.append(_row(ident, error=f"{ident}: the array holds NaN or infinite values"))
            else:
                good.append(ident)
                arrays.append(array)
        if good:
            rows += self._run(good, np.stack(arrays), None)
        return rows

    def _run(self, ids: list[str], x: np.ndarray, stems: list[str] | None = None,
             displays: list | None = None) -> list[dict]:
        from .explain import _pad_batch
        rows = []
        n = len(ids)
        for t in self.targets:
            outputs, relevance = self.explainer.explain({self.spec.name: _pad_batch(x, self.fixed)}, target=t)
            if isinstance(relevance, dict):
                relevance = relevance[self.spec.name]
            scores = outputs[self.explainer.explained_output][:n].reshape(n, -1)
            for k in range(n):
                r = relevance[k]
                predicted = int(scores[k].argmax())
                explained = predicted if t is None or t < 0 else int(t)
                row = _row(ids[k], target=-1 if t is None else int(t), predicted=predicted,
                           score=float(scores[k, predicted]), explained=explained,
                           explained_score=float(scores[k, explained]), relevance_sum=float(r.sum()))
                if self.folder is not None and stems is not None:
                    stem = stems[k] + (f".{t}" if len(self.targets) > 1 else "")
                    npy = self.folder.outdir / f"{stem}.npy"
                    self.folder.save_npy(npy, r)
                    row["relevance_path"] = str(npy)
                    if r.ndim in (2, 3):
                        from .render import relevance_map, render_heatmap
                        png = self.folder.outdir / f"{stem}.png"
                        background = displays[k] if self.render["overlay"] and displays else None
                        self.folder.save_png(png, render_heatmap(
                            relevance_map(r, self.spec.channels_last), self.render["cmap"], background,
                            zoom=self.render["zoom"], colorbar=self.render["colorbar"]))
                        row["heatmap_path"] = str(png)
                else:
                    row["relevance"] = r.reshape(-1).astype(np.float32)
                    row["relevance_shape"] = list(r.shape)
                rows.append(row)
        return rows


def expand_sources(inputs: list[str | Path]) -> list[Path]:
    """Files, folders (their images and .npy files, sorted) and globs, in the order given."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            paths += [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES | {".npy"}]
        else:
            paths.append(Path(text))
    return expand_inputs(paths)


def _is_parquet(inputs: list) -> bool:
    return bool(inputs) and all(str(i).endswith(".parquet") or (Path(i).is_dir() and any(Path(i).glob("*.parquet")))
                                for i in inputs)


def explain_dataset(model: str | Path, inputs, sink: str | Path, *, composite: str = "epsilon_plus_flat",
                    target: int | list[int] | None = None, workers: int = 2, batch_size: int = 16,
                    address: str | None = None, size: tuple[int, int] | None = None, normalize: str = "unit",
                    resize: str = "crop", outdir: str | Path | None = None, cmap: str = "bwr", zoom: int = 1,
                    colorbar: bool = False, overlay: bool = False, threads_per_worker: int | None = None,
                    stem_suffix: str = "", **options) -> DatasetSummary:
    """Explain a dataset with Ray Data and write the results to the Parquet folder ``sink``.

    inputs: paths (image/.npy files, folders, globs), Parquet files/folders with an ``input`` column, or a
    ``ray.data.Dataset`` with an ``input`` (or ``data``) column and optionally ``id``. target: None (top class), a
    class, or a list of classes (one row each). outdir: also write ``<name>.npy`` / ``<name>.png`` per input there,
    named as the local ``explain`` names them (the Parquet rows then hold their paths instead of the arrays;
    cmap, zoom, colorbar and overlay as for ``explain``).
    address: a Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray on this machine. Each actor
    runs ONNX Runtime on ``threads_per_worker`` threads (1) and reserves half as many logical CPUs, so that Ray's
    read and write tasks still find a CPU when the actors fill a small machine (else they wait forever).
    Returns the number of rows and error rows written.
    """
    import ray
    import ray.data

    from .cache import compile_cached
    from .outputs import OutputFolder, output_stems
    if workers < 1 or batch_size < 1:
        raise OnnxlrpError(f"--workers and --batch-size must be at least 1, got {workers} and {batch_size}")
    targets = [None] if target is None else ([target] if isinstance(target, int) else list(target))
    compiled, _ = compile_cached(Path(model), composite, **options)
    spec = input_spec(compiled, size)
    shape0 = spec.shape[0] if spec.shape else None
    batch_size = shape0 if isinstance(shape0, int) and shape0 > 0 else batch_size
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = -1  # a busy machine is slow, not stuck
    files: list[Path] = []
    if isinstance(inputs, ray.data.Dataset):
        dataset = inputs
    elif _is_parquet(list(inputs)):
        dataset = ray.data.read_parquet([str(i) for i in inputs])
    else:
        files = expand_sources(list(inputs))
        if not files:
            raise OnnxlrpError("no input files (give images, .npy arrays, or folders of them)")
        stems = output_stems(files)
        groups = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
        dataset = ray.data.from_items([{"paths": [str(p) for p in g], "stems": [stems[p] + stem_suffix for p in g]}
                                       for g in groups], override_num_blocks=min(len(groups), 8 * workers))
    if not files:
        columns = dataset.columns() or []
        if "input" not in columns and "data" in columns:
            dataset = dataset.rename_columns({"data": "input"})
        elif "input" not in columns:
            raise OnnxlrpError(f"the dataset has no column 'input' (columns: {', '.join(columns)})")
        if "id" not in columns:
            dataset = _with_ids(dataset)
    folder = None
    if outdir is not None:
        folder = OutputFolder(Path(outdir), files).open()
    result = dataset.map_batches(
        _Explain, fn_constructor_args=(compiled.SerializeToString(), normalize, resize, size, targets,
                                       str(outdir) if outdir is not None else None,
                                       {"cmap": cmap, "zoom": zoom, "colorbar": colorbar, "overlay": overlay},
                                       threads_per_worker),
        batch_size=1 if files else batch_size, batch_format="numpy", concurrency=workers,
        num_cpus=(threads_per_worker or 1) / 2, max_restarts=0)
    sink = Path(sink)
    try:
        result.write_parquet(str(sink))
    except Exception:
        if folder is not None:
            folder.close(failed=True)
        raise
    import pyarrow.parquet as pq
    table = pq.read_table(str(sink), columns=["error"])
    errors = sum(e is not None for e in table.column("error").to_pylist())
    return DatasetSummary(table.num_rows, errors, sink)


def _with_ids(dataset):
    """Number the rows of a dataset without ids (their position, in order)."""
    import ray.data
    indexed = ray.data.from_items([{"id": i} for i in range(dataset.count())])
    return dataset.zip(indexed).select_columns(["id", "input"])


def read_results(sink: str | Path, columns: list[str] | None = None):
    """The Parquet sink as a pandas DataFrame, with ``relevance`` reshaped to arrays when present."""
    import pyarrow.parquet as pq
    frame = pq.read_table(str(sink), columns=columns).to_pandas()
    if "relevance" in frame and "relevance_shape" in frame:
        frame["relevance"] = [np.asarray(r, dtype=np.float32).reshape([int(d) for d in s]) if len(s) else None
                              for r, s in zip(frame["relevance"], frame["relevance_shape"])]
    return frame


def explain_on_ray(model: Path, inputs: list[Path], outdir: Path, composites: list[str],
                   targets: list[int] | None, batch_size: int, size, normalize: str, resize: str, cmap: str,
                   workers: int, address: str | None, log=print, zoom: int = 1, colorbar: bool = False,
                   overlay: bool = False, **options) -> list[tuple[str, str]]:
    """`onnxlrp explain --ray`: the local command's outputs (``<name>.npy``/``.png`` per input and target, one
    line each) computed on Ray, plus ``OUTDIR/results.parquet`` (``results.<composite>.parquet`` with several
    composites). Returns the failed inputs as (id, message)."""
    from .explain import ExplainResult, follow_normalize
    follow_normalize(options, model, normalize, size)
    failures: list[tuple[str, str]] = []
    for composite in composites:
        name = "results.parquet" if len(composites) == 1 else f"results.{composite}.parquet"
        summary = explain_dataset(model, inputs, outdir / name, composite=composite, target=targets,
                                  workers=workers, batch_size=batch_size, address=address, size=size,
                                  normalize=normalize, resize=resize, outdir=outdir, cmap=cmap, zoom=zoom,
                                  colorbar=colorbar, overlay=overlay,
                                  stem_suffix=f".{composite}" if len(composites) > 1 else "", **options)
        frame = read_results(summary.sink, ["id", "predicted", "score", "explained", "explained_score",
                                            "relevance_sum", "error"])
        for row in frame.itertuples():
            if isinstance(row.error, str):
                if composite == composites[0]:
                    failures.append((row.id, row.error))
                continue
            log(ExplainResult(Path(row.id), composite, int(row.predicted), float(row.score), int(row.explained),
                              float(row.relevance_sum), explained_score=float(row.explained_score))
                .line(len(composites) > 1))
        log(f"{summary.rows} row(s), {summary.errors} error(s): {summary.sink}")
    return failures
