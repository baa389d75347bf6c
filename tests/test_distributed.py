"""Explaining datasets on Ray Data (onnxlrp.distributed, `explain --ray`): bit-identical to the local explain,
bad inputs as error rows, Parquet in and out, and a few thousand inputs streamed with bounded memory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from onnxlrp.distributed import explain_dataset, read_results  # noqa: E402
from onnxlrp.explain import explain_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = ROOT / "models" / "samples"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    os.environ["ONNXLRP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The ten sample digits, one .npy digit, one undecodable PNG and one array of the wrong shape."""
    folder = tmp_path_factory.mktemp("inputs")
    for path in SAMPLES.glob("*.png"):
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"not a png")
    rng = np.random.default_rng(0)
    np.save(folder / "noise.npy", rng.random((1, 32, 32), dtype=np.float32))
    np.save(folder / "wrong.npy", np.zeros((3, 5), np.float32))
    return folder


def test_ray_relevance_is_bit_identical_to_local_explain_with_error_rows(local_ray, inputs, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    results, failures = explain_files(MODEL, [inputs], local, ["epsilon_plus_flat"], None, 4, progress=False,
                                      log=lambda m: None, warn=lambda m: None)
    summary = explain_dataset(MODEL, [inputs], tmp_path / "sink.parquet", batch_size=4, workers=2, outdir=remote)
    frame = read_results(summary.sink)
    assert summary.rows == 13 and summary.errors == 2 == len(failures)
    errors = frame[frame["error"].notna()]
    assert sorted(Path(i).name for i in errors["id"]) == ["broken.png", "wrong.npy"]
    assert all("broken.png: cannot decode" in e or "wrong.npy: array of shape [3, 5]" in e for e in errors["error"])
    good = frame[frame["error"].isna()]
    assert len(good) == len(results) == 11
    for result in results:
        row = good[good["id"] == str(result.file)].iloc[0]
        npy = next(p for p in result.outputs if p.suffix == ".npy")
        mine = np.load(row["relevance_path"])
        assert Path(row["relevance_path"]).name == npy.name
        assert np.array_equal(mine, np.load(npy))  # bit-identical
        assert (row["predicted"], row["explained"]) == (result.predicted, result.explained)
        assert row["relevance_sum"] == result.relevance_sum
        assert Path(row["heatmap_path"]).is_file()

    arrays = explain_dataset(MODEL, [inputs], tmp_path / "arrays.parquet", batch_size=4, workers=1, target=[3, 5])
    frame = read_results(arrays.sink)
    assert arrays.rows == 2 * 11 + 2
    for result in results:
        row = frame[(frame["id"] == str(result.file)) & (frame["target"] == 3)].iloc[0]
        assert row["explained"] == 3 and row["relevance"].shape == (1, 32, 32)


@pytest.mark.slow
def test_parquet_source_and_streamed_dataset_with_bounded_memory(local_ray, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from onnxlrp import Explainer

    rng = np.random.default_rng(1)
    x = rng.random((40, 1, 32, 32), dtype=np.float32)
    table = pa.table({"id": [f"s{i}" for i in range(40)], "input": [a.reshape(-1).tolist() for a in x]})
    pq.write_table(table, tmp_path / "in.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet")).map_batches(
        lambda b: {"id": b["id"], "input": np.stack([np.asarray(v, np.float32).reshape(1, 32, 32)
                                                     for v in b["input"]])}, batch_format="numpy")
    summary = explain_dataset(MODEL, ds, tmp_path / "out.parquet", batch_size=8, workers=2)
    frame = read_results(summary.sink)
    assert summary.rows == 40 and summary.errors == 0
    _, expected = Explainer(str(MODEL)).explain(x)
    got = np.stack([frame[frame["id"] == f"s{i}"].iloc[0]["relevance"] for i in range(40)])
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)  # batches may be grouped otherwise

    # 4,000 inputs made on the fly (never held as a whole): the driver's memory stays far below the data's size
    import psutil
    n = 4000

    def make(batch):
        seeds = batch["id"]
        return {"id": seeds.astype(str), "input": np.stack([np.random.default_rng(int(s)).random((1, 32, 32),
                                                                                                dtype=np.float32)
                                                            for s in seeds])}

    stream = ray.data.range(n, override_num_blocks=40).map_batches(make, batch_format="numpy")
    process, peak, done = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss - start)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    summary = explain_dataset(MODEL, stream, tmp_path / "stream.parquet", batch_size=64, workers=2)
    done.set()
    sampler.join()
    data_bytes = n * 2 * 32 * 32 * 4  # inputs + relevance
    assert summary.rows == n and summary.errors == 0
    assert peak[0] < data_bytes / 2, (peak[0], data_bytes)


def test_cli_explain_ray_writes_local_outputs_and_parquet(inputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "ONNXLRP_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "explain", str(MODEL), str(inputs), "-o", str(out),
                             "--ray", "--workers", "1", "--batch-size", "4"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 1, result.stderr  # two inputs cannot be used
    lines = [line for line in result.stdout.splitlines() if ": predicted " in line]
    assert len(lines) == 11 and "Traceback" not in result.stderr
    assert "broken.png: cannot decode the image" in result.stderr
    assert (out / "digit_3.npy").is_file() and (out / "digit_3.png").is_file()
    assert read_results(out / "results.parquet", ["id"]).shape[0] == 13
