"""Writing files: atomically (a temporary file beside the target, then a rename, so a failure never leaves a
partial file), with the permissions the umask gives (0644 under the usual umask 022), never over an input."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import OnnxlrpError
from .weights import serialized_size

#: Serialised models larger than this are saved with their weights in ``<output>.data`` beside the output:
#: protobuf cannot write a message over 2 GiB. (A module constant so that tests can lower it.)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
#: Tensors at least this large go to the external data file when it is used.
EXTERNAL_TENSOR_MIN = 1024


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (or would: compared resolved when either does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)).resolve() == Path(os.path.abspath(b)).resolve()


def refuse_overwrite(output: Path, protected: Iterable[Path], what: str = "output") -> None:
    """One-line error when ``output`` is one of the user's input files (the model, its external data, an
    input)."""
    for path in protected:
        if same_file(output, path):
            raise OnnxlrpError(f"{output}: the {what} would overwrite the input {path}; choose another path")


def check_output(path: Path, protected: Iterable[Path] = ()) -> None:
    """The checks of write_model_atomically that need no model, to fail before a long compile."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxlrpError(f"{path}: output folder {directory} does not exist")
    if path.is_dir():
        raise OnnxlrpError(f"{path}: is a folder; give a file name for the compiled model")
    protected = list(protected)
    refuse_overwrite(path, protected)
    refuse_overwrite(path.with_name(path.name + ".data"), protected, "external data of the output")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _temporary_beside(path: Path):
    """A new file ``.<name>.<random>.tmp`` beside ``path``, created with mode 0666 & ~umask; removed on failure."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield tmp, handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_figure(fig, path: Path, kind: str = "plot") -> None:
    """Write a matplotlib figure to a .png/.pdf/.svg file (type from the suffix, png when none), atomically, and
    close it; a type matplotlib cannot write is an OnnxlrpError naming the file."""
    import matplotlib.pyplot as plt
    try:
        fmt = Path(path).suffix[1:].lower() or "png"
        if fmt not in fig.canvas.get_supported_filetypes():
            raise OnnxlrpError(f"{path}: cannot write a {kind} of type {fmt!r} (use .png, .pdf or .svg)")
        write_file_atomically(Path(path), lambda handle: fig.savefig(handle, format=fmt, bbox_inches="tight"))
    finally:
        plt.close(fig)


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``."""
    try:
        with _temporary_beside(path) as (tmp, handle):
            write(handle)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_model_atomically(model: onnx.ModelProto, path: Path, protected: Iterable[Path] = ()) -> list[Path]:
    """Write ``model`` to ``path`` atomically; models over EXTERNAL_DATA_THRESHOLD keep their weights in
    ``<path>.data`` beside it. ``protected``: files that must not be overwritten (the model's own files).
    Returns the files written."""
    path = Path(path)
    check_output(path, protected)
    if serialized_size(model) <= EXTERNAL_DATA_THRESHOLD:  # = ByteSize(), without encoding the weights
        write_file_atomically(path, lambda handle: handle.write(model.SerializeToString()))
        return [path]
    data = path.with_name(path.name + ".data")
    _write_with_external_data(model, path, data)
    return [path, data]


def _write_with_external_data(model: onnx.ModelProto, path: Path, data: Path) -> None:
    """Save into a temporary folder beside ``path`` (model + data file), then move the data, then the model."""
    try:
        staging = Path(os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmpdir"))
        staging.mkdir(mode=0o777)
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save empties the weights of the model it is given
        onnx.save(copy, str(staging / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=EXTERNAL_TENSOR_MIN)
        del copy
        mode = 0o666 & ~_umask()
        for name in (data.name, path.name):
            os.chmod(staging / name, mode)
        os.replace(staging / data.name, data)
        os.replace(staging / path.name, path)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        raise OnnxlrpError(f"{path}: cannot write the compiled model ({why})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
