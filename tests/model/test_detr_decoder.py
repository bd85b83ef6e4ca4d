"""DETR decoder parity: transformers Sam3DetrDecoder -> our mapping -> llvm (fp32).

Tiny config (32 wide, 2 heads, 2 layers, 10 queries), a 12x12 image grid, batch 2,
7 prompt tokens with the second prompt padded after 4. The reference boxes are
spread (some pushed to sigmoid's ends so inverse_sigmoid's eps clamp is used).
Tolerance float32: rtol 1e-4, atol 1e-5 (values of O(0.1-1)).
"""

import pytest
import torch
import tvm
from tvm.relax.frontend import nn

from tests.refs import assert_close, compile_ir, randomize_, save_hf_snapshot, tiny_hf_config
from sam3_nn.config import Sam3Config
from sam3_nn.model.detr_decoder import DetrDecoder, box_cxcywh_to_xyxy
from sam3_nn.weights import load_params, open_checkpoint

RTOL, ATOL = 1e-4, 1e-5
GRID, TOKENS, BATCH = 12, 7, 2


class DecoderOnly(nn.Module):
    def __init__(self, cfg: Sam3Config):
        self.detr_decoder = DetrDecoder(cfg.detr_decoder)

    def decode(self, vision, pos, text, mask):
        out = self.detr_decoder(vision, pos, text, mask, (GRID, GRID))
        return out + (box_cxcywh_to_xyxy(out[2]),)

    def decode_unmasked(self, vision, pos, text):
        return self.detr_decoder(vision, pos, text, None, (GRID, GRID))


def _spec(c):
    mode = {"param_mode": "packed", "effect_mode": "none"}
    v = nn.spec.Tensor(["batch", GRID * GRID, c], "float32")
    t = nn.spec.Tensor(["batch", "tokens", c], "float32")
    return {
        "decode": {"vision": v, "pos": v, "text": t,
                   "mask": nn.spec.Tensor(["batch", "tokens"], "int64"), "$": mode},
        "decode_unmasked": {"vision": v, "pos": v, "text": t, "$": mode},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import Sam3Model

    model = randomize_(Sam3Model(tiny_hf_config()).eval(), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ref = model.detr_decoder.reference_points.weight
        ref.copy_(torch.randn(ref.shape, generator=g) * 2.0)
        ref[0, 0], ref[1, 2], ref[2, 3] = 8.0, -8.0, 7.5  # beyond inverse_sigmoid's eps
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_detector")))
    c = model.config.detr_decoder_config.hidden_size
    inputs = dict(
        vision=torch.randn(BATCH, GRID * GRID, c, generator=g),
        pos=torch.randn(BATCH, GRID * GRID, c, generator=g),
        text=torch.randn(BATCH, TOKENS, c, generator=g),
        mask=torch.tensor([[1] * TOKENS, [1] * 4 + [0] * (TOKENS - 4)], dtype=torch.int64),
    )
    return model, folder, inputs


def _hf_decode(model, inputs, mask):
    dec = model.detr_decoder
    with torch.no_grad():
        out = dec(vision_features=inputs["vision"], text_features=inputs["text"],
                  vision_pos_encoding=inputs["pos"],
                  text_mask=None if mask is None else mask.bool(),
                  spatial_shapes=torch.tensor([[GRID, GRID]]))
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy as box_xyxy
        from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

        pred = (inverse_sigmoid(out.reference_boxes)
                + dec.box_head(out.intermediate_hidden_states)).sigmoid()
    return (out.intermediate_hidden_states, out.reference_boxes, pred, out.presence_logits,
            box_xyxy(pred))


@pytest.fixture(scope="module")
def library(reference):
    model, folder, _ = reference
    cfg = Sam3Config.from_pretrained(folder)
    wrapper = DecoderOnly(cfg)
    mod, params = wrapper.export_tvm(spec=_spec(cfg.detr_decoder.hidden_size))
    expected = {n: (tuple(int(s) for s in p.shape), p.dtype) for n, p in params}
    vm = compile_ir(mod)
    return cfg, vm, expected


def _weights(library, folder):
    cfg, _, expected = library
    params, _ = load_params(cfg, open_checkpoint(folder), expected, ["detector"], strict=False)
    return [tvm.runtime.tensor(params[n]) for n in expected]


def _run(vm, fn, *args, weights):
    out = vm[fn](*[tvm.runtime.tensor(a.numpy()) for a in args], weights)
    return [o.numpy() for o in out]


NAMES = ("hidden_states", "reference_boxes", "pred_boxes", "presence_logits", "pred_boxes_xyxy")


def test_parity_with_padded_text(reference, library):
    model, folder, x = reference
    _, vm, _ = library
    ours = _run(vm, "decode", x["vision"], x["pos"], x["text"], x["mask"],
                weights=_weights(library, folder))
    refs = _hf_decode(model, x, x["mask"])
    for name, o, r in zip(NAMES, ours, refs):
        assert_close(o, r, RTOL, ATOL, name)
    # the fixture reaches inverse_sigmoid's clamp, and the boxes move between layers
    first = refs[1][0]
    assert (first > 1 - 1e-3).any() and (first < 1e-3).any()
    assert (refs[2] - refs[1]).abs().max() > 1e-3


def test_text_mask_is_applied(reference, library):
    """Without the mask the reference differs on the padded prompt; we follow both."""
    model, folder, x = reference
    _, vm, _ = library
    w = _weights(library, folder)
    ours = _run(vm, "decode_unmasked", x["vision"], x["pos"], x["text"], weights=w)
    refs_unmasked = _hf_decode(model, x, None)
    refs_masked = _hf_decode(model, x, x["mask"])
    assert (refs_unmasked[0][:, 1] - refs_masked[0][:, 1]).abs().max() > 1e-3
    for name, o, r in zip(NAMES, ours, refs_unmasked):
        assert_close(o, r, RTOL, ATOL, name + " (no mask)")
    # an all-valid mask equals no mask
    full = torch.ones_like(x["mask"])
    ours_full = _run(vm, "decode", x["vision"], x["pos"], x["text"], full, weights=w)
    for name, o, r in zip(NAMES, ours_full, refs_unmasked):
        assert_close(o, r, RTOL, ATOL, name + " (all-valid mask)")


def test_presence_not_clamped(reference, library, tmp_path):
    """Shift the presence head so its logits straddle +-10: ours are unclamped, as the
    original's (its clamp discards the result); transformers clamps to +-10, so the
    corrected reference is its decoder with the clamp bound lifted (weights are bound
    at run time: same library)."""
    model, _, x = reference
    _, vm, _ = library
    bias = model.detr_decoder.presence_head.layer3.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            logits = _hf_decode(model, x, x["mask"])[3]
            bias.add_(10.0 - float(logits.mean()))
        folder = save_hf_snapshot(model, str(tmp_path / "hf"))
        clamped = _hf_decode(model, x, x["mask"])
        model.detr_decoder.clamp_presence_logit_max_val = float("inf")
        refs = _hf_decode(model, x, x["mask"])
    finally:
        model.detr_decoder.clamp_presence_logit_max_val = 10.0
        with torch.no_grad():
            bias.copy_(saved)
    ours = _run(vm, "decode", x["vision"], x["pos"], x["text"], x["mask"],
                weights=_weights(library, folder))
    assert (refs[3] > 10.0).any() and (refs[3] < 10.0).any()
    assert_close(ours[3], refs[3], RTOL, ATOL, "presence_logits (unclamped)")
    # the port's clamp would be caught: it cuts the logits above 10
    assert (ours[3] - clamped[3].numpy()).max() > 1e-3


def test_bad_spatial_shape_is_reported(reference):
    cfg = Sam3Config.from_pretrained(reference[1])

    class Wrong(DecoderOnly):
        def decode(self, vision, pos, text, mask):
            return self.detr_decoder(vision, pos, text, mask, (GRID, GRID + 1))

    with pytest.raises(ValueError, match="spatial_shape"):
        Wrong(cfg).export_tvm(spec=_spec(cfg.detr_decoder.hidden_size))
