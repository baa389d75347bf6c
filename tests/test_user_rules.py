"""Your own composites (--composite FILE.toml with per-node overrides) and rules (--rules DIR): the worked example
in docs/examples, checked against the built-in composites and numpy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from click.testing import CliRunner
from onnxlrp.cli import main
from onnxlrp.compile import make_plan

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_lrn.onnx"
EXAMPLES = ROOT / "docs" / "examples"
MY_RULES = EXAMPLES / "my_rules"


def _x() -> np.ndarray:
    return onnxlrp.load_inputs([ROOT / "models" / "samples" / f"digit_{d}.png" for d in (2, 7)], MODEL)[0]


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_override_everything_equals_the_builtin_with_that_parameter(tmp_path):
    composite = _write(tmp_path, """
[eps]
conv = "epsilon"
dense = "epsilon"
[[eps.override]]
glob = "*"
epsilon = 0.25
""")
    x = _x()
    _, mine = onnxlrp.Explainer(MODEL, composite=composite).explain(x)
    _, builtin = onnxlrp.Explainer(MODEL, composite="epsilon", epsilon=0.25).explain(x)
    _, other = onnxlrp.Explainer(MODEL, composite="epsilon").explain(x)
    np.testing.assert_allclose(mine, builtin, rtol=1e-5, atol=1e-6)
    assert np.abs(mine - other).max() > 1e-3  # epsilon = 0.25 really was used


def test_depth_override_and_inspect_says_why(tmp_path):
    composite = _write(tmp_path, """
[layered]
first_layer = ["conv"]
first = "flat"
conv = "zplus"
dense = "epsilon"
[[layered.override]]
first = 2
category = "conv"
rule = "gamma"
gamma = 0.5
""")
    plan = make_plan(MODEL, composite)
    convs = [r for r in plan.records if r.op == "Conv"]
    assert [r.rule for r in convs] == ["gamma", "gamma", "zplus"]  # the override wins over the first-layer rule
    assert convs[0].params["gamma"] == 0.5 and convs[2].why == "category conv"
    assert "override 1 (first 2 conv): rule=gamma, gamma=0.5" in convs[1].why
    shown = CliRunner().invoke(main, ["inspect", str(MODEL), "--composite", composite])
    assert shown.exit_code == 0 and "why" in shown.stdout and "override 1 (first 2 conv)" in shown.stdout
    # numerically: an override giving all three convs gamma 0.5 equals the same table with --gamma 0.5
    all3 = _write(tmp_path, '[g]\nconv = "gamma"\ndense = "epsilon"\n[[g.override]]\nfirst = 3\ncategory = "conv"\n'
                            'gamma = 0.5\n', "all3.toml")
    x = _x()
    _, by_override = onnxlrp.Explainer(MODEL, composite=all3).explain(x)
    _, plain = onnxlrp.Explainer(MODEL, composite=_write(tmp_path, '[g]\nconv = "gamma"\ndense = "epsilon"\n',
                                                         "plain.toml"), gamma=0.5).explain(x)
    np.testing.assert_allclose(by_override, plain, rtol=1e-5, atol=1e-6)
    _, quarter = onnxlrp.Explainer(MODEL, composite=str(tmp_path / "plain.toml")).explain(x)
    assert np.abs(by_override - quarter).max() > 1e-4  # gamma 0.5 differs from the default 0.25


def test_composite_file_content_is_in_the_metadata(tmp_path):
    text = '[mine]\nconv = "zplus"\ndense = "epsilon"\n'
    compiled = onnxlrp.compile_model(MODEL, _write(tmp_path, text))
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.composite_file"] == text and meta["onnxlrp.composite"] == "mine"
    # and it equals the built-in epsilon_plus (same table)
    x = _x()
    explainer = onnxlrp.Explainer.from_compiled(compiled)
    _, mine = explainer.explain(x)
    _, builtin = onnxlrp.Explainer(MODEL, composite="epsilon_plus").explain(x)
    np.testing.assert_allclose(mine, builtin, rtol=1e-6, atol=1e-7)


def test_several_composites_in_one_file_need_a_name(tmp_path):
    path = _write(tmp_path, '[a]\nconv = "zplus"\ndense = "epsilon"\n[b]\nconv = "epsilon"\ndense = "epsilon"\n')
    with pytest.raises(onnxlrp.OnnxlrpError, match="holds 2 composites"):
        onnxlrp.compile_model(MODEL, path)
    meta = {p.key: p.value for p in onnxlrp.compile_model(MODEL, f"{path}:b").metadata_props}
    assert meta["onnxlrp.composite"] == "b"


@pytest.mark.parametrize("text, message", [
    ("[a\n", "not a valid TOML"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nglob = "*"\nregex = "x"\nepsilon = 1.0\n', "exactly one of"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nglob = "*"\nepsilonn = 1.0\n', "unknown key(s) epsilonn"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nregex = "("\nepsilon = 1.0\n', "bad regex"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nfirst = 0\ncategory = "conv"\ngamma = 1.0\n', "positive integer"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nfirst = 2\ngamma = 1.0\n', "needs a category"),
    ('[a]\nconv = "zplus"\n[[a.override]]\nglob = "*"\n', "neither a rule nor a parameter"),
    ('[a]\nconv = "zplus"\ndense = "epsilon"\n[[a.override]]\nglob = "*"\nepsilon = -1.0\n', "epsilon must be >= 0"),
    ('[a]\nconv = "nosuchrule"\ndense = "epsilon"\n', "no template for rule 'nosuchrule'"),
])
def test_bad_composite_files_fail_with_one_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compile", str(MODEL), "--composite", path, "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxlrp: error:") and message in lines[0], lines
    assert not out.exists()


def _abs_model() -> onnx.ModelProto:
    """x [N, 4] -> Gemm -> Abs -> Gemm -> y [N, 3]."""
    rng = np.random.default_rng(5)
    w1, b1 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w2, b2 = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), helper.make_node("Abs", ["h"], ["a"],
                                                                                          name="abs"),
         helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2")], "absnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_rules_dir_adds_an_op_and_a_linear_rule(tmp_path):
    model = _abs_model()
    with pytest.raises(onnxlrp.UnsupportedError, match="Abs"):
        onnxlrp.compile_model(model, "epsilon")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    w1, b1, w2, b2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    h = x @ w1 + b1
    a = np.abs(h)
    y = a @ w2 + b2
    target = y.argmax(1)
    one_hot = np.eye(3)[target]
    # the gradient composite: input x gradient, with Abs's gradient sign(h) from the user template
    _, gxi = onnxlrp.Explainer(model, composite="gradient", rules=[MY_RULES]).explain(x)
    np.testing.assert_allclose(gxi, x * ((one_hot @ w2.T) * np.sign(h) @ w1.T), rtol=1e-4, atol=1e-5)
    # the user linear rule epsilon_nobias on every dense layer, Abs passing relevance: numpy
    composite = _write(tmp_path, '[nobias]\ndense = "epsilon_nobias"\n')
    explainer = onnxlrp.Explainer(model, composite=composite, rules=[MY_RULES], epsilon=0.0)
    _, relevance = explainer.explain(x)

    def stab(z, eps=0.0):
        return z + eps * np.where(z >= 0, 1.0, -1.0)
    r_y = y * one_hot
    r_a = a * ((r_y / stab(a @ w2)) @ w2.T)
    expected = x * ((r_a / stab(x @ w1)) @ w1.T)
    np.testing.assert_allclose(relevance, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(relevance.sum(1), (y * one_hot).sum(1), rtol=1e-3)  # no bias absorbs: conserves
    meta = {p.key: p.value for p in explainer.compiled.metadata_props}
    recorded = json.loads(meta["onnxlrp.user_rules"])
    assert any(k.endswith("abs_gradient.onnxtxt") for k in recorded)
    onnx.checker.check_model(explainer.compiled, full_check=True)


@pytest.mark.parametrize("case", ["not_a_dir", "bad_template", "clash", "no_category", "binder", "variant"])
def test_bad_rules_dirs(tmp_path, case):
    folder = tmp_path / "rules"
    folder.mkdir()
    if case == "not_a_dir":
        folder = tmp_path / "missing"
        message = "must be a folder"
    elif case == "bad_template":
        (folder / "x.onnxtxt").write_text("this is not onnx")
        message = "cannot parse the template"
    elif case == "clash":
        (folder / "pass.onnxtxt").write_text('<domain: "onnxlrp", opset_import: ["" : 18]>\npass (X, R) => (R_X) {\n'
                                             '   R_X = Identity(R)\n}\n')
        message = "already exists"
    elif case == "no_category":
        (folder / "ops.toml").write_text('[Abs]\npass = "pass"\n')
        message = "needs a category"
    else:  # a binder or variant chooser the compiler does not have
        (folder / "ops.toml").write_text(f'[Abs]\ncategory = "activation"\n{case} = "nope"\n')
        message = rf"\[Abs\] {case} = 'nope' is not one of the compiler's \(.*conv"
    with pytest.raises(onnxlrp.OnnxlrpError, match=message):
        onnxlrp.compile_model(_abs_model(), "epsilon", rules=[folder])


def test_explain_recompiles_when_the_composite_file_changes(tmp_path):
    path = Path(_write(tmp_path, '[c]\nconv = "zplus"\ndense = "epsilon"\n'))
    env = {"ONNXLRP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["explain", str(MODEL), str(ROOT / "models" / "samples" / "digit_1.png"), "--composite", str(path)]
    first = CliRunner().invoke(main, args + ["-o", str(tmp_path / "a")], env=env)
    again = CliRunner().invoke(main, args + ["-o", str(tmp_path / "b")], env=env)
    path.write_text('[c]\nconv = "epsilon"\ndense = "epsilon"\n')
    edited = CliRunner().invoke(main, args + ["-o", str(tmp_path / "c")], env=env)
    assert first.exit_code == again.exit_code == edited.exit_code == 0, edited.stderr
    assert "compiled" in first.stderr and "using cached" in again.stderr and "compiled" in edited.stderr
    assert not np.allclose(np.load(tmp_path / "a" / "digit_1.npy"), np.load(tmp_path / "c" / "digit_1.npy"))
