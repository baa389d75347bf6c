"""`onnxlrp export-triton`: the config.pbtxt parses with Triton's own ModelConfig schema, and its names, data types
and dims agree with the compiled model (dynamic batch: batched dims and dynamic batching; fixed batch: full
dims, max_batch_size 0); a request shaped as Triton would send it runs on the model."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.triton import TRITON_TYPES

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
NP_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}


@functools.cache
def model_config_class():
    """Triton's ModelConfig message: from tritonclient when installed, else the vendored copy of its module."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        spec = importlib.util.spec_from_file_location("triton_model_config_pb2",
                                                      ROOT / "tests" / "vendor" / "triton_model_config_pb2.py")
        model_config_pb2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model_config_pb2)
    return model_config_pb2.ModelConfig


def export(tmp_path: Path, model: Path, *args: str):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["export-triton", str(model), str(repo), *args])
    return repo, result


def parse(config: Path):
    return text_format.Parse(config.read_text(), model_config_class()())  # strict: unknown fields fail


def _type_name(entry) -> str:
    """The Triton DataType enum name of a config input/output (e.g. TYPE_FP32)."""
    return entry.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[entry.data_type].name


def _dims(vi) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def _check_against_model(config, model: onnx.ModelProto) -> None:
    batching = config.max_batch_size > 0
    defaults = {t.name for t in model.graph.initializer}
    for kind, values, entries in (("input", [v for v in model.graph.input if v.name not in defaults], config.input),
                                  ("output", model.graph.output, config.output)):
        assert [e.name for e in entries] == [v.name for v in values], kind
        for entry, vi in zip(entries, values):
            assert _type_name(entry) == TRITON_TYPES[vi.type.tensor_type.elem_type]
            dims = _dims(vi)
            if batching:
                assert dims[0] == -1
                if len(dims) == 1:
                    assert list(entry.dims) == [1] and entry.HasField("reshape") and list(entry.reshape.shape) == []
                else:
                    assert list(entry.dims) == dims[1:] and not entry.HasField("reshape")
            else:
                assert list(entry.dims) == dims


def _request(config, batch: int) -> dict[str, np.ndarray]:
    """Inputs shaped as a Triton client sends them: [batch] + dims when batching, else dims."""
    rng = np.random.default_rng(0)
    feeds = {}
    for entry in config.input:
        shape = ([batch] if config.max_batch_size else []) + [d if d > 0 else 1 for d in entry.dims]
        dtype = NP_TYPES[_type_name(entry)]
        feeds[entry.name] = (np.full(shape, -1, dtype) if dtype == np.int64 else
                             rng.uniform(0, 1, shape).astype(dtype))
        if entry.HasField("reshape"):  # what Triton does before calling the model
            lead = [batch] if config.max_batch_size else []
            feeds[entry.name] = feeds[entry.name].reshape(lead + list(entry.reshape.shape))
    return feeds


def test_dynamic_batch_model_repository(tmp_path):
    repo, result = export(tmp_path, MODEL, "--max-batch-size", "8", "--composite", "epsilon_gamma_box")
    assert result.exit_code == 0, result.stderr
    model_path, config_path = repo / "digits_lrn" / "1" / "model.onnx", repo / "digits_lrn" / "config.pbtxt"
    config = parse(config_path)
    assert config.name == "digits_lrn" and config.backend == "onnxruntime" and config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    compiled = onnx.load(str(model_path))
    onnx.checker.check_model(compiled, full_check=True)
    _check_against_model(config, compiled)
    assert [e.name for e in config.input] == ["image", "target"]
    assert [e.name for e in config.output] == ["logits", "image_relevance"]
    # a batch of 3 as Triton would pass it; the relevance equals the Python API's
    feeds = _request(config, 3)
    assert feeds["target"].shape == (3,)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits, relevance = session.run(["logits", "image_relevance"], feeds)
    for entry, value in zip(config.output, (logits, relevance)):
        assert list(value.shape) == [3] + list(entry.dims)
    _, expected = onnxlrp.Explainer(MODEL, composite="epsilon_gamma_box").explain(feeds["image"])
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-7)


def test_fixed_batch_model_gets_full_dims(tmp_path):
    model = onnx.load(str(MODEL))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    repo, refused = export(tmp_path, fixed, "--max-batch-size", "4")
    assert refused.exit_code == 2
    assert "needs a dynamic first dimension" in refused.stderr and "image [1, 1, 32, 32]" in refused.stderr
    assert not repo.exists()
    repo, result = export(tmp_path, fixed, "--name", "digits_fixed")
    assert result.exit_code == 0, result.stderr
    config = parse(repo / "digits_fixed" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    compiled = onnx.load(str(repo / "digits_fixed" / "1" / "model.onnx"))
    _check_against_model(config, compiled)
    assert list(config.input[0].dims) == [1, 1, 32, 32] and list(config.input[1].dims) == [1]
    feeds = _request(config, 1)
    session = ort.InferenceSession(str(repo / "digits_fixed" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    assert [list(o.shape) for o in outputs] == [list(e.dims) for e in config.output]


def test_zero_max_batch_size_on_a_dynamic_model_keeps_the_batch_dim(tmp_path):
    repo, result = export(tmp_path, MODEL, "--max-batch-size", "0", "--emit-layers")
    assert result.exit_code != 0 and "--emit-layers" in result.stderr  # not an export-triton option
    repo, result = export(tmp_path, MODEL, "--max-batch-size", "0")
    assert result.exit_code == 0, result.stderr
    config = parse(repo / "digits_lrn" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 1, 32, 32]
    assert list(config.input[1].dims) == [-1]


@pytest.mark.parametrize("args, message", [(["--name", "a/b"], "--name"), (["--max-batch-size", "-1"],
                                                                           "--max-batch-size")])
def test_bad_export_options(tmp_path, args, message):
    repo, result = export(tmp_path, MODEL, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not repo.exists()


def test_inputs_with_a_default_are_left_to_onnx_runtime(tmp_path):
    """DeepLIFT's <input>_baseline has a default value (an initializer): not in the config, ORT uses it."""
    repo, result = export(tmp_path, MODEL, "--composite", "deeplift", "--name", "dl")
    assert result.exit_code == 0, result.stderr
    config = parse(repo / "dl" / "config.pbtxt")
    compiled = onnx.load(str(repo / "dl" / "1" / "model.onnx"))
    assert "image_baseline" in [i.name for i in compiled.graph.input]
    assert [e.name for e in config.input] == ["image", "target"]
    _check_against_model(config, compiled)
    session = ort.InferenceSession(str(repo / "dl" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, relevance = session.run(["logits", "image_relevance"], _request(config, 2))
    assert relevance.shape == (2, 1, 32, 32) and np.isfinite(relevance).all()
