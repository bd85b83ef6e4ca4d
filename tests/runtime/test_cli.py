"""``python -m sam3_nn segment`` / ``convert``: outputs read back, errors leave no files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sam3_nn.runtime import rle
from tests.runtime.test_runtime import PROMPT, needs, shared_artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def cli(*args, cwd=None):
    """Run the command line in-process (fast); -> (exit status, stdout, stderr)."""
    import contextlib
    import io

    from sam3_nn.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def segment_args(art, output, *extra):
    return ["segment", "--library", art["library"], "--weights", art["converted"],
            "--tokenizer", art["snapshot"], "--output", output, *extra]


def files_under(folder) -> list:
    if not os.path.exists(folder):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ----------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------
def test_convert_writes_checked_parameters(art, tmp_path):
    from safetensors import safe_open

    from sam3_nn.runtime.api import config_fingerprint, load_weights

    out = tmp_path / "w" / "tiny.safetensors"
    code, stdout, stderr = cli("convert", art["snapshot"], art["library"], out)  # the library path works too
    assert code == 0, stderr
    assert "[1/2]" in stdout and "wrote" in stdout
    with open(art["manifest"]) as f:
        manifest = json.load(f)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
        names = sorted(f.keys())
    assert meta["format"] == "sam3_nn" and meta["dtype"] == manifest["dtype"]
    assert meta["config_sha256"] == config_fingerprint(manifest["config"])
    assert names == sorted(p["name"] for p in manifest["params"])
    ref = load_weights(art["snapshot"], manifest)
    got = load_weights(str(out), manifest)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert [f for f in files_under(tmp_path / "w")] == ["tiny.safetensors"]  # no temporary left


def test_convert_errors_leave_nothing(art, tmp_path):
    out = tmp_path / "o" / "x.safetensors"
    code, _, err = cli("convert", tmp_path / "missing", art["manifest"], out)
    assert code == 2 and "no such file" in err
    code, _, err = cli("convert", art["snapshot"], tmp_path / "nothing.json", out)
    assert code == 2 and "manifest" in err
    # a snapshot of another model (different config) for this library
    other = tmp_path / "other"
    other.mkdir()
    with open(os.path.join(art["snapshot"], "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"]["backbone_config"]["num_hidden_layers"] = 2
    (other / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(art["snapshot"], "model.safetensors"), other / "model.safetensors")
    code, _, err = cli("convert", other, art["manifest"], out)
    assert code == 2 and "different model" in err and "num_hidden_layers" in err
    assert files_under(tmp_path / "o") == []


# ----------------------------------------------------------------------------
# segment: errors (no detect needed: all are caught before or at load)
# ----------------------------------------------------------------------------
def test_segment_errors_leave_no_files(art, tmp_path):
    out = tmp_path / "out"
    bad_image = tmp_path / "broken.png"
    bad_image.write_text("this is not a PNG")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([ "--image", art["image"]], "no prompt"),
        (["--image", art["image"], "--text", "  "], "--text is empty"),
        (["--image", art["image"], "--box", "1,2,3"], "4 numbers"),
        (["--image", art["image"], "--box", "1,2,x,4"], "not a number"),
        (["--image", art["image"], "--box", "50,50,10,60"], "x0 < x1"),
        (["--image", art["image"], "--box", "500,10,600,20"], "outside"),
        (["--image", art["image"], "--box", "1,2,30,40:maybe"], "label"),
        (["--image", str(bad_image), "--text", PROMPT], "cannot be read as an image"),
        (["--image", str(tmp_path / "nope.jpg"), "--text", PROMPT], "no such file"),
        (["--image", str(empty), "--text", PROMPT], "holds no images"),
    ]
    for extra, msg in cases:
        code, _, err = cli(*segment_args(art, out, *extra))
        assert code == 2, (extra, err)
        assert msg in err, (extra, err)
        assert not out.exists(), extra
    code, _, err = cli("segment", "--library", art["library"], "--weights", tmp_path / "none.safetensors",
                       "--image", art["image"], "--text", PROMPT, "--output", out)
    assert code == 2 and "none.safetensors" in err and not out.exists()


def test_segment_library_without_detect(art, tmp_path):
    """A library lacking ``detect`` (an image-encoder-only build) is refused with a clear message."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    lib = lib_dir / os.path.basename(art["library"])
    os.symlink(art["library"], lib)
    with open(art["manifest"]) as f:
        manifest = json.load(f)
    manifest["functions"].pop("detect", None)
    (lib_dir / (lib.stem + ".json")).write_text(json.dumps(manifest))
    out = tmp_path / "out"
    code, stdout, err = cli("segment", "--library", lib, "--weights", art["converted"], "--tokenizer",
                            art["snapshot"], "--image", art["image"], "--text", PROMPT, "--output", out)
    assert code == 2 and "no detect function" in err, err
    assert "[load]" in stdout
    assert not out.exists()


# ----------------------------------------------------------------------------
# segment: results
# ----------------------------------------------------------------------------
def test_segment_outputs_read_back(art, tmp_path):
    needs(art, "encode_text", "detect")
    from PIL import Image

    from sam3_nn.runtime.api import Sam3

    out = tmp_path / "out"
    box = "20,10,110,80"
    code, stdout, err = cli(*segment_args(art, out, "--image", art["image"], "--text", PROMPT,
                                          "--box", box, "--box", "60,40,150,95:neg",
                                          "--score-threshold", "0.0"))
    assert code == 0, err
    assert "encode_image" in stdout and "detect" in stdout and "wrote" in stdout
    stem = os.path.splitext(os.path.basename(art["image"]))[0]
    assert files_under(out) == [stem + ".json", stem + ".png"]
    result = json.loads((out / (stem + ".json")).read_text())
    model = Sam3.load(art["library"], art["converted"], tokenizer=art["snapshot"])
    det = model.predict(model.set_image(art["image"]), text=PROMPT,
                        boxes=[[20, 10, 110, 80], [60, 40, 150, 95]], box_labels=[1, 0], score_threshold=0.0)
    assert len(result["objects"]) == len(det) > 0
    assert (result["height"], result["width"]) == (100, 160)
    for k, obj in enumerate(result["objects"]):
        np.testing.assert_array_equal(rle.decode(obj["segmentation"]), det.masks[k])
        assert obj["area"] == int(det.masks[k].sum())
        np.testing.assert_allclose(obj["box"], det.boxes[k], atol=0.01)
        np.testing.assert_allclose(obj["score"], det.scores[k], atol=1e-5)
    png = np.asarray(Image.open(out / (stem + ".png")).convert("RGB"))
    original = np.asarray(Image.open(art["image"]).convert("RGB"))
    assert png.shape == original.shape
    any_mask = det.masks.any(0)
    if any_mask.any():  # masked pixels are tinted
        assert np.abs(png.astype(int) - original)[any_mask].mean() > 5


def test_segment_folder(art, tmp_path):
    needs(art, "encode_text", "detect")
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(art["image"], images / "one.png")
    shutil.copy(art["image"], images / "two.png")
    (images / "notes.txt").write_text("skipped: not an image name")
    out = tmp_path / "out"
    code, stdout, err = cli(*segment_args(art, out, "--image", images, "--text", PROMPT))
    assert code == 0, err
    assert files_under(out) == ["one.json", "one.png", "two.json", "two.png"]
    a = json.loads((out / "one.json").read_text())["objects"]
    b = json.loads((out / "two.json").read_text())["objects"]
    assert a == b
    assert "[1/2]" in stdout and "[2/2]" in stdout


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "sam3_nn", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "segment" in r.stdout and "convert" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sam3_nn", "segment", "--image", "x"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--library" in r.stderr
