"""SpRAy (`onnxlrp analyze`): a digits model that learned a watermark shortcut for one class; the class's
watermarked inputs end up in a cluster of their own. Also the command's report and its errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxlrp.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_spray_separates_the_watermarked_inputs(tmp_path):
    pytest.importorskip("torch")
    from spray_watermark import run
    outcome = run(seed=0, klass=3, outdir=tmp_path)
    assert outcome["purity"] >= 0.9 and outcome["recall"] >= 0.9, outcome
    assert (tmp_path / "report" / "index.html").is_file()

    # the same heatmaps through the command: report, clusters.csv with one row per heatmap
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "relevance"), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "eigengap suggests" in result.output
    rows = (tmp_path / "cli" / "clusters.csv").read_text().splitlines()
    assert rows[0] == "id,cluster" and len(rows) == 1 + len(list((tmp_path / "relevance").glob("*.npy")))
    for picture in ("eigenvalues.png", "embedding.png", "clusters.png"):
        assert (tmp_path / "cli" / picture).stat().st_size > 0


def test_prepare_downsamples_sums_channels_and_normalises():
    from onnxlrp.spray import prepare
    r = np.zeros((3, 32, 32))
    r[:, :4, :4] = 1.0
    maps = prepare([r, np.zeros((3, 32, 32))], size=8)
    assert maps.shape == (2, 8, 8)
    assert np.isclose(np.linalg.norm(maps[0]), 1.0) and maps[0, 0, 0] > 0 and maps[0, 1:, 1:].max() == 0
    assert not maps[1].any()  # an all-zero map stays zero (no NaN)


@pytest.mark.parametrize("args, message", [
    (["--class", "3"], "--class needs the explained classes"),
    (["--clusters", "1"], "--clusters"),
])
def test_analyze_errors_are_one_line(tmp_path, args, message):
    for i in range(5):
        np.save(tmp_path / f"r{i}.npy", np.random.default_rng(i).random((1, 8, 8)))
    result = CliRunner().invoke(main, ["analyze", str(tmp_path), "-o", str(tmp_path / "rep"), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "rep").exists()


def test_analyze_needs_enough_heatmaps(tmp_path):
    np.save(tmp_path / "only.npy", np.ones((8, 8)))
    result = CliRunner().invoke(main, ["analyze", str(tmp_path), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 2 and "at least 4 heatmaps" in result.output
