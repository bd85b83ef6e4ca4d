"""``Sam3.predict_points``: clicks / a box / a mask from pixels of the original image to masks at
its size, against ``Sam3TrackerModel`` on the same pixels; one image encoding serves many
decodes; bad prompts are clear errors.

The library and the reference are the session's tiny interactive ones (``conftest.py``); the
weights are read from the HF ``Sam3TrackerModel`` snapshot (converted in memory). Tolerances:
raw outputs rtol 1e-4 / atol 5e-5 (float32; the click coordinates reach the model as the
original's ``x / w * S``, the port's processor computes ``x * (S / w)``: at most one float32
ulp apart, measured effect < 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.model.test_interactive import reference, reference_embeddings
from tests.refs import assert_close, tracker_processor
from sam3_nn.runtime.interactive import InputError, to_model_coords

SIZE = (100, 130)  # (h, w) of the test image: not square, the resize squashes it


@pytest.fixture(scope="module")
def app(tiny_interactive):
    from sam3_nn.runtime.api import Sam3

    model = Sam3.load(tiny_interactive["library"], tiny_interactive["snapshot"])
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    return model, image, tiny_interactive["hf"]


def test_coordinates_as_the_original():
    """``x / w * S`` in float32 (``SAM2Transforms.transform_coords``), and within one ulp of the
    port's processor (``x * (S / w)``)."""
    pts = np.array([[0.0, 0.0], [129.75, 99.5], [17.3, 41.9], [64.0, 50.0]], np.float32)
    ours = to_model_coords(pts, SIZE, 168)
    t = torch.from_numpy(pts.copy())
    t[:, 0] = t[:, 0] / SIZE[1]
    t[:, 1] = t[:, 1] / SIZE[0]
    np.testing.assert_array_equal(ours, (t * 168).numpy())
    port = torch.from_numpy(pts.copy())[None, None]
    tracker_processor()._normalize_tensor_coordinates(port, [list(SIZE)], preserve_padding=True)
    np.testing.assert_allclose(ours, port[0, 0].numpy(), rtol=2 ** -23, atol=0)


def _ref(model, hf, image, points, labels, box, mask, multimask):
    pixels, _ = model.preprocess(image)
    embeds = reference_embeddings(hf, torch.from_numpy(pixels))
    p = to_model_coords(np.asarray(points, np.float32), SIZE, 168) if points is not None else None
    b = to_model_coords(np.asarray(box, np.float32).reshape(2, 2), SIZE, 168).reshape(4) \
        if box is not None else None
    return reference(hf, embeds, p, labels, b, mask, multimask)


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_points_matches_reference(app, multimask):
    model, image, hf = app
    state = model.set_image(image)
    cases = [([[40.0, 30.0]], [1], None), ([[40.0, 30.0], [90.5, 70.0], [10.0, 80.0]], [1, 0, 1], None),
             (None, None, [15.0, 20.0, 110.0, 90.0]), ([[60.0, 50.0]], [0], [15.0, 20.0, 110.0, 90.0])]
    prev = None
    for points, labels, box in cases:
        res = model.predict_points(state, points, labels, box=box, mask_input=prev, multimask=multimask)
        ref = _ref(model, hf, image, points, labels, box, prev, multimask)
        take = slice(1, 4) if multimask else slice(0, 1)
        assert_close(res.raw["pred_masks"][:, take], ref[0], 1e-4, 5e-5, "pred_masks")
        assert_close(res.scores[None], ref[1], 1e-4, 5e-5, "iou_scores")
        assert np.isclose(res.object_score, float(ref[2]), rtol=1e-4, atol=5e-5)
        assert res.masks.shape == (3 if multimask else 1, *SIZE) and res.masks.dtype == bool
        assert res.low_res_logits.shape == (len(res), 48, 48)
        assert np.abs(res.low_res_logits).max() <= 32
        prev = res.low_res_logits[res.best]  # refine with the next prompt


def test_many_decodes_reuse_one_encoding(app):
    """Any number of prompts (clicks, refinements, boxes) on one ``set_image``: one
    ``encode_image`` call; each decode gives what it gives on a fresh encoding."""
    model, image, _ = app
    calls = []
    real = model.model.call_device

    def counting(function, *args):
        calls.append(function)
        return real(function, *args)

    model.model.call_device = counting
    try:
        state = model.set_image(image)
        results, prev = [], None
        for k in range(6):
            pts = [[10.0 + 15 * k, 20.0 + 10 * k]]
            r = model.predict_points(state, pts, [k % 2], mask_input=prev)
            results.append((pts, [k % 2], prev, r))
            prev = r.low_res_logits[r.best]
        r = model.predict_points(state, box=[5.0, 5.0, 100.0, 90.0], multimask=False)
    finally:
        model.model.call_device = real
    assert calls.count("encode_image") == 1
    assert calls.count("predict_masks") == 7
    fresh = model.set_image(image)
    for pts, labels, prev, r in results:
        again = model.predict_points(fresh, pts, labels, mask_input=prev)
        np.testing.assert_array_equal(again.raw["pred_masks"], r.raw["pred_masks"])
        np.testing.assert_array_equal(again.masks, r.masks)


def test_bad_prompts_are_clear_errors(app):
    model, image, _ = app
    state = model.set_image(image)
    bad = [
        (dict(), "give a prompt"),
        (dict(points=[[1.0, 2.0]] * 9), "at most 8 points"),
        (dict(points=[[1.0, 2.0]] * 7, box=[1.0, 1.0, 5.0, 5.0]), "at most 8 points"),
        (dict(points=[[1.0, 2.0]], labels=[2]), "1 \\(positive\\) or 0 \\(negative\\)"),
        (dict(points=[[1.0, 2.0]], labels=[1, 0]), "1 points but 2 point labels"),
        (dict(points=[[500.0, 2.0]]), "outside the 130x100 image"),
        (dict(points=[[float("nan"), 2.0]]), "finite"),
        (dict(points=[[1.0, 2.0, 3.0]]), "\\(x, y\\)"),
        (dict(labels=[1]), "labels given without points"),
        (dict(box=[10.0, 10.0, 5.0, 20.0]), "x0 < x1"),
        (dict(box=[[1, 2, 3, 4], [5, 6, 7, 8]]), "one \\[x0, y0, x1, y1\\]"),
        (dict(mask_input=np.zeros((32, 32), np.float32)), "48x48 low-resolution logits"),
        (dict(mask_input=np.full((48, 48), np.inf, np.float32)), "finite"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InputError, match=message):
            model.predict_points(state, **kwargs)


def test_parse_point():
    from sam3_nn.runtime.interactive import parse_point

    assert parse_point("12,34.5") == ((12.0, 34.5), 1)
    assert parse_point(" 1 , 2 :neg") == ((1.0, 2.0), 0)
    assert parse_point("1,2:pos") == ((1.0, 2.0), 1)
    for text, message in (("1", "x,y"), ("1,2,3", "x,y"), ("a,2", "not a number"), ("1,2:maybe", "':pos' or ':neg'")):
        with pytest.raises(InputError, match=message):
            parse_point(text)
