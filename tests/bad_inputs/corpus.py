"""Bad and awkward files for the CLI, built on the fly (issue 11): models (damaged, special files, external data
that is missing, outside the model's folder, too short, or changed), inputs for `explain` (decompression bombs,
.npz renamed .npy, structured/string/pickled arrays, FIFOs), and the helpers that prove a run changed nothing."""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = ROOT / "models" / "samples"
RESULT_LINE = r"^\S.*: predicted \S+ .*, explained \S+.*, sum \S+$"


# --- running the command -----------------------------------------------------------------------------------------

@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def cli(*args, cache: Path | None = None) -> Run:
    """The `onnxlrp` command in this process (click's runner). An exception that escapes the command would be a
    traceback for the user: it is appended to stderr as one, so the checks below catch it."""
    from onnxlrp.cli import main
    env = {"ONNXLRP_CACHE_DIR": str(cache)} if cache is not None else None
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return Run(result.exit_code, result.stdout, stderr)


class Hang(Exception):
    pass


def cli_within(seconds: int, *args, cache: Path | None = None) -> Run:
    """cli(), interrupted after ``seconds`` (SIGALRM breaks a blocking open() of a FIFO): a hang fails the test
    as a traceback instead of hanging the suite."""
    import signal

    def interrupt(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        return cli(*args, cache=cache)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def error_lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("onnxlrp: error: ")]


def assert_refused(run: Run, *fragments: str, code: int = 2) -> str:
    """Exactly one line on stderr, ``onnxlrp: error: ...`` holding every fragment; the exit code; no traceback.
    Returns the line."""
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == code, (run.returncode, run.stderr)
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("onnxlrp: using cached")
             and not line.startswith("onnxlrp: compiled ")]
    assert len(lines) == 1 and lines[0].startswith("onnxlrp: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """Content hash of every regular file under ``folder`` (special files are listed, never opened): equal before
    and after a run means no file was changed, added or removed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink() or not path.exists():
            found[key] = "link"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not path.is_dir():
            found[key] = "special"
    return found


# --- models --------------------------------------------------------------------------------------------------------

def tiny_model(batch: int | str = "N", classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Conv 1->2 (3x3, pad 1) -> Relu -> MaxPool 2 -> Flatten -> Gemm -> logits, input x [batch, 1, 8, 8]."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
               "b": rng.standard_normal(2).astype(np.float32) * 0.1,
               "fw": rng.standard_normal((classes, 32)).astype(np.float32),
               "fb": rng.standard_normal(classes).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def save_tiny(path: Path, **kwargs) -> Path:
    onnx.save(tiny_model(**kwargs), str(path))
    return path


def save_external(path: Path, location: str | None = None, model: onnx.ModelProto | None = None) -> Path:
    """The tiny model with every weight in one external data file (default ``<name>.data``)."""
    model = model or tiny_model()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location or f"{path.name}.data", size_threshold=0)
    return path


def point_external_data(path: Path, tensor: str, location: str, **entries) -> Path:
    """Rewrite the external-data entry of ``tensor`` in the model at ``path`` (location, offset, length)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == tensor:
            del t.external_data[:]
            t.external_data.add(key="location", value=location)
            for key, value in entries.items():
                t.external_data.add(key=key, value=str(value))
    onnx.save(model, str(path))
    return path


def save_mismatched(path: Path) -> Path:
    """The tiny model whose Gemm weight says [3, 32] but holds 3 x 31 values."""
    model = tiny_model()
    fw = next(t for t in model.graph.initializer if t.name == "fw")
    fw.raw_data = fw.raw_data[: 3 * 31 * 4]
    onnx.save(model, str(path))
    return path


def save_compiled(path: Path) -> Path:
    from onnxlrp.compile import compile_model
    onnx.save(compile_model(tiny_model(), "epsilon"), str(path))
    return path


# --- inputs for explain --------------------------------------------------------------------------------------------

def save_png(path: Path, size: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path, format="PNG")
    return path


def save_bomb_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A 100-byte PNG that claims 2.5 gigapixels (Pillow refuses it as a decompression bomb before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def save_npz_as_npy(path: Path) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, x=np.zeros((1, 32, 32), np.float32))
    return path


def save_structured_npy(path: Path) -> Path:
    np.save(path, np.zeros((1, 32, 32), dtype=[("a", np.float32), ("b", np.int8)]))
    return path


def save_string_npy(path: Path) -> Path:
    np.save(path, np.full((1, 32, 32), "0.5", dtype="<U3"))
    return path


def save_pickled_npy(path: Path, marker: Path) -> Path:
    """An object array whose unpickling would create ``marker``: proof that nothing is unpickled."""
    class Creates:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    array = np.empty((1,), dtype=object)
    array[0] = Creates()
    np.save(path, array, allow_pickle=True)
    return path


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
