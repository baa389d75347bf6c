"""Stage 4: run a compiled model with ONNX Runtime, on CUDA when it is usable and on the CPU otherwise."""
from __future__ import annotations

import os
from functools import cache

import numpy as np
import onnx

from .errors import OnnxlrpError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _ort():
    import onnxruntime
    return onnxruntime


@cache
def cuda_usable() -> bool:
    """Whether ORT can really run on CUDA here (drivers and libraries present), probed once without log noise."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return False
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


def make_session(model: onnx.ModelProto, providers: list[str] | None = None):
    """An ORT InferenceSession for an in-memory model."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers or default_providers())
    except Exception as exc:
        raise OnnxlrpError(f"onnxruntime cannot load the compiled model: {str(exc).strip().splitlines()[0]}") from None


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
    def from_compiled(cls, compiled: onnx.ModelProto, providers: list[str] | None = None) -> Explainer:
        """An Explainer for a model that onnxlrp compiled earlier (e.g. loaded from a cache)."""
        explainer = cls.__new__(cls)
        explainer._setup(compiled, providers)
        return explainer

    def _setup(self, compiled: onnx.ModelProto, providers: list[str] | None) -> None:
        from .compile import RELEVANCE_SUFFIX, TARGET_INPUT, TARGET_MASK_INPUT
        self.compiled = compiled
        self.session = make_session(self.compiled, providers)
        self._target = TARGET_INPUT
        self.uses_mask = any(i.name == TARGET_MASK_INPUT for i in compiled.graph.input)
        defaults = {t.name for t in compiled.graph.initializer}  # e.g. a DeepLIFT baseline with a default
        inputs = [i for i in self.session.get_inputs()
                  if i.name not in (TARGET_INPUT, TARGET_MASK_INPUT) and i.name not in defaults]
        self.input_names = [i.name for i in inputs]
        outputs = [o.name for o in self.session.get_outputs()]
        self.relevance_names = [o for o in outputs if o.endswith(RELEVANCE_SUFFIX)
                                and o[: -len(RELEVANCE_SUFFIX)] in self.input_names]
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
        Returns (original outputs by name, relevance): relevance is an array shaped like x for single-input models,
        else a dict input name -> relevance.
        """
        feeds = dict(x) if isinstance(x, dict) else {self.input_names[0]: x}
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise OnnxlrpError(f"missing model input(s): {', '.join(sorted(missing))}")
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        if self.uses_mask:
            if target_mask is None or target is not None:
                raise OnnxlrpError("this model was compiled with a target mask: pass target_mask (and no target)")
            mask = next(i for i in self.compiled.graph.input if i.name == "target_mask")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(mask.type.tensor_type.elem_type)
            feeds["target_mask"] = np.asarray(target_mask, dtype=dtype)
        elif target_mask is not None:
            raise OnnxlrpError("target_mask needs a model compiled with target_mask=True (--target-mask)")
        else:
            feeds[self._target] = self._targets(target, batch)
        names = self.output_names + self.relevance_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:
            raise OnnxlrpError(f"onnxruntime failed to run the compiled model: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        outputs = dict(zip(self.output_names, values[: len(self.output_names)]))
        relevance = dict(zip(self.relevance_names, values[len(self.output_names):]))
        if len(relevance) == 1:
            return outputs, next(iter(relevance.values()))
        return outputs, {k[: -len("_relevance")]: v for k, v in relevance.items()}

    def _targets(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full([batch], -1, dtype=np.int64)
        arr = np.asarray(target, dtype=np.int64).reshape(-1)
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
