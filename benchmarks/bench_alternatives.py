"""Exact alternatives to two of the explaining model's slower ONNX Runtime kernels, timed against what the
compiler emits (ONNX Runtime CPU provider, 2 threads; lowest of 3 round medians of 5 runs, the two forms of a case
alternated; results compared element for element):

1. The transposed pass of a stride-2 convolution (ResNet-50's 3x3 and 1x1 downsampling layers), then the product
   with the layer input: ``ConvTranspose`` (emitted) against its polyphase form, one stride-1 ``Conv`` per output
   phase (1x1, 1x2, 2x1, 2x2 kernels taken from the flipped weight) interleaved by ``Concat`` + ``DepthToSpace``.
2. The winners of a non-overlapping 2x2 max pool (VGG-16's): ``MaxPool`` with ``Indices`` + ``MaxUnpool``
   (emitted) against (a) ``ArgMax`` over the four window positions (first maximum, as ONNX Runtime and torch pick
   it) and (b) ``Equal(X, Resize(Y))`` with ties broken by a position key and a second, plain ``MaxPool``.

    python benchmarks/bench_alternatives.py [--batches 1,8]
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench_common import best_of_rounds


def _model(nodes: list, inputs: list[str], initializers: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(nodes, "alternative", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None)
                                                     for i in inputs],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def compare(models: dict[str, bytes], feeds: dict[str, np.ndarray], rounds: int = 3, repeats: int = 5) -> None:
    """Print each form's time (ms) and whether its result equals the first form's."""
    sessions = {name: _session(m) for name, m in models.items()}
    results = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    best = best_of_rounds({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}, repeats, rounds)
    first = next(iter(models))
    for name in models:
        same = np.array_equal(results[name], results[first])
        close = np.abs(results[name] - results[first]).max() / max(np.abs(results[first]).max(), 1e-30)
        print(f"  {name:28s} {best[name] * 1e3:8.2f} ms  {best[name] / best[first]:5.2f}x  "
              f"{'identical' if same else f'max rel. difference {close:.1e}'}")


def transposed_stride2(batch: int, c_out: int, c_in: int, size: int, kernel: int, rng) -> None:
    """ConvTranspose against polyphase Convs, for a layer c_in -> c_out, stride 2, kernel 1 or 3 (pad kernel//2)."""
    w = (rng.standard_normal((c_out, c_in, kernel, kernel)) * 0.05).astype(np.float32)
    feeds = {"S": rng.standard_normal((batch, c_out, size, size)).astype(np.float32),
             "X": rng.random((batch, c_in, 2 * size, 2 * size)).astype(np.float32)}
    emitted = _model([helper.make_node("ConvTranspose", ["S", "W"], ["G"], strides=[2, 2], pads=[kernel // 2] * 4,
                                       output_padding=[1, 1]),
                      helper.make_node("Mul", ["X", "G"], ["R"])], ["S", "X"], {"W": w})
    # output row 2m reads S[m] through tap 1 (kernel 3) or 0 (kernel 1); row 2m+1 reads S[m] (tap 2), S[m+1] (tap 0)
    taps = {0: [1], 1: [2, 0]} if kernel == 3 else {0: [0], 1: []}
    nodes, inits, phases = [], {}, []
    for a in (0, 1):
        for b in (0, 1):
            name = f"P{a}{b}"
            if not taps[a] or not taps[b]:
                phases.append("Z")
                continue
            inits[f"W{a}{b}"] = np.ascontiguousarray(w[:, :, taps[a]][:, :, :, taps[b]].transpose(1, 0, 2, 3))
            nodes.append(helper.make_node("Conv", ["S", f"W{a}{b}"], [name],
                                          pads=[0, 0, len(taps[a]) - 1, len(taps[b]) - 1]))
            phases.append(name)
    if "Z" in phases:  # phases no tap reaches are zeros
        inits["zero"] = np.zeros((), np.float32)
        nodes.append(helper.make_node("Mul", ["P00", "zero"], ["Z"]))
    nodes += [helper.make_node("Concat", phases, ["C"], axis=1),
              helper.make_node("DepthToSpace", ["C"], ["G"], blocksize=2, mode="DCR"),
              helper.make_node("Mul", ["X", "G"], ["R"])]
    print(f"transposed pass, {c_in}->{c_out}, {kernel}x{kernel} stride 2, {size}x{size} -> {2 * size}, batch {batch}:")
    compare({"ConvTranspose (emitted)": emitted, "polyphase Conv": _model(nodes, ["S", "X"], inits)}, feeds)


def maxpool_winners(batch: int, channels: int, size: int, rng) -> None:
    """MaxPool Indices + MaxUnpool against ArgMax and Equal/Resize winners, 2x2 windows, stride 2."""
    x = np.maximum(rng.standard_normal((batch, channels, size, size)), 0).astype(np.float32)
    x[:, :, :4, :4] = 1.0  # ties: the first maximum of a window wins
    feeds = {"X": x, "R": rng.standard_normal((batch, channels, size // 2, size // 2)).astype(np.float32)}
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    emitted = _model([helper.make_node("MaxPool", ["X"], ["Y", "I"], **pool),
                      helper.make_node("MaxUnpool", ["R", "I"], ["RX"], **pool)], ["X", "R"], {})
    n, c, h = batch, channels, size // 2
    argmax = _model([
        helper.make_node("Reshape", ["X", "s6"], ["X6"]),
        helper.make_node("Transpose", ["X6"], ["Xt"], perm=[0, 1, 2, 4, 3, 5]),
        helper.make_node("Reshape", ["Xt", "s5"], ["X5"]),
        helper.make_node("ArgMax", ["X5"], ["A"], axis=4, keepdims=1),
        helper.make_node("Equal", ["A", "positions"], ["M"]),
        helper.make_node("Unsqueeze", ["R", "last"], ["R5"]),
        helper.make_node("Where", ["M", "R5", "zero"], ["W5"]),
        helper.make_node("Reshape", ["W5", "s6t"], ["W6"]),
        helper.make_node("Transpose", ["W6"], ["Wt"], perm=[0, 1, 2, 4, 3, 5]),
        helper.make_node("Reshape", ["Wt", "s4"], ["RX"])], ["X", "R"], {
        "s6": np.array([n, c, h, 2, h, 2]), "s5": np.array([n, c, h, h, 4]), "s6t": np.array([n, c, h, h, 2, 2]),
        "s4": np.array([n, c, 2 * h, 2 * h]), "positions": np.arange(4), "last": np.array([-1]),
        "zero": np.zeros((), np.float32)})
    keyed = _model([
        helper.make_node("MaxPool", ["X"], ["Y"], **pool),  # the forward's output in the compiled model
        helper.make_node("Resize", ["Y", "", "scales"], ["U"], mode="nearest"),
        helper.make_node("Equal", ["X", "U"], ["E"]),
        helper.make_node("Where", ["E", "key", "zero"], ["K"]),  # first position in a window has the highest key
        helper.make_node("MaxPool", ["K"], ["Km"], **pool),
        helper.make_node("Resize", ["Km", "", "scales"], ["Ku"], mode="nearest"),
        helper.make_node("Equal", ["K", "Ku"], ["Win"]),
        helper.make_node("Resize", ["R", "", "scales"], ["Ru"], mode="nearest"),
        helper.make_node("Where", ["Win", "Ru", "zero"], ["RX"])], ["X", "R"], {
        "scales": np.array([1, 1, 2, 2], np.float32), "zero": np.zeros((), np.float32),
        "key": np.tile(np.array([[4, 3], [2, 1]], np.float32), (h, h))[None, None]})
    print(f"max-pool winners, {channels} channels, {size}x{size}, batch {batch}:")
    compare({"MaxPool Indices + MaxUnpool": emitted, "ArgMax over the window": argmax,
             "Equal/Resize + position key": keyed}, feeds)
    indices_only = _session(_model([helper.make_node("MaxPool", ["X"], ["Y", "I"], **pool),
                                    helper.make_node("Identity", ["Y"], ["Y1"])], ["X"], {}))
    plain = _session(_model([helper.make_node("MaxPool", ["X"], ["Y"], **pool)], ["X"], {}))
    times = best_of_rounds({"indices": lambda: indices_only.run(None, {"X": x}),
                            "plain": lambda: plain.run(None, {"X": x})}, 5, 3)
    print(f"  (of which MaxPool with Indices {times['indices'] * 1e3:.2f} ms; the forward's plain MaxPool, "
          f"NCHWc: {times['plain'] * 1e3:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__} CPU provider, 2 threads, onnx {onnx.__version__}")
    for batch in (int(b) for b in args.batches.split(",")):
        for c_out, c_in, size, kernel in [(128, 128, 28, 3), (256, 256, 14, 3), (512, 512, 7, 3),
                                          (512, 256, 28, 1), (1024, 512, 14, 1), (2048, 1024, 7, 1)]:
            transposed_stride2(batch, c_out, c_in, size, kernel, rng)
        for channels, size in [(64, 224), (128, 112), (512, 28)]:
            maxpool_winners(batch, channels, size, rng)


if __name__ == "__main__":
    main()
