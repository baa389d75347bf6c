"""evaluate's newcomer fixes: the channel mean is the default fill, --fill replaces --baseline (still accepted,
with a warning), the rule options reach the composites, and the legend sits beside the curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxlrp.cli import main
from onnxlrp.evaluate import Curves, evaluate, figure

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
SAMPLES = [ROOT / "models" / "samples" / f"digit_{d}.png" for d in (0, 3, 8)]


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """One compiled-model cache for this module (not the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXLRP_CACHE_DIR", str(folder))
        yield folder


def test_default_fill_is_the_channel_mean(tmp_path):
    default, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=4, patch=8)
    mean, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=4, patch=8, fill="mean")
    zero, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=4, patch=8, fill="value")
    for a, b in zip(default, mean):
        np.testing.assert_array_equal(a.aucs, b.aucs)
    assert not np.allclose(default[0].aucs, zero[0].aucs)


def test_rule_options_reach_the_composites():
    small, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=4, patch=8, epsilon=1e-6)
    large, _ = evaluate(MODEL, SAMPLES, ["epsilon"], ["identity"], steps=4, patch=8, epsilon=50.0)
    assert not np.allclose(small[0].aucs, large[0].aucs)


def test_deprecated_baseline_option_still_works(tmp_path, cache):
    env = {"ONNXLRP_CACHE_DIR": str(cache)}
    args = ["evaluate", str(MODEL), *map(str, SAMPLES), "--composite", "epsilon", "--lrn-rule", "identity",
            "--steps", "4", "--patch", "8"]
    old = CliRunner().invoke(main, args + ["--baseline", "blur", "-o", str(tmp_path / "a.png")], env=env)
    new = CliRunner().invoke(main, args + ["--fill", "blur", "-o", str(tmp_path / "b.png")], env=env)
    assert old.exit_code == new.exit_code == 0, old.stderr
    assert "--baseline is deprecated, use --fill" in old.stderr and "deprecated" not in new.stderr
    same = lambda out: [line.rsplit(None, 2)[0] for line in out.splitlines()[:6]]  # noqa: E731 (without ms/input)
    assert same(old.stdout) == same(new.stdout)
    help_text = CliRunner().invoke(main, ["evaluate", "--help"]).stdout
    assert "--fill" in help_text and "--gamma" in help_text and "--baseline" not in help_text


def test_legend_is_beside_the_curves():
    results = [Curves(f"method {k}", [np.linspace(1, 0, 5) ** (k + 1)]) for k in range(6)]
    fig = figure(results, 4)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1
