"""Peak memory growth of one explaining (or forward) run, measured in a fresh process: the resident set size is
sampled every 2 ms by a thread while the model runs ``--runs`` times (a warm-up counts: ORT's arena and memory
pattern grow on the first and second run), and the growth is the peak minus the size just before the first run
(after the model and its weights are loaded, so weights are not counted, and after the heap's free pages are
returned to the system, so that memory freed while loading cannot hide the runs' growth). bench_explain.py runs one probe per
cell so that no allocator state carries over from another measurement.

    python benchmarks/memory_probe.py KIND MODEL BATCH [--runs 3] [--threads N]
      KIND: ort (ONNX Runtime's default session options), onnxlrp (onnxlrp.runtime.make_session's options),
            zennit (MODEL is a torchvision name: Zennit's EpsilonPlusFlat with its canonizers, weights seeded 0)
Prints one line: the growth in MiB.
"""
from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np
import psutil

from bench_common import torchvision_model, zennit_explainer


class PeakSampler:
    """The largest resident set size seen while the ``with`` block runs (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.process, self.interval = psutil.Process(), interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakSampler:
        _return_free_memory()
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim) so that what loading the model freed
    is not silently reused by the runs: otherwise their growth would be hidden in memory already counted."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def ort_runner(kind: str, path: str, batch: int, threads: int | None):
    import onnx
    import onnxruntime as ort
    if kind == "onnxlrp":
        from onnxlrp.runtime import make_session
        session = make_session(onnx.load(path), ["CPUExecutionProvider"], threads)
    else:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    feeds = {i.name: x if i.name == "x" else np.full(batch, -1, np.int64) for i in session.get_inputs()}
    return lambda: session.run(None, feeds)


@contextlib.contextmanager
def zennit_runner(name: str, batch: int, threads: int | None):
    """Zennit's EpsilonPlusFlat on torchvision's ``name`` (weights seeded 0), run inside its attributor context."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    model = torchvision_model(name)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    with zennit_explainer(model, x) as run:
        if run is None:
            raise SystemExit("memory_probe: zennit is not installed")
        yield run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["ort", "onnxlrp", "zennit"])
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    runner = zennit_runner(args.model, args.batch, args.threads) if args.kind == "zennit" else \
        contextlib.nullcontext(ort_runner(args.kind, args.model, args.batch, args.threads))
    with runner as run, PeakSampler() as sampler:
        for _ in range(args.runs):
            run()
    print(f"{sampler.growth_mib:.0f}")


if __name__ == "__main__":
    main()
