"""The runtime API under bad input, shared between threads, and what importing it costs:
each bad input is an error saying what was wrong (never a wrong answer, a crash or a
traceback from deep inside TVM), and a model may be shared by threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.runtime.test_runtime import BOXES, PROMPT, needs, shared_artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "tvm", "tvm.relax", "transformers")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def model(art):
    from sam3_nn.runtime.api import Sam3

    return Sam3.load(art["library"], art["converted"], tokenizer=art["snapshot"])


def run_python(code: str, *args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------
# import cost
# ----------------------------------------------------------------------------
def test_runtime_import_loads_neither_torch_nor_the_tvm_compiler():
    """``import sam3_nn.runtime`` took seconds: tvm_ffi imported torch, ``import tvm`` loaded the
    compiler and ``tvm.relax``. The runtime reaches TVM's runtime through tvm_ffi alone."""
    r = run_python(f"""
        import json, sys
        import sam3_nn.runtime
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_segment_command_loads_neither_torch_nor_the_tvm_compiler(art, tmp_path):
    """A whole ``segment`` run (library loaded, image segmented, outputs written) imports no
    torch and no TVM compiler; torch imported afterwards still works."""
    needs(art, "encode_text", "detect")
    r = run_python(f"""
        import json, sys
        from sam3_nn.cli import main
        code = main(["segment", "--library", sys.argv[1], "--weights", sys.argv[2], "--tokenizer",
                     sys.argv[3], "--image", sys.argv[4], "--text", "a red car", "--output", sys.argv[5]])
        loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
        import torch
        assert torch.ones(2).sum().item() == 2.0
        print(json.dumps([code, loaded]))
    """, art["library"], art["converted"], art["snapshot"], art["image"], tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    code, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert code == 0 and loaded == []
    assert sorted(os.listdir(tmp_path / "out")) == ["scene.json", "scene.png"]


# ----------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------
THREADS = """
    import json, sys, threading
    import numpy as np
    from sam3_nn.runtime.api import Sam3
    a = json.loads(sys.argv[1])
    model = Sam3.load(a["library"], a["converted"], tokenizer=a["tokenizer"])
    images = [a["image"], np.ascontiguousarray(np.load(a["flipped"]))]
    prompts = [dict(text=a["text"]), dict(boxes=a["boxes"][:1]), dict(text="a cat", boxes=a["boxes"])]

    def run(image, prompt):
        det = model.predict(model.set_image(image), score_threshold=0.0, **prompt)
        return det.scores, det.boxes, det.masks

    # sequential: the expected results
    want = {(i, p): run(images[i], prompts[p]) for i in range(2) for p in range(3)}
    errors, checked = [], [0]

    def hammer(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(a["rounds"]):
                i, p = int(rng.integers(2)), int(rng.integers(3))
                got = run(images[i], prompts[p])
                for x, y in zip(got, want[(i, p)]):
                    np.testing.assert_array_equal(x, y)
                checked[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(a["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"errors": errors[:3], "checked": checked[0]}))
"""


def test_threads_sharing_one_model_get_the_sequential_results(art, tmp_path):
    """Threads hammering ``set_image`` / ``predict`` on one shared ``Sam3`` (it segfaulted the
    process): no crash, and every result equals the sequential one. In a subprocess, so that a
    crash is a failure of this test only."""
    needs(art, "encode_text", "detect")
    from PIL import Image

    flipped = np.asarray(Image.open(art["image"]).convert("RGB"))[::-1]
    np.save(tmp_path / "flipped.npy", flipped)
    args = {"library": art["library"], "converted": art["converted"], "tokenizer": art["snapshot"],
            "image": art["image"], "flipped": str(tmp_path / "flipped.npy"), "text": PROMPT,
            "boxes": BOXES, "threads": 4, "rounds": 12}
    r = run_python(THREADS, json.dumps(args))
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["checked"] == 4 * 12


def test_an_image_state_belongs_to_its_model(art, model):
    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.preprocess import InputError

    needs(art, "encode_text", "detect")
    other = Sam3.load(art["library"], art["converted"], tokenizer=art["snapshot"])
    state = other.set_image(art["image"])
    with pytest.raises(InputError, match="another Sam3"):
        model.predict(state, text=PROMPT)
    assert len(other.predict(state, text=PROMPT, score_threshold=0.0)) > 0


# ----------------------------------------------------------------------------
# prompts and thresholds: no silent wrong answer
# ----------------------------------------------------------------------------
def test_prompts_and_thresholds_are_checked(art, model):
    from sam3_nn.runtime.preprocess import InputError

    needs(art, "encode_text", "detect")
    state = model.set_image(art["image"])
    for kw, msg in [(dict(boxes=[]), "no prompt"), (dict(text=None, boxes=[]), "no prompt"),
                    (dict(text="  "), "non-empty"), (dict(text=PROMPT, box_labels=[1]), "no boxes"),
                    (dict(boxes=[BOXES[0]] * 9), "--max-boxes 9"),
                    (dict(text=PROMPT, score_threshold=2.0), "score_threshold"),
                    (dict(text=PROMPT, score_threshold=float("nan")), "score_threshold"),
                    (dict(text=PROMPT, score_threshold=-0.1), "score_threshold"),
                    (dict(text=PROMPT, mask_threshold=-1), "mask_threshold"),
                    (dict(text=PROMPT, mask_threshold=2), "mask_threshold")]:
        with pytest.raises(InputError, match=msg):
            model.predict(state, **kw)
    assert model.max_boxes == 8
    # an empty box list beside a text is the text alone
    a = model.predict(state, text=PROMPT, boxes=[], score_threshold=0.0)
    b = model.predict(state, text=PROMPT, score_threshold=0.0)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_a_prompt_longer_than_the_context_warns(art, model):
    from sam3_nn.runtime.api import PromptTruncatedWarning

    needs(art, "encode_text", "detect")
    state = model.set_image(art["image"])
    long = " ".join(["red car"] * 40)
    with pytest.warns(PromptTruncatedWarning, match="last 66 tokens are ignored"):
        model.predict(state, text=long)
    with pytest.warns(PromptTruncatedWarning):
        model.encode_text(long + " again")


def test_shipped_clip_vocabulary_is_the_default_tokenizer(art):
    """No tokenizer files beside the weights or the library: a model with CLIP's vocabulary
    (the released SAM 3) gets the CLIP vocabulary shipped with the package; one whose
    vocabulary it does not fit is told to pass its own."""
    from sam3_nn.runtime.api import LibraryError, Sam3, load_tokenizer

    with open(art["manifest"]) as f:
        manifest = json.load(f)
    clip = json.loads(json.dumps(manifest))
    clip["config"]["text"]["vocab_size"] = 49408
    tok = load_tokenizer(clip, None)
    ctx = manifest["functions"]["encode_text"]["inputs"][0]["shape"][-1]
    assert list(tok("a photo of a cat").input_ids[0, :7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.context_length == ctx
    with pytest.raises(LibraryError, match="49408 tokens, more than this model's 1000"):
        load_tokenizer(manifest, None)
    bare = Sam3.load(art["library"], art["converted"])  # no tokenizer anywhere: loads
    with pytest.raises(LibraryError, match="--tokenizer"):
        bare.encode_text(PROMPT)


# ----------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------
def test_sixteen_bit_and_float_images(tmp_path, monkeypatch):
    """A 16-bit grey PNG is scaled to 8 bits as it displays (Pillow's RGB conversion clipped it
    to all white); a float image is refused; so is one over Pillow's pixel limit."""
    from PIL import Image

    from sam3_nn.runtime.preprocess import InputError, load_image

    rng = np.random.default_rng(0)
    grey16 = (rng.random((30, 40)) * 65535).astype(np.uint16)
    path = str(tmp_path / "grey16.png")
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path)
    want = np.round(grey16 / 257.0).astype(np.uint8)
    assert rgb.shape == (30, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], want)
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="floating-point"):
        load_image(str(tmp_path / "float.tif"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.raises(InputError, match="pixel limit"):
        load_image(path)
    with pytest.raises(InputError, match="pixel limit"):  # between the limit and twice it, too
        load_image(Image.fromarray(grey16[:20]))


# ----------------------------------------------------------------------------
# libraries and devices
# ----------------------------------------------------------------------------
def _library_copy(art, folder, manifest_edit=None, library_bytes=None):
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, "sam3-llvm.so")
    if library_bytes is None:
        with open(art["library"], "rb") as f:
            library_bytes = f.read()
    with open(lib, "wb") as f:
        f.write(library_bytes)
    with open(art["manifest"]) as f:
        manifest = json.load(f)
    if manifest_edit:
        manifest_edit(manifest)
    with open(os.path.join(folder, "sam3-llvm.json"), "w") as f:
        json.dump(manifest, f)
    return lib


def test_library_and_device_errors_are_short_messages(art, tmp_path):
    from sam3_nn.runtime.api import Sam3
    from sam3_nn.errors import UserError

    def drop_sha(m):
        m.pop("library_sha256", None)

    def other_build(m):  # a manifest from a build with another detect
        drop_sha(m)
        m["functions"]["detect"]["inputs"].pop()

    def other_file(m):
        m["library_sha256"] = "0" * 64

    cases = [
        (_library_copy(art, tmp_path / "text", drop_sha, b"not a shared object\n"), None, "cannot be loaded"),
        (_library_copy(art, tmp_path / "sha", other_file), None, "not the one its manifest"),
        (_library_copy(art, tmp_path / "arity", other_build), None, "does not match its manifest"),
        (art["library"], "bogus", "unknown device 'bogus'"),
        (art["library"], "cuda", "runs on cpu, not cuda"),
    ]
    for lib, device, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            Sam3.load(lib, art["converted"], device=device, tokenizer=art["snapshot"])
        assert len(str(e.value)) < 600, str(e.value)


def test_a_device_the_machine_lacks(art, tmp_path):
    """A CUDA library on a machine without an NVIDIA driver or GPU: the device is named."""
    from sam3_nn.runtime import ffi
    from sam3_nn.runtime.api import Sam3

    try:
        ffi.open_device("cuda")
        pytest.skip("this machine has a CUDA device")
    except ffi.DeviceError:
        pass

    def cuda(m):
        m["target"] = "cuda"

    lib = _library_copy(art, tmp_path / "cuda", cuda)
    with pytest.raises(ffi.DeviceError, match="CUDA|cuda"):
        Sam3.load(lib, art["converted"], tokenizer=art["snapshot"])


def test_rows_to_numpy_copies_exactly_the_rows_asked_for():
    from sam3_nn.runtime import ffi
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 5, 3, 4)).astype(np.float16)
    t = ffi.to_device(a, ffi.open_device("cpu"))
    flat = a.reshape(-1, 3, 4)
    for rows in ([], [0], [9], [1, 2, 3, 7], [6, 2, 3], [4, 5, 6, 7, 8, 9]):
        got = ffi.rows_to_numpy(t, 2, rows)
        assert got.dtype == np.float16 and got.shape == (len(rows), 3, 4)
        np.testing.assert_array_equal(got, flat[rows])
