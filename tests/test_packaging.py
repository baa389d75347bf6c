"""Packaging: ONNX Runtime comes from an explicit extra (gpu / cpu), never from the base dependencies, so that an
installed CPU onnxruntime is not joined by a second build; two builds installed side by side are reported at
import with a one-line fix; none installed is a one-line error. importlib.metadata is mocked: no ONNX Runtime
distribution is installed or removed here."""
from __future__ import annotations

import io
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import onnxlrp
from onnxlrp import ort_install

ROOT = Path(__file__).resolve().parents[1]


def _fake_versions(monkeypatch, installed: set[str]) -> None:
    def version(name: str) -> str:
        if name in installed:
            return "1.31.1"
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(ort_install.metadata, "version", version)
    monkeypatch.setattr(ort_install, "_warned", False)


def test_two_builds_installed_print_one_line_with_the_fix(monkeypatch):
    _fake_versions(monkeypatch, {"onnxruntime", "onnxruntime-gpu", "numpy"})
    assert ort_install.installed_runtimes() == ["onnxruntime", "onnxruntime-gpu"]
    stream = io.StringIO()
    ort_install.warn_if_conflicting(stream)
    ort_install.warn_if_conflicting(stream)  # once per process
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("onnxlrp: warning: onnxruntime and onnxruntime-gpu are all installed")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in lines[0]


@pytest.mark.parametrize("installed", [{"onnxruntime"}, {"onnxruntime-gpu"}, set()])
def test_one_or_no_build_prints_nothing(monkeypatch, installed):
    _fake_versions(monkeypatch, installed)
    stream = io.StringIO()
    ort_install.warn_if_conflicting(stream)
    assert stream.getvalue() == ""


def test_import_runs_the_check(monkeypatch, capsys):
    _fake_versions(monkeypatch, {"onnxruntime", "onnxruntime-directml"})
    import importlib
    importlib.reload(onnxlrp)
    err = capsys.readouterr().err
    assert "onnxruntime and onnxruntime-directml are all installed" in err
    assert capsys.readouterr().out == ""


def test_missing_runtime_is_a_one_line_error(monkeypatch):
    from onnxlrp import runtime
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(onnxlrp.OnnxlrpError, match=r"no ONNX Runtime is installed: pip install 'onnxlrp\[gpu\]'"):
        runtime._ort()


def test_extras_choose_the_runtime():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.18"]
    gpu = extras["gpu"]
    assert any(d.startswith("onnxruntime-gpu") and "platform_machine == 'x86_64'" in d for d in gpu)
    assert any(d.startswith("onnxruntime>=") and "platform_system != 'Linux'" in d for d in gpu)
    assert "onnxlrp[gpu]" in extras["test"]  # the README's install command keeps CUDA on Linux x86-64
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in ('pip install -e ".[test]"', "python -m pytest -q"):
        assert command in ci and command in readme
