"""Inputs explained per second: the single-process `explain` path (Explainer on batches) and Ray Data
(onnxlrp.distributed) with 1 and 2 workers, on the shipped digits model and N generated inputs.

    python benchmarks/bench_ray.py [--inputs 4000] [--batch-size 64]

Ray's times include starting the actor pool (each actor loads the compiled model once) but not `ray.init`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_lrn.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    import ray
    import ray.data

    from onnxlrp import Explainer
    from onnxlrp.distributed import explain_dataset
    n, b = args.inputs, args.batch_size
    x = np.random.default_rng(0).random((n, 1, 32, 32), dtype=np.float32)
    explainer = Explainer(str(MODEL))
    explainer.explain(x[:b])
    start = time.perf_counter()
    for i in range(0, n, b):
        explainer.explain(x[i:i + b])
    rows = [("single process (Explainer, all cores)", n / (time.perf_counter() - start))]
    ray.init(include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        dataset = ray.data.from_numpy(np.array_split(x, 16)).map_batches(  # 16 blocks
            lambda batch: {"id": np.arange(len(batch["data"])).astype(str), "input": batch["data"]},
            batch_format="numpy")
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            explain_dataset(MODEL, dataset, Path(folder) / "out.parquet", batch_size=b, workers=workers)
            rows.append((f"Ray Data, {workers} worker(s) (1 ORT thread each)", n / (time.perf_counter() - start)))
    print(f"{n} inputs of 1x32x32, batch {b}, composite epsilon_plus_flat")
    print("| path | inputs/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
