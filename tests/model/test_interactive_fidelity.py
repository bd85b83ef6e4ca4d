"""Interactive segmentation against the original SAM 3 itself: ``Sam3Image.predict_inst``
(``tests/original_ref.py``: the original's image model with its tracker neck, the tracker's
SAM heads built as ``_build_sam_heads`` builds them, its interactive image predictor) vs
our ``Sam3.predict_points`` on our library, the weights saved in the released ``sam3.pt``
layout and read through our converter.

Whole path compared: pixel coordinates of the original image to the model input, a box as
two corner points before the clicks, the padding point, the tracker neck with ``conv_s0`` /
``conv_s1`` and ``no_mem_embed``, the SAM heads, multimask or the dynamic single mask, the
post-processing (256-pixel hole filling on the low-res logits, then the resize; the
original labels components with ``skimage.measure.label``, replaced here by a flood fill
of the same connectivity since scikit-image is not installed) and the +-32 clamp of the
returned low-res logits. Every parameter random; float32. Tolerances: IoU and low-res
logits rtol 1e-4 / atol 5e-5; masks at the image size equal except where the original's
resized logit is within 1e-4 of the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import original_ref as R
from tests.refs import assert_close, expected_params, randomize_

SIZE = (100, 130)  # original image (h, w)
RTOL, ATOL = 1e-4, 5e-5


@pytest.fixture(scope="module")
def setup(tiny_interactive, tmp_path_factory):
    from sam3_nn.runtime.api import ImageState, Sam3
    from sam3_nn.runtime.engine import CompiledModel
    from sam3_nn.weights import load_params, open_checkpoint

    image_model = randomize_(R.build_tiny(sam2_neck=True), seed=2)
    tracker = randomize_(R.TinyTracker().eval(), seed=3)
    with torch.no_grad():  # a buffer, not a parameter: random too, at the init's scale
        tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_()
    path = str(tmp_path_factory.mktemp("pt") / "sam3.pt")
    torch.save({"model": {**R.release_layout(image_model), **R.tracker_release_layout(tracker)}}, path)
    cfg = tiny_interactive["cfg"]  # the session's library: the same sizes (refs.TINY_TRACKER)
    lib = CompiledModel(tiny_interactive["library"])
    params, report = load_params(cfg, open_checkpoint(path), expected_params(lib), lib.manifest["parts"])
    lib.bind(params)
    pixels = torch.randn(1, 3, 168, 168, generator=torch.Generator().manual_seed(5))
    feats = lib.call_device("encode_image", pixels.numpy())
    state = ImageState(SIZE, np.zeros((*SIZE, 3), np.uint8), [], tracker_features=feats)
    return dict(image_model=image_model, tracker=tracker, pixels=pixels, app=Sam3(lib), state=state,
                report=report)


def test_release_layout_mapped(setup):
    """The pt layout's tracker tensors are all taken; what is left has its reason."""
    report = setup["report"]
    assert not any("unexpected" in r for r in report.unused)
    used = {n for names in report.mapped.values() for n in names}
    assert any(n.startswith("tracker.sam_mask_decoder.") for n in used)
    assert "tracker.no_mem_embed" in used


CASES = {
    "1 click": dict(point_coords=[[40.0, 30.0]], point_labels=[1]),
    "3 clicks": dict(point_coords=[[40.0, 30.0], [95.5, 70.0], [10.0, 80.0]], point_labels=[1, 0, 1]),
    "box": dict(box=[15.0, 20.0, 110.0, 90.0]),
    "box + clicks": dict(point_coords=[[60.0, 50.0], [20.0, 25.0]], point_labels=[1, 0],
                         box=[15.0, 20.0, 110.0, 90.0]),
}


def ours(setup, kw, multimask, mask_input=None):
    return setup["app"].predict_points(setup["state"], kw.get("point_coords"), kw.get("point_labels"),
                                       box=kw.get("box"), mask_input=mask_input, multimask=multimask)


def check(got, setup, kw, multimask, mask_input=None, what=""):
    args = dict(kw, multimask_output=multimask, mask_input=mask_input)
    if mask_input is not None:
        args["mask_input"] = mask_input[None]
    masks, ious, low = R.predict_inst(setup["image_model"], setup["tracker"], setup["pixels"], SIZE, **args)
    logits, _, _ = R.predict_inst(setup["image_model"], setup["tracker"], setup["pixels"], SIZE,
                                  return_logits=True, **args)
    assert_close(got.scores, ious, RTOL, ATOL, f"{what}: iou")
    assert_close(got.low_res_logits, low, RTOL, ATOL, f"{what}: low-res logits")
    assert got.masks.shape == masks.shape
    differ = got.masks != masks
    assert (np.abs(logits[differ]) < 1e-4).all(), f"{what}: {int(differ.sum())} mask pixels differ"
    return low


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_predict_inst(setup, case, multimask):
    check(ours(setup, CASES[case], multimask), setup, CASES[case], multimask, what=case)


def test_refinement_with_previous_logits(setup):
    """The next call takes the best previous low-res logits (as returned: clamped) as the
    mask prompt, with a further click; then the mask alone."""
    first = ours(setup, CASES["1 click"], True)
    prev = first.low_res_logits[first.best]
    kw = dict(point_coords=[[40.0, 30.0], [90.0, 20.0]], point_labels=[1, 0])
    check(ours(setup, kw, False, prev), setup, kw, False, prev, "refined")
    check(ours(setup, {}, True, prev), setup, {}, True, prev, "mask alone")


def test_hole_filling_happens(setup):
    """The case has holes the filling changes (so the comparisons above cover it)."""
    from sam3_nn.runtime.interactive import fill_holes

    got = ours(setup, CASES["3 clicks"], True)
    low = got.raw["pred_masks"][0, 1:]
    assert any((fill_holes(m, 256) != m).any() for m in low)
