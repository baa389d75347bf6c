"""Shared fixtures: exported models are made once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("ONNXLRP_PROVIDER", "cpu")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, exporter) -> path of the ONNX export of tests/torch_models.py's model `name`."""
    from torch_models import build, export, sample_input
    folder = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(name: str, exporter: str):
        key = (name, exporter)
        if key not in cache:
            cache[key] = export(build(name), sample_input(name), folder / f"{name}_{exporter}.onnx", exporter)
        return cache[key]

    return get
