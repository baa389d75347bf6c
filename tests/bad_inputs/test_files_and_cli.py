"""Bad and awkward files given to the CLI (issue 11): never lose a user's file, never a traceback, never a hang.

Every refused case checks the one-line message (file, and tensor where there is one), the exit code (2: the run
is refused; 1: some inputs of `explain` were skipped, the others processed), that nothing was written, and that
every input file is byte-identical afterwards."""
from __future__ import annotations

import os
import re
import stat

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxlrp
from corpus import (DIGITS, RESULT_LINE, ROOT, SAMPLES, assert_refused, cli, cli_within, digests,
                    error_lines, make_fifo, point_external_data, save_bomb_png, save_compiled, save_external,
                    save_mismatched, save_npz_as_npy, save_pickled_npy, save_png, save_string_npy,
                    save_structured_npy, save_tiny, tiny_model)
from onnxlrp import save
from onnxlrp.errors import OnnxlrpError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compiled-model cache for the explain cases that do not test the cache itself."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def space(tmp_path):
    """inputs/ holds the user's files; every run must leave it byte-identical."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def unchanged(space, before):
    assert digests(space) == before


# --- compile: files that are not usable models -------------------------------------------------------------------

def _bad_model(space, case):
    """(model path, extra args, fragments of the message) for one bad model."""
    model = space / "model.onnx"
    if case == "missing":
        return model, [], ["model.onnx: file not found"]
    if case == "folder":
        model.mkdir()
        return model, [], ["model.onnx: is a folder"]
    if case == "png":
        save_png(model)
        return model, [], ["model.onnx: not an ONNX model"]
    if case == "truncated":
        data = DIGITS.read_bytes()
        model.write_bytes(data[: len(data) // 3])
        return model, [], ["model.onnx: not an ONNX model"]
    if case == "empty":
        model.write_bytes(b"")
        return model, [], ["model.onnx: not an ONNX model"]
    if case == "device":
        return "/dev/null", [], ["/dev/null: not a regular file"]
    if case == "mismatched_tensor":
        save_mismatched(model)
        return model, [], ["model.onnx: tensor 'fw' of shape [3, 32] does not hold matching data"]
    if case == "already_compiled":
        save_compiled(model)
        return model, [], ["model.onnx: is already an explaining model compiled by onnxlrp", "composite epsilon"]
    save_external(model)
    if case == "external_outside":
        (space.parent / "outside.bin").write_bytes(np.ones(32 * 3, np.float32).tobytes())
        point_external_data(model, "fw", "../outside.bin")
        return model, [], ["model.onnx: external data of tensor 'fw' cannot be used", "outside"]
    if case == "external_absolute":
        point_external_data(model, "fw", "/etc/hostname")
        return model, [], ["external data of tensor 'fw' cannot be used", "absolute path"]
    if case == "external_symlink":
        (space.parent / "target.bin").write_bytes(np.ones(32 * 3, np.float32).tobytes())
        (space / "link.bin").symlink_to(space.parent / "target.bin")
        point_external_data(model, "fw", "link.bin")
        return model, [], ["external data of tensor 'fw' cannot be used", "symbolic link"]
    if case == "external_missing":
        (space / "model.onnx.data").unlink()
        return model, [], ["external data of tensor", "cannot be used"]
    if case == "external_fifo":
        make_fifo(space / "fifo.bin")
        point_external_data(model, "fw", "fifo.bin")
        return model, [], ["external data of tensor 'fw' cannot be used", "not regular file"]
    if case == "external_length":
        point_external_data(model, "fw", "model.onnx.data", offset=0, length=10**9)
        return model, [], ["external data of tensor 'fw' cannot be used", "exceeds"]
    if case == "external_offset":
        point_external_data(model, "fw", "model.onnx.data", offset=10**9)
        return model, [], ["external data of tensor 'fw' cannot be used", "exceeds"]
    if case == "external_short":  # the file ends before the tensor's 3 x 32 values: dims disagree with the data
        (space / "short.bin").write_bytes(np.ones(40, np.float32).tobytes())
        point_external_data(model, "fw", "short.bin")
        return model, [], ["tensor 'fw' of shape [3, 32] does not hold matching data"]
    if case == "unsupported":
        m = tiny_model()
        m.graph.node[1].op_type = "Cos"
        onnx.save(m, str(model))
        return model, [], ["unsupported node", "relu (Cos"]
    if case == "unknown_composite":
        return model, ["--composite", "nope"], ["model.onnx", "nope"]
    if case == "bad_lrn_rule":
        return model, ["--lrn-rule", "cubic"], ["model.onnx", "cubic"]
    raise AssertionError(case)


BAD_MODELS = ["missing", "folder", "png", "truncated", "empty", "device", "mismatched_tensor", "already_compiled",
              "external_outside", "external_absolute", "external_symlink", "external_missing", "external_fifo",
              "external_length", "external_offset", "external_short", "unsupported", "unknown_composite",
              "bad_lrn_rule"]


@pytest.mark.parametrize("case", BAD_MODELS)
def test_compile_refuses_a_bad_model_with_one_line(space, case):
    model, args, fragments = _bad_model(space, case)
    out = space.parent / "out.onnx"
    before = digests(space)
    assert_refused(cli("compile", model, "-o", out, *args), *fragments)
    assert not out.exists()
    unchanged(space, before)


@pytest.mark.parametrize("case", ["missing", "png", "mismatched_tensor", "already_compiled", "external_outside",
                                  "external_short"])
def test_explain_and_inspect_refuse_a_bad_model_with_one_line(space, cache, case):
    model, _, fragments = _bad_model(space, case)
    image = save_png(space / "x.png")
    out = space.parent / "out"
    before = digests(space)
    assert_refused(cli("explain", model, image, "-o", out, cache=cache), *fragments)
    assert not out.exists()
    if case != "missing":
        assert_refused(cli("inspect", model), *fragments)
    unchanged(space, before)


@pytest.mark.parametrize("command", ["compile", "inspect", "explain"])
def test_a_fifo_as_the_model_is_refused_without_hanging(space, command):
    fifo = make_fifo(space / "model.onnx")
    image = save_png(space / "x.png")
    args = {"compile": [fifo, "-o", space.parent / "out.onnx"], "inspect": [fifo],
            "explain": [fifo, image, "-o", space.parent / "out"]}[command]
    run = cli_within(60, command, *args, cache=space.parent / "cache")
    assert_refused(run, "model.onnx: not a regular file")
    assert not (space.parent / "out.onnx").exists() and not (space.parent / "out").exists()


# --- compile: never overwrite an input -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["model", "model_relative", "external_data", "baseline", "folder"])
def test_compile_never_overwrites_an_input(space, case, monkeypatch):
    model = save_external(space / "model.onnx") if case == "external_data" else save_tiny(space / "model.onnx")
    args = []
    if case == "model":
        out = model
    elif case == "model_relative":
        monkeypatch.chdir(space)
        out = "./sub/../model.onnx"
        (space / "sub").mkdir()
    elif case == "external_data":
        out = space / "model.onnx.data"
    elif case == "baseline":
        out = space / "baseline.npy"
        np.save(out, np.zeros((1, 8, 8), np.float32))
        args = ["--composite", "deeplift", "--baseline", out]
    else:
        out = space
    before = digests(space)
    line = assert_refused(cli("compile", model, "-o", out, *args))
    assert ("would overwrite the input" in line) or (case == "folder" and "is a folder" in line), line
    unchanged(space, before)


def test_compile_output_respects_the_umask_and_leaves_no_temporary_file(space):
    model = save_tiny(space / "model.onnx")
    out = space.parent / "out.onnx"
    previous = os.umask(0o027)
    try:
        run = cli("compile", model, "-o", out)
    finally:
        os.umask(previous)
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in space.parent.iterdir()) == ["inputs", "out.onnx"]


def test_a_model_over_the_protobuf_limit_is_saved_with_external_data(space, monkeypatch):
    """The 2 GiB limit is lowered to a few kB here: the compiled model goes to out.onnx + out.onnx.data."""
    model = save_tiny(space / "model.onnx")
    reference = onnxlrp.compile_model(model, "epsilon")
    monkeypatch.setattr(save, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(save, "EXTERNAL_TENSOR_MIN", 64)
    out = space.parent / "out.onnx"
    before = digests(space)
    run = cli("compile", model, "-o", out, "--composite", "epsilon")
    assert run.returncode == 0, run.stderr
    data = space.parent / "out.onnx.data"
    assert data.exists() and data.stat().st_size >= 3 * 32 * 4
    assert sorted(p.name for p in space.parent.iterdir()) == ["inputs", "out.onnx", "out.onnx.data"]
    assert stat.S_IMODE(data.stat().st_mode) == 0o666 & ~_umask()
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    a = onnxlrp.Explainer.from_compiled(written, ["CPUExecutionProvider"]).explain(x, target=1)
    b = onnxlrp.Explainer.from_compiled(reference, ["CPUExecutionProvider"]).explain(x, target=1)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0]["logits"], b[0]["logits"])
    unchanged(space, before)


def test_explain_runs_a_model_over_the_protobuf_limit_without_caching_it(space, tmp_path, monkeypatch):
    model = save_tiny(space / "model.onnx")
    image = save_png(space / "x.png")
    x = np.asarray(Image.open(image), np.float32)[None, None] / 255
    expected = onnxlrp.Explainer(model, providers=["CPUExecutionProvider"]).explain(x)[1][0]
    monkeypatch.setattr(save, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(save, "EXTERNAL_TENSOR_MIN", 64)
    run = cli("explain", model, image, "-o", tmp_path / "out", cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "x.npy"), expected)
    assert not list((tmp_path / "cache").glob("*.lrp.onnx"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("command", ["compile", "explain"])
def test_an_unwritable_output_folder_is_one_line(space, cache, command, monkeypatch):
    """The folder refuses writes (EROFS, as on a read-only mount; chmod cannot stop root, who runs these tests)."""
    import onnxlrp.outputs
    import onnxlrp.save
    model = save_tiny(space / "model.onnx") if command == "compile" else DIGITS
    target = space.parent / "readonly"
    target.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(target)) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(onnxlrp.save.os, "open", refusing_open)
    monkeypatch.setattr(onnxlrp.outputs.os, "open", refusing_open)
    before = digests(space)
    if command == "compile":
        assert_refused(cli("compile", model, "-o", target / "out.onnx"), "out.onnx: cannot write",
                       "Read-only file system")
    else:
        image = save_png(space / "x.png", size=(32, 32))
        before = digests(space)
        assert_refused(cli("explain", model, image, "-o", target / "out", cache=cache),
                       "output folder is not writable", "Read-only file system")
        assert not (target / "out").exists()  # the folder it had made is gone again
    assert list(target.iterdir()) == []
    unchanged(space, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(space, cache):
    model = save_tiny(space / "model.onnx")
    target = space.parent / "readonly"
    target.mkdir()
    target.chmod(0o555)
    try:
        assert_refused(cli("compile", model, "-o", target / "out.onnx"), "cannot write")
        assert_refused(cli("explain", DIGITS, SAMPLES / "digit_0.png", "-o", target / "out", cache=cache),
                       "not writable")
    finally:
        target.chmod(0o755)


# --- explain: never overwrite an input, leave nothing behind on failure --------------------------------------------

def _digit_images(space, names=("a.png", "b.png")):
    for name, digit in zip(names, range(len(names))):
        Image.open(SAMPLES / f"digit_{digit}.png").save(space / name)
    return [space / name for name in names]


@pytest.mark.parametrize("case", ["input_folder", "folder_of_an_input", "cwd_dot", "an_input_file",
                                  "link_to_input_folder"])
def test_explain_never_writes_into_the_folder_of_its_inputs(space, cache, case, monkeypatch):
    images = _digit_images(space, ("x.png", "y.png"))
    np.save(space / "z.npy", np.asarray(Image.open(images[0]), np.float32)[None] / 255)
    if case == "input_folder":
        args, out = [space], space
    elif case == "folder_of_an_input":
        args, out = [images[0]], space
    elif case == "cwd_dot":
        monkeypatch.chdir(space)
        args, out = ["x.png", "z.npy"], "."
    elif case == "link_to_input_folder":
        out = space.parent / "link"
        out.symlink_to(space)
        args = [space]
    else:
        args, out = [images[1]], images[0]
    before = digests(space)
    line = assert_refused(cli("explain", DIGITS, *args, "-o", out, cache=cache))
    assert ("is where input" in line and "could overwrite inputs" in line) or "is a file" in line, line
    unchanged(space, before)


def test_same_stems_get_distinct_outputs_and_inputs_stay(space, cache):
    """x.png and x.jpg (and another folder's x.png) each get their own heatmap; none overwrites another."""
    Image.open(SAMPLES / "digit_3.png").save(space / "x.png")
    Image.open(SAMPLES / "digit_5.png").convert("L").save(space / "x.jpg", quality=95)
    other = space / "other"
    other.mkdir()
    Image.open(SAMPLES / "digit_7.png").save(other / "x.png")
    out = space.parent / "out"
    before = digests(space)
    run = cli("explain", DIGITS, space, other / "x.png", space / "x.png", "-o", out, cache=cache)
    assert run.returncode == 0, run.stderr
    # folder order is sorted (x.jpg first); the repeated x.png is explained once
    assert sorted(p.name for p in out.iterdir()) == ["x.1.npy", "x.1.png", "x.npy", "x.png", "x.png.npy",
                                                     "x.png.png"]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and all(re.match(RESULT_LINE, line) for line in lines), run.stdout
    assert "predicted 5" in lines[0] and "predicted 3" in lines[1] and "predicted 7" in lines[2]
    np.testing.assert_allclose(np.load(out / "x.1.npy"), onnxlrp.Explainer(DIGITS).explain(
        np.asarray(Image.open(other / "x.png"), np.float32)[None, None] / 255)[1][0], rtol=1e-5, atol=1e-7)
    unchanged(space, before)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


@pytest.mark.parametrize("case", ["target", "normalize", "cmap", "new_parents", "zoom", "size"])
def test_a_refused_explain_leaves_no_folder_behind(space, cache, case):
    """Also: a --zoom or --size that would need more memory than Pillow's pixel limit (the process would be
    killed without a word) is refused."""
    image = save_png(space / "x.png", size=(32, 32))
    out = space.parent / "out"
    args = {"target": ["--target", "10"], "normalize": ["--normalize", "a,b"], "cmap": ["--cmap", "nope"],
            "new_parents": ["--target", "99"], "zoom": ["--zoom", "100000"],
            "size": ["--size", "100000", "100000"]}[case]
    if case == "new_parents":
        out = space.parent / "a" / "b" / "out"
    before = digests(space)
    expected = {"target": "target 10 out of range", "normalize": "--normalize", "cmap": "colormap",
                "new_parents": "target 99 out of range", "zoom": "--zoom 100000: heatmaps of 3200000 x 3200000",
                "size": "--size 100000 100000: 10000000000 pixels per input"}[case]
    assert_refused(cli("explain", DIGITS, image, "-o", out, *args, cache=cache), expected)
    assert sorted(p.name for p in space.parent.iterdir()) == ["inputs"]
    unchanged(space, before)


def test_a_run_where_every_input_fails_removes_the_folder_it_made(space, cache):
    broken = space / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = space.parent / "new" / "out"
    before = digests(space)
    run = cli("explain", DIGITS, broken, "-o", out, cache=cache)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert any("broken.png: cannot decode the image" in line for line in error_lines(run))
    assert not (space.parent / "new").exists()
    unchanged(space, before)


def test_a_failure_mid_run_removes_what_the_run_wrote(space, cache, monkeypatch):
    """ONNX Runtime failing on the second batch: the first batch's files are removed again, exit 2."""
    images = _digit_images(space, ("a.png", "b.png", "c.png"))
    real = onnxlrp.runtime.Explainer.explain
    calls = []

    def failing(self, x, target=None):
        calls.append(1)
        if len(calls) == 2:
            raise OnnxlrpError("onnxruntime failed to run the compiled model: out of memory")
        return real(self, x, target)

    monkeypatch.setattr(onnxlrp.runtime.Explainer, "explain", failing)
    out = space.parent / "out"
    before = digests(space)
    run = cli("explain", DIGITS, *images, "-o", out, "--batch-size", "2", cache=cache)
    assert_refused(run, "out of memory")
    assert not out.exists()
    unchanged(space, before)


# --- explain: inputs that are skipped with one line each, the rest processed ---------------------------------------

def _bad_input(space, case):
    path = space / {"bomb": "bomb.png", "npz": "arrays.npy", "structured": "rec.npy", "string": "text.npy",
                    "pickled": "evil.npy", "nan": "nan.npy", "empty_batch": "empty.npy", "truncated_npy": "cut.npy",
                    "wrong_shape": "wrong.npy", "broken_png": "broken.png", "text_as_png": "notes.png",
                    "complex": "complex.npy"}[case]
    if case == "bomb":
        save_bomb_png(path)
        return path, "decompression bomb"
    if case == "npz":
        save_npz_as_npy(path)
        return path, "is an .npz archive, not a .npy array"
    if case == "structured":
        save_structured_npy(path)
        return path, "is not numeric"
    if case == "string":
        save_string_npy(path)
        return path, "dtype <U3 is not numeric"
    if case == "complex":
        np.save(path, np.ones((1, 32, 32), np.complex64))
        return path, "dtype complex64 is not numeric"
    if case == "pickled":
        save_pickled_npy(path, space.parent / "UNPICKLED")
        return path, "allow_pickle=False"
    if case == "nan":
        array = np.zeros((1, 32, 32), np.float32)
        array[0, 3, 3] = np.nan
        np.save(path, array)
        return path, "NaN or infinite"
    if case == "empty_batch":
        np.save(path, np.zeros((0, 1, 32, 32), np.float32))
        return path, "holds a batch of 0"
    if case == "truncated_npy":
        np.save(path, np.zeros((1, 32, 32), np.float32))
        path.write_bytes(path.read_bytes()[:200])
        return path, "cannot read the array"
    if case == "wrong_shape":
        np.save(path, np.zeros((3, 32, 32), np.float32))
        return path, "does not fit the model input"
    if case == "broken_png":
        path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        return path, "cannot decode the image"
    if case == "text_as_png":
        path.write_text("hello\n")
        return path, "cannot decode the image"
    raise AssertionError(case)


BAD_INPUTS = ["bomb", "npz", "structured", "string", "complex", "pickled", "nan", "empty_batch", "truncated_npy",
              "wrong_shape", "broken_png", "text_as_png"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_is_skipped_with_one_line_and_the_rest_explained(space, cache, case):
    bad, fragment = _bad_input(space, case)
    good = _digit_images(space, ("good.png",))[0]
    out = space.parent / "out"
    before = digests(space)
    run = cli("explain", DIGITS, bad, good, "-o", out, cache=cache)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 1, run.stderr
    errors = error_lines(run)
    assert len(errors) == 1 and errors[0].startswith(f"onnxlrp: error: {bad}: ") and fragment in errors[0], errors
    assert "1 input(s) failed" in run.stderr
    assert run.stdout.startswith(f"{good}: predicted 0 ")
    assert sorted(p.name for p in out.iterdir()) == ["good.npy", "good.png"]
    assert not (space.parent / "UNPICKLED").exists()
    unchanged(space, before)


def test_a_fifo_in_an_input_folder_is_skipped_without_hanging(space):
    _digit_images(space, ("a.png",))
    make_fifo(space / "pipe.png")
    (space / "sub.png").mkdir()  # a subfolder is not an input, whatever its name
    out = space.parent / "out"
    run = cli_within(60, "explain", DIGITS, space, "-o", out, cache=space.parent / "cache")
    assert "Traceback" not in run.stderr
    assert run.returncode == 1
    assert [line for line in error_lines(run) if "pipe.png: not a regular file" in line]
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "a.png"]


# --- awkward but valid ---------------------------------------------------------------------------------------------

def test_a_fixed_batch_1_model_explains_a_folder_one_at_a_time(space, cache):
    model = save_tiny(space / "fixed.onnx", batch=1)
    images = space / "images"
    images.mkdir()
    for k in range(3):
        save_png(images / f"i{k}.png", seed=k)
    out = space.parent / "out"
    before = digests(space)
    run = cli("explain", model, images, "-o", out, "--batch-size", "16", cache=cache)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 3
    explainer = onnxlrp.Explainer(model, providers=["CPUExecutionProvider"])
    for k in range(3):
        x = np.asarray(Image.open(images / f"i{k}.png"), np.float32)[None, None] / 255
        np.testing.assert_allclose(np.load(out / f"i{k}.npy"), explainer.explain(x)[1][0], rtol=1e-6)
    unchanged(space, before)


def test_a_fixed_batch_model_pads_the_last_batch(space, cache):
    model = save_tiny(space / "fixed.onnx", batch=2)
    for k in range(3):
        save_png(space / f"i{k}.png", seed=k)
    out = space.parent / "out"
    run = cli("explain", model, *[space / f"i{k}.png" for k in range(3)], "-o", out, cache=cache)
    assert run.returncode == 0, run.stderr
    explainer = onnxlrp.Explainer(model, providers=["CPUExecutionProvider"])
    x = np.stack([np.asarray(Image.open(space / f"i{k}.png"), np.float32)[None] / 255 for k in (2, 2)])
    np.testing.assert_allclose(np.load(out / "i2.npy"), explainer.explain(x)[1][0], rtol=1e-6)


def test_an_empty_batch_is_a_clear_error():
    explainer = onnxlrp.Explainer(tiny_model(), providers=["CPUExecutionProvider"])
    with pytest.raises(OnnxlrpError, match="empty batch"):
        explainer.explain(np.zeros((0, 1, 8, 8), np.float32))


# --- the cache -----------------------------------------------------------------------------------------------------

def _cache_entry(cache_dir):
    entries = sorted(cache_dir.glob("*.lrp.onnx"))
    assert len(entries) == 1, entries
    return entries[0]


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "digest_missing"])
def test_a_damaged_cache_entry_is_compiled_again_and_replaced(space, tmp_path, damage):
    model = save_tiny(space / "model.onnx")
    image = save_png(space / "x.png")
    cache_dir = tmp_path / "cache"
    first = cli("explain", model, image, "-o", tmp_path / "o1", cache=cache_dir)
    assert first.returncode == 0 and "compiled" in first.stderr, first.stderr
    entry = _cache_entry(cache_dir)
    good = entry.read_bytes()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~_umask()
    if damage == "empty":
        entry.write_bytes(b"")
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) - 100])
    elif damage == "garbage":
        entry.write_bytes(b"\x08" * 1000)
    else:
        entry.with_suffix("").with_suffix(".sha256").unlink()
    again = cli("explain", model, image, "-o", tmp_path / "o2", cache=cache_dir)
    assert again.returncode == 0 and "onnxlrp: compiled" in again.stderr, again.stderr
    assert _cache_entry(cache_dir).read_bytes() == good
    np.testing.assert_array_equal(np.load(tmp_path / "o1" / "x.npy"), np.load(tmp_path / "o2" / "x.npy"))
    third = cli("explain", model, image, "-o", tmp_path / "o3", cache=cache_dir)
    assert "using cached" in third.stderr
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_the_cache_key_covers_external_data(space, tmp_path):
    """Changed weights in model.onnx.data (same size, same .onnx file) are compiled again, not served stale."""
    model = save_external(space / "model.onnx")
    image = save_png(space / "x.png")
    cache_dir = tmp_path / "cache"
    assert cli("explain", model, image, "-o", tmp_path / "o1", cache=cache_dir).returncode == 0
    onnx_bytes = model.read_bytes()
    (space / "model.onnx.data").unlink()  # onnx appends to an existing data file
    save_external(space / "model.onnx", model=tiny_model(seed=1))
    assert model.read_bytes() == onnx_bytes  # only the data file differs
    run = cli("explain", model, image, "-o", tmp_path / "o2", cache=cache_dir)
    assert run.returncode == 0 and "onnxlrp: compiled" in run.stderr, run.stderr
    expected = onnxlrp.Explainer(tiny_model(seed=1), providers=["CPUExecutionProvider"]).explain(
        np.asarray(Image.open(image), np.float32)[None, None] / 255)[1][0]
    np.testing.assert_allclose(np.load(tmp_path / "o2" / "x.npy"), expected, rtol=1e-6)
    assert not np.allclose(np.load(tmp_path / "o1" / "x.npy"), expected)


# --- the last line of defence ----------------------------------------------------------------------------------------

def test_an_unforeseen_exception_is_one_line_not_a_traceback(space, monkeypatch):
    import onnxlrp.compile

    def broken(*args, **kwargs):
        raise TypeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(onnxlrp.compile, "compile_model", broken)
    model = save_tiny(space / "model.onnx")
    out = space.parent / "out.onnx"
    assert_refused(cli("compile", model, "-o", out), "internal error (TypeError: something nobody foresaw)",
                   "ONNXLRP_DEBUG=1")
    assert not out.exists()
    monkeypatch.setenv("ONNXLRP_DEBUG", "1")
    assert "Traceback" in cli("compile", model, "-o", out).stderr


@pytest.mark.parametrize("case", ["missing", "npz", "pickled", "string", "nan", "fifo"])
def test_a_bad_deeplift_baseline_file_is_one_line(space, case):
    model = save_tiny(space / "model.onnx")
    baseline = space / "baseline.npy"
    if case == "npz":
        save_npz_as_npy(baseline)
    elif case == "pickled":
        save_pickled_npy(baseline, space.parent / "UNPICKLED")
    elif case == "string":
        save_string_npy(baseline)
    elif case == "nan":
        np.save(baseline, np.full((1, 8, 8), np.nan, np.float32))
    elif case == "fifo":
        make_fifo(baseline)
    out = space.parent / "out.onnx"
    before = digests(space)
    expected = {"missing": "baseline.npy: file not found", "npz": "baseline.npy: is an .npz archive",
                "pickled": "allow_pickle=False", "string": "is not numeric", "nan": "NaN or infinite",
                "fifo": "baseline.npy: not a regular file"}[case]
    assert_refused(cli_within(60, "compile", model, "-o", out, "--composite", "deeplift", "--baseline", baseline),
                   expected)
    assert not out.exists() and not (space.parent / "UNPICKLED").exists()
    unchanged(space, before)


@pytest.mark.parametrize("args, fragment", [
    (["compile"], "Missing argument 'MODEL'"), (["explain", "m.onnx"], "Missing argument 'INPUTS...'"),
    (["compile", "m.onnx", "--epsilon", "abc"], "Invalid value for '--epsilon': 'abc' is not a valid float"),
    (["explain", "m.onnx", "x.png", "--target", "2.7"], "'2.7' is not a valid integer"),
    (["compile", "m.onnx", "--nope"], "No such option '--nope'"), (["frobnicate"], "No such command")])
def test_usage_errors_are_one_line_too(args, fragment):
    line = assert_refused(cli(*args), fragment)
    assert line.endswith("--help)")


@pytest.mark.parametrize("case", ["json_over_input", "json_over_model", "labels_fifo", "composite_fifo",
                                  "rules_fifo"])
def test_explain_side_files_never_overwrite_or_hang(space, cache, case):
    """--json may not replace an input or the model; a FIFO as --labels, composite file or --rules template is
    refused by name, not opened."""
    model = space / "model.onnx"
    model.write_bytes(DIGITS.read_bytes())
    image = _digit_images(space, ("x.png",))[0]
    args, expected = [], ""
    if case == "json_over_input":
        args, expected = ["--json", image], "x.png: the --json file would overwrite the input"
    elif case == "json_over_model":
        args, expected = ["--json", model], "the --json file would overwrite the input"
    elif case == "labels_fifo":
        args, expected = ["--labels", make_fifo(space / "labels.txt")], "labels.txt: cannot read the labels file (not a regular file)"
    elif case == "composite_fifo":
        args, expected = ["--composite", make_fifo(space / "mine.toml")], "mine.toml: not a regular file"
    else:
        (space / "rules").mkdir()
        make_fifo(space / "rules" / "t.onnxtxt")
        args, expected = ["--rules", space / "rules"], "t.onnxtxt: not a regular file"
    out = space.parent / "out"
    before = digests(space)
    assert_refused(cli_within(60, "explain", model, image, "-o", out, *args, cache=cache), expected)
    assert not out.exists()
    unchanged(space, before)


# --- stdout carries results only -----------------------------------------------------------------------------------

def test_stdout_carries_results_only_and_a_closed_pipe_loses_nothing(tmp_path):
    """onnxruntime-gpu without the CUDA libraries prints "Failed to load libcublas..." lines on stdout while
    probing (here its loader is pointed at an empty folder, which prints exactly those lines): stdout must start
    with a result line. Then the reader goes away, as `onnxlrp explain MODEL FOLDER | head -1` does: every
    heatmap is still written, no message, exit 0."""
    import subprocess
    import sys
    empty = tmp_path / "no-cuda-libraries"
    empty.mkdir()
    prelude = ("import os, sys\nos.environ.pop('ONNXLRP_PROVIDER', None)\nimport onnxruntime as ort\n"
               f"real = ort.preload_dlls\nort.preload_dlls = lambda *a, **k: real(directory={str(empty)!r})\n"
               "from onnxlrp.cli import main\nsys.argv[0] = 'onnxlrp'\nmain()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONNXLRP_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", prelude, "explain", str(DIGITS), str(SAMPLES), "-o", str(out),
                                "--batch-size", "1"],  # a line per run: the later ones meet a closed pipe
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    first, second = process.stdout.readline().decode(), process.stdout.readline().decode()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert re.match(RESULT_LINE, first.strip()) and re.match(RESULT_LINE, second.strip()), (first, second)
    assert "error" not in stderr and "Traceback" not in stderr and "Failed to load" not in stderr
    assert len(list(out.glob("digit_*.png"))) == 10


def test_a_file_name_with_a_newline_stays_one_line(space, cache):
    bad = space / "two\nlines.png"
    bad.write_bytes(b"not an image")
    good = _digit_images(space, ("good.png",))[0]
    run = cli("explain", DIGITS, bad, good, "-o", space.parent / "out", cache=cache)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = error_lines(run)
    assert len(errors) == 1 and "two\\nlines.png: cannot decode the image" in errors[0], run.stderr
    assert len(run.stderr.strip().splitlines()) == 3, run.stderr  # cache note, the error, the summary
