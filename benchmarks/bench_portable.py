"""What the portable form (compile --portable) costs on ONNX Runtime: the default compiled model and the portable
one, timed against the forward pass in the same interleaved rounds (bench_explain.py's method: each time is the
lowest of --rounds round medians of --repeats runs after a warm-up). torchvision models with random weights at
224x224 (ResNet-18: overlapping 3x3/2 max pool; VGG-11: non-overlapping 2x2 pools, where the default form uses
MaxUnpool and the portable one ScatterElements), composite epsilon_plus_flat. With --openvino, the portable
model is also timed on OpenVINO's CPU plugin (f32).

    python benchmarks/bench_portable.py [--models resnet18,vgg11] [--batch 4] [--repeats 5] [--rounds 3]
                                        [--openvino]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxlrp
from bench_common import Table, best_of_rounds, export_torchvision, machine_line
from onnxlrp.runtime import CPU, make_session


def openvino_runner(model: onnx.ModelProto, folder: Path):
    import openvino as ov
    path = folder / "portable.onnx"
    onnx.save(model, str(path))
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vgg11")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--openvino", action="store_true")
    args = parser.parse_args()
    print(f"{machine_line('CPU')}; epsilon_plus_flat; batch {args.batch}")
    rows = Table("model", "batch", "ORT forward (s)", "default (s)", "portable (s)", "portable / default",
                 "OpenVINO portable (s)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            _, path = export_torchvision(name, Path(tmp))
            default = onnxlrp.compile_model(path)
            portable = onnxlrp.compile_model(path, portable=True)
            sessions = {"fwd": ort.InferenceSession(str(path), providers=[CPU]),
                        "default": make_session(default, [CPU]), "portable": make_session(portable, [CPU])}
            x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            feeds = {"x": x, "target": np.full(args.batch, -1, np.int64)}
            runs = {"fwd": lambda: sessions["fwd"].run(None, {"x": x}),
                    "default": lambda: sessions["default"].run(None, feeds),
                    "portable": lambda: sessions["portable"].run(None, feeds)}
            times = best_of_rounds(runs, args.repeats, args.rounds)
            ov_s = "–"
            if args.openvino:
                run_ov = openvino_runner(portable, Path(tmp))
                ov_s = f"{best_of_rounds({'ov': lambda: run_ov(feeds)}, args.repeats, args.rounds)['ov']:.3f}"
            rows.add(name, args.batch, f"{times['fwd']:.3f}", f"{times['default']:.3f}", f"{times['portable']:.3f}",
                     f"{times['portable'] / times['default']:.3f}", ov_s)
    print()
    print(rows)


if __name__ == "__main__":
    main()
