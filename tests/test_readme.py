"""Every code block of README.md (and docs/user_rules.md) runs as printed: the ```python blocks in order, in one
temporary folder that holds the repository's models and docs, and the ```bash blocks whose commands are all
`onnxlrp ...` (install and test commands are not run here; CI runs them). A block preceded by
`<!-- readme-test: skip ... -->` (it needs Docker or a running inference server) is only compiled."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\s*)?```(python|bash)\n(.*?)```", re.S)


DOCUMENTS = ["README.md", "docs/user_rules.md"]


def readme_blocks(document: str = "README.md") -> list[tuple[str, str, bool]]:
    """(language, code, skipped) for every fenced python/bash block, in document order."""
    text = (ROOT / document).read_text()
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in BLOCK.finditer(text)]


def _commands(code: str) -> list[str]:
    """The commands of a bash block (continuation lines joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _runnable_bash(code: str) -> bool:
    return all(c.startswith("onnxlrp ") for c in _commands(code))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "models").symlink_to(ROOT / "models", target_is_directory=True)
    (folder / "docs").symlink_to(ROOT / "docs", target_is_directory=True)
    return folder


def _env(workdir: Path) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "ONNXLRP_CACHE_DIR": str(workdir / "cache"),
            "MPLBACKEND": "Agg"}


def test_readme_has_the_expected_blocks():
    blocks = readme_blocks()
    assert sum(lang == "python" and not skipped for lang, _, skipped in blocks) >= 2
    assert any(lang == "bash" and _runnable_bash(code) for lang, code, _ in blocks)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_block_runs_as_printed(workdir, document):
    """Blocks run in document order, so that a Python block may use what an earlier command wrote."""
    ran = 0
    for index, (lang, code, skipped) in enumerate(readme_blocks(document)):
        where = f"{document} block {index} ({lang}):\n{code}"
        if lang == "python":
            compile(code, f"{document} block {index}", "exec")  # even skipped blocks must at least parse
            if skipped:
                continue
            script = workdir / f"{Path(document).stem}_block_{index}.py"
            script.write_text(code)
            result = subprocess.run([sys.executable, str(script)], cwd=workdir, env=_env(workdir),
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{where}\nstderr:\n{result.stderr}"
            ran += 1
        elif lang == "bash" and not skipped and _runnable_bash(code):
            for command in _commands(code):
                argv = [sys.executable, "-m", "onnxlrp.cli", *shlex.split(command)[1:]]
                result = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True,
                                        timeout=600)
                assert result.returncode == 0, f"{where}\n{command}\nstderr:\n{result.stderr}"
            ran += 1
    assert ran >= (3 if document == "README.md" else 1)
