"""Explain cost against a forward pass: ONNX Runtime forward of the original model, ORT run of the compiled model
(forward + relevance), their ratio, Zennit's time on the same weights and input (if zennit is installed), and
the compile time. torchvision ResNet-50 and VGG-16 with random weights at 224x224, batch 1 and 8; medians of
--repeats runs after a warm-up; one table from one run.

    python benchmarks/bench_explain.py [--models resnet50,vgg16] [--batches 1,8] [--repeats 5] [--provider cpu|cuda]
                                       [--cuda-batch 64]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlrp
from onnxlrp.save import write_model_atomically
from onnxlrp.runtime import CPU, CUDA, cuda_usable, make_session


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export(name: str, folder: Path):
    import torch
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return model, path


def zennit_time(model, x: np.ndarray, repeats: int) -> float | None:
    try:
        import torch
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError:
        return None
    canonizer = ResNetCanonizer() if "ResNet" in type(model).__name__ else VGGCanonizer()
    xt = torch.tensor(x)
    one_hot = torch.eye(1000)[model(xt).argmax(1)]
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
        return median_time(lambda: attributor(xt, lambda out: out * one_hot), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cuda" if cuda_usable() else "cpu")
    parser.add_argument("--cuda-batch", type=int, default=64, help="batch for explanations/s on CUDA")
    parser.add_argument("--no-zennit", action="store_true")
    args = parser.parse_args()
    providers = [CUDA, CPU] if args.provider == "cuda" else [CPU]
    threads = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {threads} cores; onnxruntime {ort.__version__} "
          f"({providers[0]}); onnxlrp {onnxlrp.__version__}; composite epsilon_plus_flat")
    header = "| model | batch | ORT forward (s) | compiled: forward + relevance (s) | ratio | Zennit (s) | " \
             "vs Zennit | compile (s) | compiled size / original |"
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, path = export(name, Path(tmp))
            start = time.perf_counter()
            compiled = onnxlrp.compile_model(path)
            compile_s = time.perf_counter() - start
            out = Path(tmp) / f"{name}.lrp.onnx"
            write_model_atomically(compiled, out)
            size_ratio = out.stat().st_size / path.stat().st_size
            original = ort.InferenceSession(str(path), providers=providers)
            explaining = make_session(compiled, providers)
            batches = [int(b) for b in args.batches.split(",")] + ([args.cuda_batch] if args.provider == "cuda"
                                                                    else [])
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                target = np.full(batch, -1, np.int64)
                fwd = median_time(lambda: original.run(None, {"x": x}), args.repeats)
                lrp = median_time(lambda: explaining.run(None, {"x": x, "target": target}), args.repeats)
                zen = None if args.no_zennit or args.provider == "cuda" else zennit_time(model, x, args.repeats)
                zen_s = f"{zen:.3f}" if zen else "–"
                versus = f"{zen / lrp:.1f}× faster" if zen else "–"
                extra = f" ({batch / lrp:.0f} explanations/s)" if args.provider == "cuda" else ""
                rows.append(f"| {name} | {batch} | {fwd:.3f} | {lrp:.3f}{extra} | {lrp / fwd:.2f}× | {zen_s} | "
                            f"{versus} | {compile_s:.2f} | {size_ratio:.2f} |")
                print(rows[-1], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
