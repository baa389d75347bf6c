"""Stage 4: run a compiled model with ONNX Runtime, on CUDA when it is usable and on the CPU otherwise."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from functools import cache

import numpy as np
import onnx

from . import save
from .errors import OnnxlrpError
from .weights import serialized_size

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        from .ort_install import missing_message
        raise OnnxlrpError(missing_message()) from None
    return onnxruntime


@contextlib.contextmanager
def _silenced():
    """Send everything written to stdout and stderr meanwhile to /dev/null, at the file-descriptor level too:
    onnxruntime's CUDA loader prints "Failed to load libcublas..." with Python's print (stdout) and its provider
    bridge writes from C++; stdout must carry results only."""
    streams = [s for s in (sys.stdout, sys.stderr) if s is not None]
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        devnull = None
    try:
        if devnull is not None:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(devnull, fd)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull is not None:
            os.close(devnull)


@cache
def cuda_usable() -> bool:
    """Whether ORT can really run on CUDA here (drivers and libraries present), probed once without a word on
    stdout or stderr."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return False
    with _silenced():
        return _probe_cuda(ort)


def _probe_cuda(ort) -> bool:
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls(directory="")
        except Exception:
            pass
    probe = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2
    try:
        ort.set_default_logger_severity(4)
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
        return CUDA in session.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(previous)


def default_providers() -> list[str]:
    """CUDA then CPU where CUDA works, else CPU; ONNXLRP_PROVIDER=cpu forces the CPU."""
    if os.environ.get("ONNXLRP_PROVIDER", "").lower() == "cpu":
        return [CPU]
    return [CUDA, CPU] if cuda_usable() else [CPU]


def make_session(model: onnx.ModelProto, providers: list[str] | None = None, threads: int | None = None):
    """An ORT InferenceSession for an in-memory model (``threads``: intra-op threads, default ORT's choice).

    ORT's memory pattern is off: explaining models keep the forward's activations for the relevance pass, and with
    the pattern the second run allocates one block of the planned peak on top of what the first run left in the
    arena (ResNet-50, batch 8: 2.0 GB of growth instead of 1.1 GB), at no measured cost in time
    (benchmarks/bench_explain.py)."""
    ort = _ort()
    providers = providers or default_providers()
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 4  # errors reach the caller as one-line OnnxlrpErrors, not as ORT log lines
    try:
        if serialized_size(model) > save.EXTERNAL_DATA_THRESHOLD:  # too large for one protobuf message
            return _session_from_folder(ort, model, options, providers)
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:
        raise OnnxlrpError(f"onnxruntime cannot load the compiled model: {str(exc).strip().splitlines()[0]}") from None


def _session_from_folder(ort, model: onnx.ModelProto, options, providers: list[str]):
    """A session for a model over 2 GiB: saved with external data in a temporary folder, loaded from there."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory(prefix="onnxlrp-session-") as folder:
        path = Path(folder) / "model.onnx"
        save.write_model_atomically(model, path)
        return ort.InferenceSession(str(path), options, providers=providers)


class Explainer:
    """Compile a model once and explain batches with it.

    >>> explainer = Explainer("model.onnx", composite="epsilon_plus_flat")
    >>> outputs, relevance = explainer.explain(x)            # top class per sample
    >>> outputs, relevance = explainer.explain(x, target=3)  # class 3 for every sample
    """

    def __init__(self, model, composite: str | None = None, providers: list[str] | None = None,
                 **options) -> None:
        from .compile import compile_model
        self._setup(compile_model(model, composite, **options), providers)

    @classmethod
    def from_compiled(cls, compiled: onnx.ModelProto, providers: list[str] | None = None,
                      threads: int | None = None) -> Explainer:
        """An Explainer for a model that onnxlrp compiled earlier (e.g. loaded from a cache)."""
        explainer = cls.__new__(cls)
        explainer._setup(compiled, providers, threads)
        return explainer

    def _setup(self, compiled: onnx.ModelProto, providers: list[str] | None, threads: int | None = None) -> None:
        from .interface import Interface
        self.compiled = compiled
        self.session = make_session(self.compiled, providers, threads)
        interface = Interface.of(compiled)  # names in the metadata (target_1 where the model has a target)
        self._target = interface.target_input
        target = next((i for i in compiled.graph.input if i.name == self._target), None)
        self.uses_mask = target is not None and target.type.tensor_type.elem_type != onnx.TensorProto.INT64
        defaults = {t.name for t in compiled.graph.initializer}  # e.g. a DeepLIFT baseline with a default
        inputs = [i for i in self.session.get_inputs() if i.name != self._target and i.name not in defaults]
        self.input_names = [i.name for i in inputs]
        outputs = [o.name for o in self.session.get_outputs()]
        self._relevance_of = {out: name for name, out in interface.relevance_outputs.items()
                              if name in self.input_names and out in outputs}
        meta = {p.key: p.value for p in compiled.metadata_props}
        for entry in json.loads(meta.get("onnxlrp.relevance_at", "[]")):  # --relevance-at tensors
            if entry["output"] in outputs:
                self._relevance_of[entry["output"]] = entry["tensor"]
        self.relevance_names = [o for o in outputs if o in self._relevance_of]
        self.output_names = [o for o in outputs if o not in self.relevance_names]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def explain(self, x, target=None, target_mask=None) -> tuple[dict[str, np.ndarray],
                                                                 np.ndarray | dict[str, np.ndarray]]:
        """Run the compiled model.

        x: one array (single-input models) or a dict name -> array. target: None (top class), an int for every
        sample, or one int per sample (negative = top class). target_mask: for models compiled with
        ``target_mask=True`` (then required, and target must be None): a float array shaped like (or
        broadcastable to) the explained output; start relevance = output * mask.
        Returns (original outputs by name, relevance): relevance is an array shaped like x when the model has one
        relevance output, else a dict name -> relevance (input names, and the tensors given to relevance_at).
        """
        feeds = dict(x) if isinstance(x, dict) else {self.input_names[0]: x}
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise OnnxlrpError(f"missing model input(s): {', '.join(sorted(missing))}")
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        if any(v.ndim == 0 or v.shape[0] == 0 for v in feeds.values()):
            raise OnnxlrpError("empty batch: every input needs a batch axis with at least one sample")
        if self.uses_mask:
            if target_mask is None or target is not None:
                raise OnnxlrpError("this model was compiled with a target mask: pass target_mask (and no target)")
            mask = next(i for i in self.compiled.graph.input if i.name == self._target)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(mask.type.tensor_type.elem_type)
            feeds[self._target] = np.asarray(target_mask, dtype=dtype)
        elif target_mask is not None:
            raise OnnxlrpError("target_mask needs a model compiled with target_mask=True (--target-mask)")
        else:
            feeds[self._target] = self._targets(target, batch)
        names = self.output_names + self.relevance_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:
            raise OnnxlrpError(_run_failure(str(exc))) from None
        outputs = dict(zip(self.output_names, values[: len(self.output_names)]))
        relevance = dict(zip(self.relevance_names, values[len(self.output_names):]))
        if len(relevance) == 1:
            return outputs, next(iter(relevance.values()))
        return outputs, {self._relevance_of[k]: v for k, v in relevance.items()}

    def _targets(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full([batch], -1, dtype=np.int64)
        arr = _integer_targets(target)
        if arr.size == 1:
            arr = np.full([batch], int(arr[0]), dtype=np.int64)
        if arr.size != batch:
            raise OnnxlrpError(f"target has {arr.size} entries for a batch of {batch}")
        classes = self.classes
        if classes is not None and (arr >= classes).any():
            raise OnnxlrpError(f"target {int(arr.max())} out of range: the model has {classes} classes (0.."
                               f"{classes - 1})")
        return arr

    @property
    def explained_output(self) -> str:
        """The output whose class is explained."""
        meta = {p.key: p.value for p in self.compiled.metadata_props}
        return meta.get("onnxlrp.explained_output", self.output_names[0])

    @property
    def classes(self) -> int | None:
        """Number of classes of the explained output, when static."""
        out = next(o for o in self.session.get_outputs() if o.name == self.explained_output)
        dims = out.shape[1:]
        if dims and all(isinstance(d, int) for d in dims):
            return int(np.prod(dims))
        return None


def _integer_targets(target) -> np.ndarray:
    """Targets as int64 class indices; OnnxlrpError for anything that is not a whole number (2.7 is not class 2)."""
    arr = np.asarray(target)
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise OnnxlrpError(f"target must be an integer class index (negative: the top class), got {target!r}")
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        bad = arr.reshape(-1)[~(np.isfinite(arr) & (arr == np.round(arr))).reshape(-1)][0]
        raise OnnxlrpError(f"target must be an integer class index (negative: the top class), got {bad:g}")
    return arr.astype(np.int64).reshape(-1)


_TARGET_CHECK = re.compile(r"target_out_of_range.*Input shape:\{(\d+)\}, requested shape:\{(\d+)\}", re.S)


def _run_failure(message: str) -> str:
    """One line for a failed run; the compiled graph's target check (see rules/common/class_mask) reads as
    'target T out of range: the model has K classes'."""
    check = _TARGET_CHECK.search(message)
    if check:
        classes, needed = int(check.group(1)), int(check.group(2))
        return f"target {needed - 1} out of range: the model has {classes} classes (0..{classes - 1})"
    return f"onnxruntime failed to run the compiled model: {message.strip().splitlines()[0]}"
