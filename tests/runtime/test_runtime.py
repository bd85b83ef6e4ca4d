"""The runtime app (sam3_nn.runtime.api): pre/post-processing against transformers' Sam3 processors,
weights checks, parity of the raw outputs with transformers' Sam3Model, runtime-only TVM.

transformers' ``Sam3ImageProcessor`` is a torchvision-backed processor and torchvision
does not run with the CPU torch here, so the reference runs in a subprocess where a
minimal ``torchvision`` stand-in provides the few functions the processor calls; its
``resize`` is torchvision's tensor ``resize_image`` (bilinear/bicubic branch: the same
``torch.nn.functional.interpolate(..., antialias=True)`` call, uint8 kept on AVX2 CPUs).

Tolerances:
* pre-processing: Pillow's uint8 bilinear resize and torch's uint8 antialiased resize
  round differently by at most one uint8 level: |diff| <= 1/127.5 after normalisation.
* post-processing: scores and boxes rtol 1e-6; binary masks identical except where the
  interpolated probability is within 1e-6 of the threshold.
* raw outputs vs Sam3Model (float32, same pixel values and token ids): rtol 1e-4, atol 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.refs import randomize_, save_hf_snapshot, tiny_hf_config
from sam3_nn.runtime import rle
from sam3_nn.config import Sam3Config
from sam3_nn.runtime.engine import LibraryError
from sam3_nn.runtime.postprocess import post_process_instances, resize_bilinear
from sam3_nn.runtime.preprocess import (InputError, boxes_to_model, check_boxes, parse_box,
                                        preprocess_image)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
LEVEL = 1 / 127.5  # one uint8 level after (x / 255 - 0.5) / 0.5
WORDS = ["a", "the", "cat", "dog", "red", "car", "visual", "on", "mat", "person", "of", "and"]
PROMPT = "a red car"
BOXES = [[20.5, 10.0, 110.0, 80.0], [60.0, 40.0, 150.0, 95.0]]
BOX_LABELS = [1, 0]


# ----------------------------------------------------------------------------
# shared artifacts (also used by test_cli.py)
# ----------------------------------------------------------------------------
def write_tokenizer(folder: str) -> str:
    """A tiny word-level tokenizer.json with SAM 3's special tokens at the tiny config's ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<pad0>": 1, **{w: i + 2 for i, w in enumerate(WORDS)},
             "<|startoftext|>": 998, "<|endoftext|>": 999}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 998), ("<|endoftext|>", 999)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<unk>"}, f)
    return os.path.join(folder, "tokenizer.json")


def write_test_image(path: str, h: int = 100, w: int = 160, seed: int = 3) -> str:
    """A smooth image with a few shapes and noise (not square: the resize squashes it)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    base = base + rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([20, 10, 110, 80], fill=(200, 30, 40))
    d.rectangle([60, 40, 150, 95], fill=(20, 40, 200))
    img.save(path)
    return path


def shared_artifacts(tmp_path_factory):
    """A tiny random SAM 3 (HF snapshot + tokenizer), its llvm library (all parts the model
    has today), the converted weights, and a test image; built once per test session."""
    base = tmp_path_factory.getbasetemp() / "sam3_runtime_shared"
    done = base / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    from transformers import Sam3Model

    from tests.refs import compile_library
    from sam3_nn.cli import main as cli

    model = randomize_(Sam3Model(tiny_hf_config()).eval(), seed=7)
    snapshot = save_hf_snapshot(model, str(base / "hf"))
    write_tokenizer(snapshot)
    cfg = Sam3Config.from_pretrained(snapshot)
    compiled = compile_library(cfg, str(base / "dist"))
    library = os.path.join(str(base / "dist"), "sam3-llvm.so")
    manifest = os.path.splitext(library)[0] + ".json"
    converted = str(base / "sam3-tiny.safetensors")
    assert cli(["convert", snapshot, manifest, converted]) == 0
    image = write_test_image(str(base / "scene.png"))
    art = {"snapshot": snapshot, "library": library, "manifest": manifest, "converted": converted,
           "image": image, "functions": sorted(compiled.manifest["functions"])}
    done.write_text(json.dumps(art))
    return art


def needs(art, *functions):
    missing = [f for f in functions if f not in art["functions"]]
    if missing:
        pytest.skip(f"the compiled library has no {', '.join(missing)} yet (manifest functions: "
                    f"{', '.join(art['functions'])}); this check runs once the model exports it")


# ----------------------------------------------------------------------------
# the transformers reference, run in a subprocess with a torchvision stand-in
# ----------------------------------------------------------------------------
TV_FUNCTIONAL = '''
import enum
import numpy as np
import torch
from torch.nn.functional import interpolate

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

def pil_to_tensor(pic):
    return torch.as_tensor(np.array(pic)).permute(2, 0, 1).contiguous()

def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    # torchvision.transforms.v2.functional.resize_image, bilinear/bicubic branch
    assert interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC), interpolation
    shape = image.shape
    c, h, w = shape[-3:]
    new_h, new_w = size
    if (new_h, new_w) == (h, w):
        return image
    image = image.reshape(-1, c, h, w)
    dtype = image.dtype
    acceptable = [torch.float32, torch.float64]
    if interpolation == InterpolationMode.BICUBIC or "AVX2" in torch.backends.cpu.get_cpu_capability():
        acceptable.append(torch.uint8)
    need_cast = dtype not in acceptable
    if need_cast:
        image = image.to(torch.float32)
    image = interpolate(image, size=[new_h, new_w], mode=interpolation.value, align_corners=False,
                        antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            image = image.round_()
        image = image.to(dtype=dtype)
    return image.reshape(shape[:-3] + (c, new_h, new_w))

def normalize(tensor, mean, std, inplace=False):
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)

def grayscale_to_rgb(image):
    if image.shape[-3] >= 3:
        return image
    return image.repeat(*([1] * (image.ndim - 3)), 3, 1, 1)
'''

TV_FILES = {
    "torchvision-0.28.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n",
    "torchvision-0.28.0.dist-info/RECORD": "",
    "torchvision/__init__.py": "__version__ = '0.28.0'\nfrom . import transforms, ops, io\n",
    "torchvision/io.py": "class ImageReadMode:\n    RGB = 3\n\ndef decode_image(*a, **k):\n    raise NotImplementedError\n",
    "torchvision/ops/__init__.py": "from . import boxes\n",
    "torchvision/ops/boxes.py": "def batched_nms(*a, **k):\n    raise NotImplementedError('not used here')\n",
    "torchvision/transforms/__init__.py": "from .functional import InterpolationMode\nfrom . import v2\n",
    "torchvision/transforms/functional.py": TV_FUNCTIONAL,
    "torchvision/transforms/v2/__init__.py": "from . import functional\n",
    "torchvision/transforms/v2/functional.py": "from ..functional import *  # noqa\n",
}

REFERENCE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerFast
    from transformers.models.sam3 import image_processing_sam3 as ips
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
    from transformers.models.sam3.processing_sam3 import Sam3Processor
    from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

    a = json.loads(sys.argv[1])
    out = {}
    size = a["size"]
    image_processor = Sam3ImageProcessor(size={"height": size, "width": size})
    for i, path in enumerate(a["images"]):
        with Image.open(path) as im:
            out[f"pixel_values.{i}"] = image_processor(images=im, return_tensors="pt").pixel_values.numpy()
    tok = PreTrainedTokenizerFast(tokenizer_file=a["tokenizer"], pad_token="<|endoftext|>",
                                  bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>")
    proc = Sam3Processor(image_processor=image_processor, tokenizer=tok)
    with Image.open(a["images"][0]) as im:
        enc = proc(images=im, text=a["text"], input_boxes=[a["boxes"]], input_boxes_labels=[a["labels"]],
                   return_tensors="pt")
    for k in ("input_ids", "attention_mask", "input_boxes", "input_boxes_labels"):
        out["processor." + k] = enc[k].numpy()
    raw = dict(np.load(a["raw"]))
    for case in a["post"]:
        o = Sam3ImageSegmentationOutput(
            pred_logits=torch.from_numpy(raw["pred_logits"]), pred_boxes=torch.from_numpy(raw["pred_boxes"]),
            pred_masks=torch.from_numpy(raw["pred_masks"]),
            presence_logits=torch.from_numpy(raw["presence_logits"]))
        res = image_processor.post_process_instance_segmentation(
            o, threshold=case["threshold"], mask_threshold=case["mask_threshold"], target_sizes=[case["size"]])[0]
        tag = case["tag"]
        for k in ("scores", "boxes", "masks"):
            out[f"post.{tag}.{k}"] = res[k].numpy()
        out[f"post.{tag}.probs"] = torch.nn.functional.interpolate(
            torch.from_numpy(raw["pred_masks"]).sigmoid(), size=case["size"], mode="bilinear",
            align_corners=False)[0].numpy()
        # the original SAM 3 (Sam3Processor._forward_grounding): logits resized, then sigmoid
        orig = torch.nn.functional.interpolate(
            torch.from_numpy(raw["pred_masks"]), size=case["size"], mode="bilinear",
            align_corners=False)[0].sigmoid()
        out[f"post.{tag}.orig_probs"] = orig.numpy()
        out[f"post.{tag}.orig_masks"] = (orig > case["mask_threshold"]).numpy()
    masks = torch.from_numpy(np.load(a["rle_masks"]))
    for i, r in enumerate(ips._mask_to_rle(masks)):
        out[f"rle.{i}"] = np.asarray(r["counts"], np.int64)
    np.savez(a["out"], **out)
''')


def run_reference(folder: str, args: dict) -> dict:
    for rel, text in TV_FILES.items():
        p = os.path.join(folder, "tv", rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
    script = os.path.join(folder, "reference.py")
    with open(script, "w") as f:
        f.write(REFERENCE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(folder, "tv"), ROOT]))
    r = subprocess.run([PY, script, json.dumps(args)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"reference run failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return dict(np.load(args["out"]))


def random_raw(seed: int = 0, queries: int = 12, mask_hw=(24, 20)):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, 0.6, (1, queries, 2))
    wh = rng.uniform(0.05, 0.4, (1, queries, 2))
    # smooth mask logits (a bump per query) so masks have real shapes
    yy, xx = np.mgrid[0:mask_hw[0], 0:mask_hw[1]]
    cy, cx = rng.uniform(0, mask_hw[0], queries), rng.uniform(0, mask_hw[1], queries)
    r = rng.uniform(2, 8, queries)
    d = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
    masks = (r[:, None, None] - d) + rng.normal(0, 0.3, d.shape)
    return {
        "pred_logits": rng.normal(0, 2, (1, queries)).astype(np.float32),
        "pred_boxes": np.concatenate([x0, x0 + wh], -1).astype(np.float32),
        "pred_masks": masks[None].astype(np.float32),
        "presence_logits": np.array([[0.7]], np.float32),
    }


POST_CASES = [
    {"tag": "up", "threshold": 0.3, "mask_threshold": 0.5, "size": [100, 160]},
    {"tag": "down", "threshold": 0.1, "mask_threshold": 0.4, "size": [17, 13]},
    {"tag": "none", "threshold": 0.999, "mask_threshold": 0.5, "size": [50, 60]},
]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(art, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    grey = str(folder / "grey.png")
    from PIL import Image

    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((301, 77)) * 255).astype(np.uint8), "L").save(grey)
    rgba = str(folder / "rgba.png")
    Image.fromarray((rng.random((40, 90, 4)) * 255).astype(np.uint8), "RGBA").save(rgba)
    big = write_test_image(str(folder / "big.jpg"), 700, 1000, seed=9)
    raw = random_raw()
    np.savez(str(folder / "raw.npz"), **raw)
    rle_masks = np.zeros((3, 9, 7), bool)
    rle_masks[0, 2:5, 1:4] = True
    rle_masks[1] = True
    rle_masks[2, 0, 0] = rle_masks[2, 8, 6] = True
    np.save(str(folder / "rle_masks.npy"), rle_masks)
    images = [art["image"], grey, rgba, big]
    out = run_reference(str(folder), {
        "size": Sam3Config.from_pretrained(art["snapshot"]).image_size, "images": images,
        "tokenizer": os.path.join(art["snapshot"], "tokenizer.json"), "text": PROMPT,
        "boxes": BOXES, "labels": BOX_LABELS, "raw": str(folder / "raw.npz"), "post": POST_CASES,
        "rle_masks": str(folder / "rle_masks.npy"), "out": str(folder / "ref.npz")})
    return {"out": out, "images": images, "raw": raw, "rle_masks": rle_masks}


# ----------------------------------------------------------------------------
# pre-processing
# ----------------------------------------------------------------------------
def test_preprocess_matches_sam3_image_processor(art, reference):
    size = Sam3Config.from_pretrained(art["snapshot"]).image_size
    for i, path in enumerate(reference["images"]):
        ours, (h, w) = preprocess_image(path, size)
        ref = reference["out"][f"pixel_values.{i}"]
        assert ours.shape == ref.shape == (1, 3, size, size), path
        assert ours.dtype == np.float32
        diff = np.abs(ours - ref)
        assert diff.max() <= LEVEL + 1e-6, f"{path}: max diff {diff.max()} > one uint8 level"
        # off-by-one rounding is the exception, not the rule
        assert diff.mean() <= 0.25 * LEVEL, f"{path}: mean diff {diff.mean() / LEVEL:.3f} levels"


def test_preprocess_inputs_agree(art):
    """Path, PIL image and uint8 array give the same pixels; bad inputs are refused clearly."""
    from PIL import Image

    size = Sam3Config.from_pretrained(art["snapshot"]).image_size
    by_path, hw = preprocess_image(art["image"], size)
    with Image.open(art["image"]) as im:
        arr = np.asarray(im.convert("RGB"))
        by_pil, _ = preprocess_image(im, size)
    by_array, _ = preprocess_image(arr, size)
    assert hw == arr.shape[:2]
    np.testing.assert_array_equal(by_path, by_pil)
    np.testing.assert_array_equal(by_path, by_array)
    with pytest.raises(InputError, match="uint8"):
        preprocess_image(arr.astype(np.float32), size)
    with pytest.raises(InputError, match="HxWx3"):
        preprocess_image(np.zeros((4, 4, 5), np.uint8), size)
    with pytest.raises(InputError, match="no such file"):
        preprocess_image(art["image"] + ".missing", size)


def test_box_prompt_encoding_matches_sam3_processor(art, reference):
    out = reference["out"]
    boxes, labels = check_boxes(BOXES, BOX_LABELS, (100, 160))
    np.testing.assert_allclose(boxes_to_model(boxes, (100, 160)), out["processor.input_boxes"][0],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, out["processor.input_boxes_labels"][0])
    assert parse_box("1,2,3.5,4:neg") == ((1.0, 2.0, 3.5, 4.0), 0)
    assert parse_box(" 1, 2, 3, 4 ") == ((1.0, 2.0, 3.0, 4.0), 1)
    for bad, msg in [("1,2,3", "4 numbers"), ("1,2,3,x", "not a number"), ("1,2,3,4:maybe", "label")]:
        with pytest.raises(InputError, match=msg):
            parse_box(bad)
    for bad, msg in [([[5, 5, 5, 9]], "x0 < x1"), ([[0, 0, 1, float("nan")]], "finite"),
                     ([[200, 0, 300, 10]], "outside")]:
        with pytest.raises(InputError, match=msg):
            check_boxes(bad, None, (100, 160))


def test_tokenizer_matches_sam3_processor(art, reference):
    from sam3_nn.runtime.api import Sam3

    out = reference["out"]
    ctx = Sam3Config.from_pretrained(art["snapshot"]).text.max_position_embeddings
    # found beside the weights when they are an HF snapshot
    ids, mask = Sam3.load(art["library"], art["snapshot"]).tokenize(PROMPT)
    assert ids.shape == mask.shape == (1, ctx)
    ref_ids, ref_mask = out["processor.input_ids"][0], out["processor.attention_mask"][0]
    n = int(ref_mask.sum())
    assert 2 < n <= ctx
    # the processor pads to 32; the library's text length is the model's (16 here)
    np.testing.assert_array_equal(ids[0], ref_ids[:ctx])
    np.testing.assert_array_equal(mask[0], ref_mask[:ctx])


# ----------------------------------------------------------------------------
# post-processing and RLE
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", POST_CASES, ids=[c["tag"] for c in POST_CASES])
def test_postprocess_follows_the_original(reference, case):
    """Scores and boxes as transformers' post-processing (the same rule as the original's);
    masks as the original's (logits resized, then sigmoid), which transformers' are not
    (sigmoid, then resized)."""
    out, tag = reference["out"], case["tag"]
    det = post_process_instances(reference["raw"], tuple(case["size"]), case["threshold"], case["mask_threshold"])
    ref_scores = out[f"post.{tag}.scores"]
    assert len(det) == len(ref_scores)
    if tag == "none":
        assert len(det) == 0
        return
    assert len(det) >= 2, "the case must keep some objects to test anything"
    np.testing.assert_allclose(det.scores, ref_scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(det.boxes, out[f"post.{tag}.boxes"], rtol=1e-6, atol=1e-4)
    ref_masks = out[f"post.{tag}.orig_masks"][det.query_index]
    assert det.masks.shape == ref_masks.shape
    probs = out[f"post.{tag}.orig_probs"][det.query_index]
    differ = det.masks != ref_masks
    assert not (differ & (np.abs(probs - case["mask_threshold"]) > 1e-6)).any()
    assert ref_masks.any() and (~ref_masks).any()
    # the port's masks move edges when upsampling: a regression to its order would be caught
    port = out[f"post.{tag}.masks"].astype(bool)
    if tag == "up":
        assert (port != ref_masks).sum() >= 5


def test_bilinear_resize_matches_torch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 288, 288)).astype(np.float32)
    for size in [(1000, 1500), (288, 288), (100, 77), (289, 1)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear",
                                              align_corners=False)[0].numpy()
        np.testing.assert_allclose(resize_bilinear(x, size), ref, rtol=0, atol=2e-6)


def test_rle_round_trip_and_counts_match_transformers(reference):
    """``rle`` (pycocotools) against transformers' uncompressed counts, and the compressed string
    form (the JSON of ``segment`` and the C++ app) against hand-derived strings."""
    masks = reference["rle_masks"]
    for i, m in enumerate(masks):
        counts = [int(c) for c in reference["out"][f"rle.{i}"]]
        enc = rle.encode(m)
        assert isinstance(enc["counts"], str) and enc["size"] == list(m.shape)
        np.testing.assert_array_equal(rle.decode(enc), m)
        np.testing.assert_array_equal(rle.decode({"size": enc["size"], "counts": counts}), m)
        assert rle.encode(rle.decode({"size": enc["size"], "counts": counts})) == enc
    rng = np.random.default_rng(2)
    stack = rng.random((4, 37, 53)) < 0.3
    stack[:, :, :20] |= rng.random((4, 37, 20)) < 0.9  # long runs: big counts
    many = rle.encode_many(stack)
    for m, e in zip(stack, many):
        assert e == rle.encode(m)
        np.testing.assert_array_equal(rle.decode(e), m)
    np.testing.assert_array_equal(rle.area(many), stack.reshape(4, -1).sum(1))
    # column-major runs 0,1,1,1 -> counts [1, 3] -> one character each, count + 48
    assert rle.encode(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": "13"}
    # counts [2, 3, 2, 5]: the fourth is written as its difference to the second (5 - 3)
    m = np.asarray([0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1], bool).reshape((3, 4), order="F")
    assert rle.encode(m) == {"size": [3, 4], "counts": "2322"}
    # runs of 50000 need several 5-bit characters
    long = np.zeros((1000, 100), bool)
    long[:, 50:] = True
    assert rle.decode(rle.encode(long)).sum() == 50000


def test_rle_iou_of_masks_and_boxes():
    a = np.zeros((3, 10, 10), bool)
    a[0, :5, :] = True  # 50 px
    a[1, :, :] = True  # 100 px
    a[2, 5:, 5:] = True  # 25 px, disjoint from a[0]
    r = rle.encode_many(a)
    np.testing.assert_allclose(rle.iou(r, r), [[1, .5, 0], [.5, 1, .25], [0, .25, 1]])
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 40]], np.float32)
    np.testing.assert_allclose(rle.box_iou(boxes, boxes), [[1, 50 / 150, 0], [50 / 150, 1, 0], [0, 0, 1]])


# ----------------------------------------------------------------------------
# weights: converted file, HF snapshot, mismatches
# ----------------------------------------------------------------------------
def _manifest(art):
    with open(art["manifest"]) as f:
        return json.load(f)


def test_converted_equals_snapshot_and_metadata(art):
    from safetensors import safe_open

    from sam3_nn.runtime.api import config_fingerprint, load_weights

    manifest = _manifest(art)
    a = load_weights(art["converted"], manifest)
    b = load_weights(art["snapshot"], manifest)
    assert sorted(a) == sorted(b) == sorted(p["name"] for p in manifest["params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with safe_open(art["converted"], framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "sam3_nn" and meta["dtype"] == manifest["dtype"]
    assert meta["config_sha256"] == config_fingerprint(manifest["config"])


def test_weights_mismatch_errors(art, tmp_path):
    from safetensors.numpy import save_file

    from sam3_nn.runtime.api import Sam3, load_weights
    from sam3_nn.weights import load_converted

    manifest = _manifest(art)
    other = json.loads(json.dumps(manifest))
    other["config"]["vision"]["backbone"]["rope_theta"] = 500.0  # changes no shape: only the config shows it
    with pytest.raises(LibraryError, match="rope_theta"):
        load_weights(art["converted"], other)
    with pytest.raises(LibraryError, match="different model.*rope_theta"):
        load_weights(art["snapshot"], other)
    # another image size takes the same weights
    resized = json.loads(json.dumps(manifest))
    resized["config"]["vision"]["backbone"]["image_size"] = 336
    assert len(load_weights(art["converted"], resized)) == len(manifest["params"])
    half = dict(manifest, dtype="float16")
    with pytest.raises(LibraryError, match="float32 but the library is compiled for float16"):
        load_weights(art["converted"], half)
    # a parameter set that does not fit: the library's manifest beside a copy of the library
    params, meta = load_converted(art["converted"])
    dropped = sorted(params)[0]
    del params[dropped]
    short = str(tmp_path / "short.safetensors")
    save_file(params, short, metadata=meta)
    with pytest.raises(LibraryError, match=f"missing 1: {dropped}"):
        Sam3.load(art["library"], short)
    pt = tmp_path / "sam3.pt"
    pt.write_bytes(b"not used")
    with pytest.raises(LibraryError, match="python -m sam3_nn convert"):
        load_weights(str(pt), manifest)
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, plain)
    with pytest.raises(LibraryError):
        load_weights(plain, manifest)
    with pytest.raises(LibraryError, match="do not exist"):
        load_weights(str(tmp_path / "nothing"), manifest)


# ----------------------------------------------------------------------------
# the runtime against transformers' Sam3Model
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(art):
    from transformers import Sam3Model

    return Sam3Model.from_pretrained(art["snapshot"]).eval()


@pytest.fixture(scope="module")
def runtime(art):
    from sam3_nn.runtime.api import Sam3

    return Sam3.load(art["library"], art["converted"], tokenizer=art["snapshot"])


def test_image_features_match_sam3_model(art, hf_model, runtime):
    state = runtime.set_image(art["image"])
    assert state.original_size == (100, 160)
    pixels, _ = runtime.preprocess(art["image"])
    with torch.no_grad():
        ref = hf_model.vision_encoder(torch.from_numpy(pixels))
    ours = runtime.image_features(state)
    assert len(ours) == len(ref.fpn_hidden_states)
    for i, (a, b) in enumerate(zip(ours, ref.fpn_hidden_states)):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"fpn level {i}")
    # the state is reusable and position encodings are cached
    assert runtime.position_encodings() is runtime.position_encodings()


def test_text_features_match_sam3_model(art, hf_model, runtime):
    needs(art, "encode_text")
    feats, mask = runtime.encode_text(PROMPT)
    assert runtime.encode_text(PROMPT)[0] is feats  # cached per prompt
    ids, attn = runtime.tokenize(PROMPT)
    with torch.no_grad():
        ref = hf_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                         attention_mask=torch.from_numpy(attn.astype(np.int64)))
    np.testing.assert_allclose(feats.numpy(), ref.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_predict_matches_sam3_model(art, hf_model, runtime, reference, monkeypatch):
    """Against transformers' Sam3Model run as the original runs a text-only query: one padded
    box slot (label -10) makes it encode an empty geometric prompt, whose CLS token the
    original keeps (docs/fidelity.md); its box pooling gets the pure-torch RoIAlign."""
    import types

    from tests import torch_roi_align
    from transformers.models.sam3 import modeling_sam3

    needs(art, "encode_text", "detect")
    monkeypatch.setattr(modeling_sam3, "torchvision",
                        types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=torch_roi_align.roi_align)),
                        raising=False)
    state = runtime.set_image(art["image"])
    pixels, _ = runtime.preprocess(art["image"])
    ids, attn = runtime.tokenize(PROMPT)
    raw = runtime.detect(state, text=PROMPT)
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(attn.astype(np.int64)),
                       input_boxes=torch.zeros(1, 1, 4), input_boxes_labels=torch.full((1, 1), -10))
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg"):
        if name in raw:
            np.testing.assert_allclose(raw[name], getattr(ref, name).numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        assert name in raw, f"detect lacks {name}"
    det = runtime.predict(state, text=PROMPT, score_threshold=0.0)
    assert len(det) == raw["pred_logits"].shape[1]  # threshold 0 keeps every query
    ref_scores = torch.sigmoid(ref.pred_logits[0]) * torch.sigmoid(ref.presence_logits[0])
    np.testing.assert_allclose(det.scores, ref_scores.numpy(), rtol=1e-3, atol=1e-5)
    assert det.masks.shape[1:] == (100, 160)
    with pytest.raises(InputError, match="prompt"):
        runtime.predict(state)


# ----------------------------------------------------------------------------
# runtime-only TVM (no libtvm_compiler.so)
# ----------------------------------------------------------------------------
RUNTIME_ONLY = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tvm
    assert tvm.base._RUNTIME_ONLY, "the compiler library was found"
    from sam3_nn.runtime.api import Sam3
    a = json.loads(sys.argv[1])
    model = Sam3.load(a["library"], a["converted"], tokenizer=a["tokenizer"])
    state = model.set_image(a["image"])
    np.savez(a["out"], *model.image_features(state))
    if a["detect"]:
        det = model.predict(state, text=a["text"], score_threshold=0.0)
        np.save(a["out_scores"], det.scores)
    bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "tvm.relax", "transformers"))
                 or m in ("sam3_nn.compiler.build", "sam3_nn.model.sam3", "sam3_nn.compiler.presets"))
    assert not bad, f"runtime imported {bad}"
    try:
        from tvm import relax  # noqa
    except Exception:  # ImportError or a missing compiler function: either way no compiler
        pass
    else:
        raise SystemExit("tvm.relax imported in runtime-only mode")
    print("runtime-only ok")
''')


def runtime_only_tvm(folder: str) -> str:
    """A copy of the tvm package (symlinks) without lib/libtvm_compiler.so, beside ``torch`` and
    ``transformers`` packages that refuse to import (tvm_ffi imports torch when it can)."""
    import tvm

    for hidden in ("torch", "transformers"):
        os.makedirs(os.path.join(folder, hidden))
        with open(os.path.join(folder, hidden, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('{hidden} is hidden from the runtime under test')\n")

    src = os.path.dirname(tvm.__file__)
    dst = os.path.join(folder, "tvm")
    os.makedirs(os.path.join(dst, "lib"))
    for name in os.listdir(src):
        if name != "lib":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    for name in os.listdir(os.path.join(src, "lib")):
        if "compiler" not in name:
            os.symlink(os.path.join(src, "lib", name), os.path.join(dst, "lib", name))
    return folder


def test_runtime_without_tvm_compiler(art, runtime, tmp_path):
    site = runtime_only_tvm(str(tmp_path / "site"))
    script = tmp_path / "run.py"
    script.write_text(RUNTIME_ONLY)
    has_detect = "detect" in art["functions"] and "encode_text" in art["functions"]
    args = {"library": art["library"], "converted": art["converted"], "image": art["image"],
            "out": str(tmp_path / "features.npz"), "out_scores": str(tmp_path / "scores.npy"),
            "detect": has_detect, "text": PROMPT, "tokenizer": art["snapshot"]}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, ROOT]))
    r = subprocess.run([PY, str(script), json.dumps(args)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    assert "runtime-only ok" in r.stdout
    theirs = np.load(args["out"])
    ours = runtime.image_features(runtime.set_image(art["image"]))
    for i, a in enumerate(ours):
        np.testing.assert_array_equal(theirs[f"arr_{i}"], a)
    if has_detect:
        det = runtime.predict(runtime.set_image(art["image"]), text=PROMPT, score_threshold=0.0)
        np.testing.assert_array_equal(np.load(args["out_scores"]), det.scores)


def test_normalize_matches_the_processor_arithmetic():
    """``normalize`` (a table lookup) equals ``(x / 255 - 0.5) / 0.5`` for every byte value,
    as float32 and float16, laid out 3xHxW."""
    from sam3_nn.runtime.preprocess import normalize

    rgb = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1)[:, :, :1]
    rgb = np.concatenate([rgb, 255 - rgb, (rgb * 7) % 256], -1).astype(np.uint8)  # [256, 3, 3]
    expected = (rgb.astype(np.float64) / 255.0 - 0.5) / 0.5
    expected = expected.transpose(2, 0, 1)
    out32 = normalize(rgb)
    assert out32.dtype == np.float32 and out32.shape == (3, 256, 3)
    np.testing.assert_allclose(out32, expected, rtol=0, atol=1e-6)
    out16 = normalize(rgb, np.float16)
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    np.testing.assert_allclose(out16.astype(np.float64), expected, rtol=0, atol=1e-3)
