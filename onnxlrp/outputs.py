"""Where `onnxlrp explain` writes, so that no input is ever overwritten and a failed run leaves nothing behind.

- The output folder may not be a folder an input is read from (a heatmap ``x.png`` would replace the input
  ``x.png``, a relevance ``x.npy`` the input ``x.npy``); a folder inside it is fine (folders are not searched
  recursively).
- Output names: the input's name without its suffix (``x.png`` -> ``x``); when two inputs share it, the later ones
  keep their suffix (``x.jpg`` -> ``x.jpg``), and names that still clash get ``.1``, ``.2``, ... in input order
  (``a/x.png``, ``b/x.png``, ``c/x.png`` -> ``x``, ``x.png``, ``x.1``).
- Every file is written atomically with the umask's permissions; folders the run created are removed again when
  it writes nothing or fails, and on a failure the files it wrote are removed too.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .errors import OnnxlrpError
from .save import same_file, write_file_atomically


def output_stems(files: list[Path]) -> dict[Path, str]:
    """One distinct output stem per input file, in input order (see the module docstring)."""
    stems: dict[Path, str] = {}
    taken: set[str] = set()
    for path in files:
        stem, k = path.stem, 0
        if stem in taken:
            stem = path.name
        while stem in taken:
            k += 1
            stem = f"{path.stem}.{k}"
        taken.add(stem)
        stems[path] = stem
    return stems


class OutputFolder:
    """The output folder of one `explain` run: checked and created by ``open``, written through ``save_*``,
    tidied by ``close``."""

    def __init__(self, outdir: Path, files: list[Path]) -> None:
        self.outdir = Path(outdir)
        self.files = files
        self.created: list[Path] = []
        self.written: list[Path] = []
        self._names: set[str] = set()

    def open(self) -> OutputFolder:
        """Refuse a folder that holds inputs or is a file; create it (and missing parents); check it is writable."""
        for folder in {p.parent for p in self.files}:
            if same_file(self.outdir, folder if str(folder) else Path(".")):
                raise OnnxlrpError(f"{self.outdir}: the output folder is where input {self._input_in(folder)} is "
                                   f"read from; its heatmaps and .npy files could overwrite inputs: choose another -o")
        if self.outdir.exists() and not self.outdir.is_dir():
            raise OnnxlrpError(f"{self.outdir}: output folder is a file, not a folder")
        missing = []
        for folder in [self.outdir, *self.outdir.parents]:
            if folder.exists() or folder.is_symlink():
                break
            missing.append(folder)
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self.created.append(folder)
            probe = self.outdir / f".onnxlrp-write-test.{os.getpid()}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as exc:
            self.close(failed=True)
            why = exc.strerror or str(exc)
            raise OnnxlrpError(f"{self.outdir}: output folder is not writable ({why})") from None
        return self

    def _input_in(self, folder: Path) -> Path:
        return next(p for p in self.files if p.parent == folder)

    def claim(self, name: str) -> Path:
        """``outdir/name``, made distinct from every file this run has written (``x.png`` -> ``x.1.png``)."""
        stem, suffix = os.path.splitext(name)
        candidate, k = name, 0
        while candidate in self._names:
            k += 1
            candidate = f"{stem}.{k}{suffix}"
        self._names.add(candidate)
        return self.outdir / candidate

    def save_npy(self, path: Path, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        self._write(path, buffer.getvalue())

    def save_png(self, path: Path, image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self._write(path, buffer.getvalue())

    def _write(self, path: Path, content: bytes) -> None:
        write_file_atomically(path, lambda handle: handle.write(content))
        self.written.append(path)

    def close(self, failed: bool = False) -> None:
        """On failure remove the files this run wrote; then remove the folders it created if they are empty."""
        if failed:
            for path in self.written:
                path.unlink(missing_ok=True)
            self.written.clear()
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                break
        self.created = [f for f in self.created if f.exists()]
