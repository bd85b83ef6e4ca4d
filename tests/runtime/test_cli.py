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
    assert "[load]" not in stdout  # found in the manifest, before the model is loaded
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


# ----------------------------------------------------------------------------
# hardening: no data loss, checks before the work, batches skip bad items
# ----------------------------------------------------------------------------
def _copy_image_folder(art, folder, names=("one.png", "two.png")):
    import shutil

    os.makedirs(folder, exist_ok=True)
    for n in names:
        shutil.copy(art["image"], os.path.join(folder, n))
    return folder


def test_segment_never_overwrites_its_inputs(art, tmp_path):
    """``--output`` set to the images' own folder would replace the PNGs with their overlays."""
    images = _copy_image_folder(art, tmp_path / "images")
    before = {n: (tmp_path / "images" / n).read_bytes() for n in os.listdir(images)}
    for image in (images, tmp_path / "images" / "one.png"):
        code, stdout, err = cli(*segment_args(art, images, "--image", image, "--text", PROMPT))
        assert code == 2 and "would overwrite the input" in err, err
        assert "[load]" not in stdout
    assert {n: (tmp_path / "images" / n).read_bytes() for n in os.listdir(images)} == before


def test_segment_option_values_are_checked(art, tmp_path):
    out = tmp_path / "out"
    for option, value in [("--mask-threshold", "-1"), ("--mask-threshold", "2"),
                          ("--score-threshold", "2"), ("--score-threshold", "nan"),
                          ("--score-threshold", "x")]:
        code, _, err = cli(*segment_args(art, out, "--image", art["image"], "--text", PROMPT, option, value))
        assert code == 2 and f"argument {option}: expected a number in [0, 1]" in err, err
    assert not out.exists()


def test_segment_checks_everything_before_loading(art, tmp_path):
    """A bad tokenizer, output path, box count or device is found before the model is loaded
    (at full size that is minutes of work later)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    nine = [a for _ in range(9) for a in ("--box", "20,10,110,80")]
    cases = [
        (["--tokenizer", tmp_path / "no-tokenizer"], "no-tokenizer"),
        (["--output", a_file], "is a file, not a folder"),
        (["--output", a_file / "sub"], "is a file, not a folder"),
        (nine, "--max-boxes 9"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--device", "cuda"], "not cuda"),
    ]
    for extra, msg in cases:
        args = ["segment", "--library", art["library"], "--weights", art["converted"], "--tokenizer",
                art["snapshot"], "--output", tmp_path / "out", "--image", art["image"], "--text", PROMPT]
        args += [str(x) for x in extra]  # a repeated option: the last one counts
        code, stdout, err = cli(*args)
        assert code == 2 and msg in err, (extra, err)
        assert "[load]" not in stdout and "Traceback" not in err, extra
    assert not (tmp_path / "out").exists()


def test_segment_folder_skips_bad_images_and_says_so(art, tmp_path):
    needs(art, "encode_text", "detect")
    from PIL import Image

    images = _copy_image_folder(art, tmp_path / "images", ("a.png", "c.png"))
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "images" / "d.tif")
    out = tmp_path / "out"
    code, stdout, err = cli(*segment_args(art, out, "--image", images, "--text", PROMPT))
    assert code == 1, err
    assert files_under(out) == ["a.json", "a.png", "c.json", "c.png"]
    assert "2 of 4 done" in stdout and "2 failed" in stdout
    assert "b.png: image" in stdout and "d.tif: image" in stdout and "floating-point" in stdout


def test_outputs_are_created_with_the_usual_mode(art, tmp_path):
    """Outputs were created 0600 (tempfile's mode) while libraries are 0644."""
    needs(art, "encode_text", "detect")
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    out = tmp_path / "out"
    code, _, err = cli(*segment_args(art, out, "--image", art["image"], "--text", PROMPT))
    assert code == 0, err
    code, _, err = cli("convert", art["snapshot"], art["manifest"], tmp_path / "w.safetensors")
    assert code == 0, err
    for p in [out / "scene.png", out / "scene.json", tmp_path / "w.safetensors", art["library"],
              art["manifest"]]:
        assert os.stat(p).st_mode & 0o777 == want, (p, oct(os.stat(p).st_mode))


# a convert whose writing is slow: the parent kills it midway
SLOW_CONVERT = """
import sys, time
import sam3_nn.weights.store as store

def slow(*args, **kw):  # the writer: given a file object, or a path (then opened here)
    f = next(a for a in args if isinstance(a, str) or hasattr(a, "write"))
    f = open(f, "wb") if isinstance(f, str) else f
    f.write(b"x" * (1 << 20))
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

if hasattr(store, "write_safetensors"):
    store.write_safetensors = slow
else:
    store.save_file = slow
from sam3_nn.cli import main
sys.exit(main(["convert"] + sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_convert_killed_while_writing_leaves_nothing(art, tmp_path, sig):
    import signal

    out_dir = tmp_path / "w"
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, art["snapshot"], art["manifest"],
                          str(out_dir / "x.safetensors")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("writing"):
                break
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == (143 if sig == "SIGTERM" else -9), err
    assert "Traceback" not in err
    assert sorted(os.listdir(out_dir)) == []  # no partial file, hidden or not


def test_convert_refuses_non_finite_and_out_of_range_weights(art, tmp_path):
    """NaN/inf, or values beyond float16's range for a float16 library, were written as they
    came (infinities after numpy's 'overflow encountered in cast')."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(art["snapshot"], "model.safetensors"))
    name = sorted(n for n in tensors if n.startswith("detr_decoder.") and n.endswith(".weight"))[0]
    with open(art["manifest"]) as f:
        manifest = json.load(f)
    half = dict(manifest, dtype="float16",
                params=[dict(p, dtype="float16") for p in manifest["params"]])
    half.pop("library_sha256", None)
    (tmp_path / "half.json").write_text(json.dumps(half))
    for value, library, msg in [(np.nan, art["manifest"], "NaN or infinite"),
                                (np.inf, art["manifest"], "NaN or infinite"),
                                (1e6, str(tmp_path / "half.json"), "beyond float16's range")]:
        snap = tmp_path / f"snap-{value}"
        snap.mkdir()
        bad = dict(tensors)
        bad[name] = bad[name].copy()
        bad[name].flat[3] = value
        save_file(bad, str(snap / "model.safetensors"))
        (snap / "config.json").write_text(open(os.path.join(art["snapshot"], "config.json")).read())
        out = tmp_path / "o" / "w.safetensors"
        code, _, err = cli("convert", snap, library, out)
        assert code == 2 and msg in err, err
        assert "overflow encountered" not in err
        assert files_under(tmp_path / "o") == []
    # the float16 library takes the same weights when they fit
    code, _, err = cli("convert", art["snapshot"], tmp_path / "half.json", tmp_path / "o" / "w.safetensors")
    assert code == 0, err


def test_library_errors_are_one_line(art, tmp_path):
    """A file that is not a library, or a library beside another build's manifest: a short
    message, not 63 KB of TVM output."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    with open(art["manifest"]) as f:
        manifest = json.load(f)
    (lib_dir / "sam3-llvm.so").write_text("not a library")
    (lib_dir / "sam3-llvm.json").write_text(json.dumps(dict(manifest, library_sha256=None)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "sam3-llvm.so").write_bytes(open(art["library"], "rb").read())
    m = json.loads(json.dumps(manifest))
    m["params"] = m["params"][1:]  # another build's parameter set
    m.pop("library_sha256", None)
    (other / "sam3-llvm.json").write_text(json.dumps(m))
    for lib, msg in [(lib_dir / "sam3-llvm.so", "cannot be loaded"), (other / "sam3-llvm.so", "")]:
        code, _, err = cli("segment", "--library", lib, "--weights", art["snapshot"], "--image",
                           art["image"], "--text", PROMPT, "--output", tmp_path / "out")
        assert code == 2 and msg in err, err
        assert "Traceback" not in err and len(err) < 1000, err[:3000]


def test_image_over_the_pixel_limit(art, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, stdout, err = cli(*segment_args(art, tmp_path / "out", "--image", art["image"], "--text", PROMPT))
    assert code == 2 and "pixel limit" in err and "Traceback" not in err, err
    assert "[load]" not in stdout


def test_compile_arguments_are_checked_first(tmp_path, monkeypatch):
    """Errors in the arguments of ``compile`` are found before the (long) build, as messages."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "strings").mkdir()
    from sam3_nn.config import TINY_HF

    cfg = json.loads(json.dumps(TINY_HF))
    cfg["text_config"]["hidden_size"] = "32"
    (tmp_path / "strings" / "config.json").write_text(json.dumps(cfg))
    cases = [(["--image-size", "-14"], "--image-size: expected a positive integer"),
             (["--image-size", "0"], "--image-size: expected a positive integer"),
             (["--image-size", "1000"], "not a multiple of patch_size"),
             (["--max-boxes", "0"], "--max-boxes: expected a positive integer"),
             (["--model", "weights/sam3-hf"], "no such file or directory"),
             (["--model", "list"], "JSON object"),
             (["--model", "strings"], "text.hidden_size must be an integer"),
             (["--output", "a_file"], "is a file, not a folder"),
             (["--output", "a_file/dist"], "is a file, not a folder")]
    for extra, msg in cases:
        code, _, err = cli("compile", "--target", "llvm", *extra)
        assert code == 2 and msg in err, (extra, err)
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "list", "strings", "weights"]
