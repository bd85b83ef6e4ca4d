"""End-to-end parity: transformers Sam3Model vs our library (encode_image -> encode_text -> detect).

Random weights, tiny config, float32, llvm. Cases: text only (batch 2, one padded
prompt), boxes only (positive and negative), text + boxes with a different number
of boxes per image (empty slots masked), compared on all five raw outputs.
Text only follows the original SAM 3, not the port: the reference is transformers'
model made to run its geometry encoder on no box (one padded slot, label -10), so the
prompt ends with the geometry CLS token as the original's does; the port's own
text-only answer (no geometry tokens) is shown to differ (docs/fidelity.md;
tests/test_fidelity.py compares with the original package itself).
Tolerance: rtol 1e-4, atol 1e-4 (mask logits are sums over many products).
The reference's box pooling calls torchvision.ops.roi_align, which does not import
here: it is given tests/torch_roi_align.py (checked by hand in test_roi_align.py).
"""

import types

import numpy as np
import pytest
import torch

from tests import torch_roi_align
from tests.refs import assert_close, compile_library, expected_params, randomize_, save_hf_snapshot, tiny_hf_config
from sam3_nn.config import Sam3Config
from sam3_nn.model.sam3 import MAX_BOXES
from sam3_nn.weights import load_params, open_checkpoint

RTOL, ATOL = 1e-4, 1e-4
OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import Sam3Model as HFSam3Model

    hf = randomize_(HFSam3Model(tiny_hf_config()).eval(), seed=3)
    folder = save_hf_snapshot(hf, str(tmp_path_factory.mktemp("hf_sam3")))
    cfg = Sam3Config.from_pretrained(folder)
    lib = compile_library(cfg, str(tmp_path_factory.mktemp("lib")))
    params, report = load_params(cfg, open_checkpoint(folder), expected_params(lib), lib.manifest["parts"])
    lib.bind(params)
    torch.manual_seed(7)
    pixels = torch.randn(2, 3, 168, 168)
    ids = torch.randint(1, 990, (2, 16))
    ids[:, 0] = 998
    mask = torch.ones(2, 16, dtype=torch.long)
    ids[0, 9] = 999
    mask[0, 10:] = 0  # first prompt padded after its end token
    ids[1, 15] = 999
    return hf, lib, pixels, ids, mask, report


def reference(hf, pixels, ids, mask, boxes=None, labels=None, monkeypatch=None):
    """transformers' Sam3Model as the original behaves: without boxes, one padded box slot
    (label -10) makes it run the geometry encoder on no box, so the prompt keeps the CLS
    token the original's empty geometric prompt gives."""
    from transformers.models.sam3 import modeling_sam3

    if boxes is None:
        boxes = torch.zeros(pixels.shape[0], 1, 4)
        labels = torch.full((pixels.shape[0], 1), -10)
    monkeypatch.setattr(modeling_sam3, "torchvision",
                        types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=torch_roi_align.roi_align)),
                        raising=False)
    with torch.no_grad():
        return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                  input_boxes=boxes, input_boxes_labels=labels)


def port(hf, pixels, ids, mask):
    """transformers' own text-only answer: no geometry encoder, no CLS token."""
    with torch.no_grad():
        return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)


def ours(lib, pixels, ids, mask, boxes=None, labels=None):
    b = pixels.shape[0]
    maps = lib.call_device("encode_image", pixels.numpy())
    feats, tmask = lib.call_device("encode_text", ids.numpy().astype(np.int32), mask.numpy().astype(np.int32))
    slot_boxes = np.zeros((b, MAX_BOXES, 4), np.float32)
    slot_labels = np.zeros((b, MAX_BOXES), np.int32)
    slot_mask = np.zeros((b, MAX_BOXES), np.int32)
    if boxes is not None:
        for i in range(b):
            for j in range(boxes.shape[1]):
                if int(labels[i, j]) == -10:  # the reference's padding label
                    continue
                slot_boxes[i, j] = boxes[i, j].numpy()
                slot_labels[i, j] = int(labels[i, j])
                slot_mask[i, j] = 1
    out = lib("detect", maps[0], maps[1], maps[2], feats, tmask, slot_boxes, slot_labels, slot_mask)
    return dict(zip(OUTPUTS, out))


def compare(got, ref, what):
    for name in OUTPUTS:
        assert_close(got[name], getattr(ref, name), RTOL, ATOL, f"{what}: {name}")


def test_checkpoint_fully_mapped(setup):
    *_, report = setup
    assert not any("unexpected" in r for r in report.unused)


def test_text_only(setup, monkeypatch):
    hf, lib, pixels, ids, mask, _ = setup
    got = ours(lib, pixels, ids, mask)
    compare(got, reference(hf, pixels, ids, mask, monkeypatch=monkeypatch), "text only")
    # the port's text-only prompt (no CLS token) gives measurably different answers
    theirs = port(hf, pixels, ids, mask)
    assert np.abs(theirs.pred_logits.numpy() - got["pred_logits"]).max() > 1e-2
    assert np.abs(theirs.pred_masks.numpy() - got["pred_masks"]).max() > 1e-2


BOXES = torch.tensor([[[0.5, 0.5, 0.4, 0.6], [0.25, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2]],
                      [[0.4, 0.6, 0.5, 0.3], [0.8, 0.2, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[1, 0, 1], [0, 1, -10]])  # image 2: two boxes, third slot padded


def test_boxes_only(setup, monkeypatch):
    """Box prompts with the generic text the processor uses for visual prompts."""
    hf, lib, pixels, ids, mask, _ = setup
    visual = torch.full_like(ids, 1)
    visual[:, 0], visual[:, 1], visual[:, 2] = 998, 5, 999
    vmask = torch.zeros_like(mask)
    vmask[:, :3] = 1
    compare(ours(lib, pixels, visual, vmask, BOXES, LABELS),
            reference(hf, pixels, visual, vmask, BOXES, LABELS, monkeypatch), "boxes only")


def test_text_and_boxes(setup, monkeypatch):
    hf, lib, pixels, ids, mask, _ = setup
    got = ours(lib, pixels, ids, mask, BOXES, LABELS)
    ref = reference(hf, pixels, ids, mask, BOXES, LABELS, monkeypatch)
    compare(got, ref, "text + boxes")
    # the boxes matter: the text-only answer is measurably different
    text_only = reference(hf, pixels, ids, mask, monkeypatch=monkeypatch)
    assert np.abs(text_only.pred_logits.numpy() - got["pred_logits"]).max() > 1e-3


def test_single_positive_box_batch1(setup, monkeypatch):
    hf, lib, pixels, ids, mask, _ = setup
    b, l = BOXES[:1, :1], torch.tensor([[1]])
    compare(ours(lib, pixels[:1], ids[:1], mask[:1], b, l),
            reference(hf, pixels[:1], ids[:1], mask[:1], b, l, monkeypatch), "one box, batch 1")
