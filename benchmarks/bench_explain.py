"""Explain cost against a forward pass: ONNX Runtime forward of the original model, ORT run of the compiled model
(forward + relevance), their ratio, Zennit's time on the same weights and input (if zennit is installed), and
the compile time. torchvision ResNet-50 and VGG-16 with random weights at 224x224, batch 1 and 8; one table from
one run. Then, unless --no-memory, the peak memory growth of each (memory_probe.py: a fresh process per cell,
resident set size sampled every 2 ms over a warm-up and two runs, weights not counted): the ORT forward, the
compiled model in a session with ORT's default options and in onnxlrp's session (memory pattern off, as
onnxlrp.runtime.make_session makes it), and Zennit.

Timing: --rounds rounds, each running the forward and the compiled model in turn, each as a warm-up plus --repeats
timed runs; a time is the lowest of its rounds' medians (Zennit's rounds follow). Shared machines slow down for
seconds at a time; interleaving the two and keeping each one's best round keeps such a slowdown from landing on one
side of the ratio.

    python benchmarks/bench_explain.py [--models resnet50,vgg16] [--batches 1,8] [--repeats 5] [--rounds 3]
                                       [--provider cpu|cuda] [--cuda-batch 64] [--no-zennit] [--no-memory]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
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


def best_of_rounds(fns: dict, repeats: int, rounds: int) -> dict:
    """name -> the lowest of ``rounds`` medians, the named functions taking turns round by round."""
    medians: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(median_time(fn, repeats))
    return {name: min(values) for name, values in medians.items()}


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


@contextlib.contextmanager
def zennit_explainer(model, x: np.ndarray):
    """A function running Zennit's EpsilonPlusFlat on x (None when zennit is not installed)."""
    try:
        import torch
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError:
        yield None
        return
    canonizer = ResNetCanonizer() if "ResNet" in type(model).__name__ else VGGCanonizer()
    xt = torch.tensor(x)
    with torch.no_grad():
        one_hot = torch.eye(1000)[model(xt).argmax(1)]
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
        yield lambda: attributor(xt, lambda out: out * one_hot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cuda" if cuda_usable() else "cpu")
    parser.add_argument("--cuda-batch", type=int, default=64, help="batch for explanations/s on CUDA")
    parser.add_argument("--no-zennit", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    args = parser.parse_args()
    providers = [CUDA, CPU] if args.provider == "cuda" else [CPU]
    threads = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {threads} cores; onnxruntime {ort.__version__} "
          f"({providers[0]}); onnxlrp {onnxlrp.__version__}; composite epsilon_plus_flat")
    header = "| model | batch | ORT forward (s) | compiled: forward + relevance (s) | ratio | Zennit (s) | " \
             "vs Zennit | compile (s) | compiled size / original |"
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    memory = ["| model | batch | ORT forward (MiB) | compiled, ORT default options (MiB) | compiled, onnxlrp session "
              "(MiB) | Zennit (MiB) | onnxlrp / Zennit | onnxlrp / forward |", "|---|---|---|---|---|---|---|---|"]
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
                use_zennit = not args.no_zennit and args.provider == "cpu"
                times = best_of_rounds({"fwd": lambda: original.run(None, {"x": x}),
                                        "lrp": lambda: explaining.run(None, {"x": x, "target": target})},
                                       args.repeats, args.rounds)
                fwd, lrp, zen = times["fwd"], times["lrp"], None
                # Zennit on its own afterwards: PyTorch's worker threads keep spinning after a call and would slow
                # down an ONNX Runtime run that follows them
                with zennit_explainer(model, x) if use_zennit else contextlib.nullcontext() as zennit:
                    if zennit is not None:
                        zen = best_of_rounds({"zennit": zennit}, args.repeats, args.rounds)["zennit"]
                zen_s = f"{zen:.3f}" if zen else "–"
                versus = f"{zen / lrp:.1f}× faster" if zen else "–"
                extra = f" ({batch / lrp:.0f} explanations/s)" if args.provider == "cuda" else ""
                rows.append(f"| {name} | {batch} | {fwd:.3f} | {lrp:.3f}{extra} | {lrp / fwd:.2f}× | {zen_s} | "
                            f"{versus} | {compile_s:.2f} | {size_ratio:.2f} |")
                print(rows[-1], flush=True)
                if not args.no_memory and args.provider == "cpu":
                    memory.append(memory_row(name, batch, path, out, use_zennit))
                    print(memory[-1], flush=True)
    print()
    print("\n".join(rows))
    if len(memory) > 2:
        print("\npeak memory growth during the runs (weights not counted)")
        print("\n".join(memory))


def probe(kind: str, model: str, batch: int) -> float:
    """Peak memory growth (MiB) of ``kind`` in a fresh process (memory_probe.py)."""
    script = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(script), kind, model, str(batch)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


def memory_row(name: str, batch: int, original: Path, compiled: Path, zennit: bool) -> str:
    fwd = probe("ort", str(original), batch)
    default = probe("ort", str(compiled), batch)
    ours = probe("onnxlrp", str(compiled), batch)
    zen = probe("zennit", name, batch) if zennit else None
    versus = f"{ours / zen:.2f}×" if zen else "–"
    return (f"| {name} | {batch} | {fwd:.0f} | {default:.0f} | {ours:.0f} | {f'{zen:.0f}' if zen else '–'} | "
            f"{versus} | {ours / fwd:.1f}× |")


if __name__ == "__main__":
    main()
