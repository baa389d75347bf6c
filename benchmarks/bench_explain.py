"""Explain cost against a forward pass: ONNX Runtime forward of the original model, ORT run of the compiled model
(forward + relevance), their ratio, Zennit's time on the same weights and input (if zennit is installed), and
the compile time. torchvision ResNet-50 and VGG-16 with random weights at 224x224, batch 1 and 8; one table from
one run. Then, unless --no-memory, the peak memory growth of each (memory_probe.py: a fresh process per cell,
resident set size sampled every 2 ms over a warm-up and two runs, weights not counted): the ORT forward, the
compiled model in a session with ORT's default options and in onnxlrp's session (memory pattern off, as
onnxlrp.runtime.make_session makes it), and Zennit.

The compiled model is also timed with IO binding (column "IO binding"): input and target bound once as OrtValues on
the provider's device, outputs bound to that device and left there, as a server that keeps its tensors on the GPU
would run it; its outputs are checked equal to the plain run's. On CUDA the table adds the --cuda-batch row with
explanations/s for both.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlrp
from bench_common import Table, best_of_rounds, export_torchvision, machine_line, zennit_explainer
from onnxlrp.save import write_model_atomically
from onnxlrp.runtime import CPU, CUDA, cuda_usable, make_session


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
    print(f"{machine_line(providers[0])}; composite epsilon_plus_flat")
    rows = Table("model", "batch", "ORT forward (s)", "compiled: forward + relevance (s)", "ratio", "IO binding (s)",
                 "Zennit (s)", "vs Zennit", "compile (s)", "compiled size / original")
    memory = Table("model", "batch", "ORT forward (MiB)", "compiled, ORT default options (MiB)",
                   "compiled, onnxlrp session (MiB)", "Zennit (MiB)", "onnxlrp / Zennit", "onnxlrp / forward")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, path = export_torchvision(name, Path(tmp))
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
                feeds = {"x": x, "target": target}
                bound = bound_run(explaining, feeds, "cuda" if args.provider == "cuda" else "cpu")
                times = best_of_rounds({"fwd": lambda: original.run(None, {"x": x}),
                                        "lrp": lambda: explaining.run(None, feeds), "bound": bound},
                                       args.repeats, args.rounds)
                fwd, lrp, zen = times["fwd"], times["lrp"], None
                # Zennit on its own afterwards: PyTorch's worker threads keep spinning after a call and would slow
                # down an ONNX Runtime run that follows them
                with zennit_explainer(model, x) if use_zennit else contextlib.nullcontext() as zennit:
                    if zennit is not None:
                        zen = best_of_rounds({"zennit": zennit}, args.repeats, args.rounds)["zennit"]
                zen_s = f"{zen:.3f}" if zen else "–"
                versus = f"{zen / lrp:.1f}× faster" if zen else "–"
                def rate(seconds: float) -> str:
                    return f" ({batch / seconds:.0f} explanations/s)" if args.provider == "cuda" else ""
                rows.add(name, batch, f"{fwd:.3f}", f"{lrp:.3f}{rate(lrp)}", f"{lrp / fwd:.2f}×",
                         f"{times['bound']:.3f}{rate(times['bound'])}", zen_s, versus, f"{compile_s:.2f}",
                         f"{size_ratio:.2f}")
                if not args.no_memory and args.provider == "cpu":
                    memory.add(*memory_cells(name, batch, path, out, use_zennit))
    print()
    print(rows)
    if memory.has_rows:
        print("\npeak memory growth during the runs (weights not counted)")
        print(memory)


def bound_run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str):
    """A run of ``session`` with IO binding: ``feeds`` copied to ``device`` once, every output bound to ``device``
    (left there). Checks once that the outputs equal a plain run's."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    session.run_with_iobinding(binding)
    for bound, plain in zip(binding.copy_outputs_to_cpu(), session.run(None, feeds)):
        if not np.array_equal(bound, plain):
            raise SystemExit("IO binding changed the outputs")
    return lambda: session.run_with_iobinding(binding)


def probe(kind: str, model: str, batch: int) -> float:
    """Peak memory growth (MiB) of ``kind`` in a fresh process (memory_probe.py)."""
    script = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(script), kind, model, str(batch)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


def memory_cells(name: str, batch: int, original: Path, compiled: Path, zennit: bool) -> tuple:
    fwd = probe("ort", str(original), batch)
    default = probe("ort", str(compiled), batch)
    ours = probe("onnxlrp", str(compiled), batch)
    zen = probe("zennit", name, batch) if zennit else None
    versus = f"{ours / zen:.2f}×" if zen else "–"
    return (name, batch, f"{fwd:.0f}", f"{default:.0f}", f"{ours:.0f}", f"{zen:.0f}" if zen else "–", versus,
            f"{ours / fwd:.1f}×")


if __name__ == "__main__":
    main()
