"""Where the explaining model's time goes: ONNX Runtime's per-op kernel times (its profiler) for the compiled model
against the forward pass, on the benchmark's torchvision models (random weights, 224x224, epsilon_plus_flat).

Prints, per model and batch, the kernel time of each op type in both models (ms per run) and the "convolution
floor": the kernel time of the compiled model's convolutions (the forward's, the rules' modified forwards and
transposed passes: Conv, ConvTranspose) over the forward's total kernel time. No explaining model with three
convolution passes per layer can run faster than that ratio with the same kernels.

    python benchmarks/profile_explain.py [--models resnet50,vgg16] [--batches 1,8] [--runs 5] [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlrp
from onnxlrp.save import write_model_atomically

from bench_common import export_torchvision

CONVOLUTIONS = {"Conv", "FusedConv", "ConvTranspose"}


def kernel_times(model: str, feeds: dict, runs: int) -> dict[str, float]:
    """Op type -> kernel milliseconds per run, over ``runs`` runs after two warm-up runs."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 2):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = starts[2]  # node events before the third run belong to the warm-up runs
    total: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first_timed:
            total[event["args"]["op_name"]] += event["dur"] / 1e3
    return {op: t / runs for op, t in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="op types listed per table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            _, path = export_torchvision(name, Path(tmp))
            out = Path(tmp) / f"{name}.lrp.onnx"
            write_model_atomically(onnxlrp.compile_model(path), out)
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                fwd = kernel_times(str(path), {"x": x}, args.runs)
                lrp = kernel_times(str(out), {"x": x, "target": np.full(batch, -1, np.int64)}, args.runs)
                fwd_total, lrp_total = sum(fwd.values()), sum(lrp.values())
                conv = sum(t for op, t in lrp.items() if op in CONVOLUTIONS)
                print(f"\n{name}, batch {batch}: kernel time per run {fwd_total:.1f} ms forward, {lrp_total:.1f} ms "
                      f"explaining ({lrp_total / fwd_total:.2f}×); its convolutions alone {conv:.1f} ms = "
                      f"{conv / fwd_total:.2f}× the forward")
                print("| op | forward (ms) | explaining model (ms) |\n|---|---|---|")
                for op, t in sorted(lrp.items(), key=lambda kv: -kv[1])[: args.top]:
                    print(f"| {op} | {fwd.get(op, 0.0):.1f} | {t:.1f} |")


if __name__ == "__main__":
    main()
