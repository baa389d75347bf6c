"""Which ONNX Runtime distribution is installed: exactly one should be. Every build (onnxruntime,
onnxruntime-gpu, ...) installs the same `onnxruntime` module, so two of them overwrite each other's files and
the one that wins is an accident of install order. Checked once when onnxlrp is imported."""
from __future__ import annotations

import sys
from importlib import metadata

#: Distributions that provide the `onnxruntime` module (the CPU build first).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-training",
                     "ort-nightly", "ort-nightly-gpu")
INSTALL_HINT = ("pip install 'onnxlrp[gpu]' (CUDA on Linux x86-64, the CPU build elsewhere) or "
                "'onnxlrp[cpu]'")


def installed_runtimes() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def conflict_message(found: list[str]) -> str | None:
    """One line with the fix when several ONNX Runtime distributions are installed, else None."""
    if len(found) < 2:
        return None
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[-1]
    return (f"onnxlrp: warning: {' and '.join(found)} are all installed and overwrite each other's onnxruntime "
            f"module; keep one: pip uninstall -y {' '.join(found)} && pip install {keep} "
            f"(or onnxruntime for the CPU build)")


def missing_message() -> str:
    return f"no ONNX Runtime is installed: {INSTALL_HINT}"


_warned = False


def warn_if_conflicting(stream=None) -> None:
    """Print the one-line fix to stderr (once per process) when several distributions are installed."""
    global _warned
    if _warned:
        return
    message = conflict_message(installed_runtimes())
    if message:
        _warned = True
        print(message, file=stream or sys.stderr)
