"""Geometry encoder parity: transformers' Sam3GeometryEncoder (from a randomized tiny
Sam3Model) vs ours compiled for llvm, weights through our mapping (HF snapshot and
the sam3.pt layout).

The reference's box pooling calls torchvision.ops.roi_align; torchvision does not
import here, so it is given the pure-torch RoIAlign of tests/torch_roi_align.py
(itself checked by hand in test_roi_align.py).

Cases: batch 2, at most 4 boxes: positive and negative boxes, padded slots (3 valid
+ 1 padded; 1 valid + 3 padded), a box straddling the image border, a large one.
Tolerance float32: rtol 1e-4, atol 1e-5 (outputs are layer-normed, O(1)).
"""

import types

import numpy as np
import pytest
import torch

from tvm.relax.frontend import nn

from tests import torch_roi_align
from tests.refs import assert_close, compile_module, randomize_, save_hf_snapshot, tiny_hf_config
from sam3_nn.config import Sam3Config
from sam3_nn.model.geometry import GeometryEncoder
from sam3_nn.weights import open_checkpoint
from sam3_nn.weights.encoder_map import add_encoder_parts
from sam3_nn.weights.mapping import ParamMapping

RTOL, ATOL = 1e-4, 1e-5
B, N = 2, 4


# ---------------------------------------------------------------- shared helpers
def hf_tiny_model(seed: int = 5):
    from transformers import Sam3Model

    return randomize_(Sam3Model(tiny_hf_config()).eval(), seed=seed)


def map_params(cfg, source, expected, prefix):
    """Our parameters (name -> array, checked against ``expected`` shapes) through
    ``add_encoder_parts`` alone; every source tensor of the encoder parts must be
    used or ignored with a reason."""
    m = ParamMapping(source.fmt)
    add_encoder_parts(m, cfg, prefix)
    out, used = {}, set()
    for name, (shape, dtype) in expected.items():
        src = m.entries[name]
        arr = src.build([source.read(n) for n in src.names])
        assert tuple(arr.shape) == tuple(shape), f"{name}: {arr.shape} != {shape}"
        out[name] = np.ascontiguousarray(arr.astype(dtype))
        used.update(src.names)
    return out, m, used


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


# ---------------------------------------------------------------- fixtures
class GeoWrap(nn.Module):
    def __init__(self, cfg):
        self.geometry_encoder = GeometryEncoder(cfg.geometry)

    def forward(self, boxes, labels, mask, feats, pos):
        return self.geometry_encoder(boxes, labels, mask, feats, pos)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = hf_tiny_model()
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_geo")))
    return model, folder


@pytest.fixture(scope="module")
def compiled(reference):
    cfg = Sam3Config.from_pretrained(reference[1])
    c, h = cfg.geometry.hidden_size, cfg.vision.level_sizes()[2]
    spec = {"boxes": nn.spec.Tensor(["b", N, 4], "float32"),
            "labels": nn.spec.Tensor(["b", N], "int32"),
            "mask": nn.spec.Tensor(["b", N], "int32"),
            "feats": nn.spec.Tensor(["b", h, h, c], "float32"),
            "pos": nn.spec.Tensor(["b", h, h, c], "float32")}
    run, expected = compile_module(GeoWrap(cfg), spec)
    return cfg, run, expected


@pytest.fixture(scope="module")
def inputs(compiled):
    cfg = compiled[0]
    c, h = cfg.geometry.hidden_size, cfg.vision.level_sizes()[2]
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(B, c, h, h, generator=g)
    pos = torch.randn(B, c, h, h, generator=g)
    boxes = torch.tensor([[[0.30, 0.40, 0.20, 0.30], [0.65, 0.55, 0.50, 0.60],
                           [0.95, 0.05, 0.30, 0.25], [0.50, 0.50, 0.10, 0.10]],
                          [[0.50, 0.50, 1.00, 1.00], [0.20, 0.80, 0.15, 0.05],
                           [0.70, 0.20, 0.40, 0.40], [0.10, 0.10, 0.30, 0.30]]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.int32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.int32)
    return feats, pos, boxes, labels, mask


def hf_forward(model, feats, pos, boxes, labels, mask, monkeypatch):
    from transformers.models.sam3 import modeling_sam3

    calls = []

    def roi_align(*args, **kwargs):
        calls.append(1)
        return torch_roi_align.roi_align(*args, **kwargs)

    monkeypatch.setattr(modeling_sam3, "torchvision",
                        types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=roi_align)),
                        raising=False)
    with torch.no_grad():
        out = model.geometry_encoder(box_embeddings=boxes, box_mask=mask.bool(), box_labels=labels.long(),
                                     img_feats=(feats,), img_pos_embeds=(pos,))
    assert calls, "the reference did not pool through the patched roi_align"
    return out


# ---------------------------------------------------------------- tests
def test_parity_hf_snapshot(reference, compiled, inputs, monkeypatch):
    model, folder = reference
    cfg, run, expected = compiled
    feats, pos, boxes, labels, mask = inputs
    ref = hf_forward(model, feats, pos, boxes, labels, mask, monkeypatch)
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    tokens, out_mask = run(weights, boxes.numpy(), labels.numpy(), mask.numpy(), nhwc(feats), nhwc(pos))
    np.testing.assert_array_equal(out_mask, ref.attention_mask.int().numpy())
    assert out_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    # every slot, padded ones included: the CLS placement and padded tokens are replicated
    assert_close(tokens, ref.last_hidden_state, RTOL, ATOL, "geometry tokens")


def test_labels_and_padding_matter(reference, compiled, inputs, monkeypatch):
    """Flipping a label changes the valid tokens; changing a padded box changes no valid token."""
    model, folder = reference
    cfg, run, expected = compiled
    feats, pos, boxes, labels, mask = inputs
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    base, _ = run(weights, boxes.numpy(), labels.numpy(), mask.numpy(), nhwc(feats), nhwc(pos))
    flipped = labels.clone()
    flipped[0, 1] = 1 - flipped[0, 1]
    t_flip, _ = run(weights, boxes.numpy(), flipped.numpy(), mask.numpy(), nhwc(feats), nhwc(pos))
    ref = hf_forward(model, feats, pos, boxes, flipped, mask, monkeypatch)
    assert_close(t_flip, ref.last_hidden_state, RTOL, ATOL, "flipped label")
    assert np.abs(t_flip[0, :4] - base[0, :4]).max() > 1e-3
    moved = boxes.clone()
    moved[1, 2] = torch.tensor([0.3, 0.3, 0.2, 0.2])  # a padded slot of image 1
    t_moved, _ = run(weights, moved.numpy(), labels.numpy(), mask.numpy(), nhwc(feats), nhwc(pos))
    np.testing.assert_allclose(t_moved[1, :2], base[1, :2], rtol=1e-6, atol=1e-6)


def original_layout(model) -> dict:
    """The HF geometry encoder weights in the original sam3.pt layout, written
    independently of our mapping (fused in-projections, original names)."""
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("geometry_encoder.")}
    p = "detector.geometry_encoder."
    out = {}
    names = {"vision_layer_norm": "img_pre_norm", "prompt_layer_norm": "norm",
             "output_layer_norm": "encode_norm"}
    sub = {"layer_norm1": "norm1", "layer_norm2": "norm2", "layer_norm3": "norm3",
           "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    for k, v in sd.items():
        rest = k[len("geometry_encoder."):]
        if rest.startswith("layers."):
            _, i, *tail = rest.split(".")
            mod, t = ".".join(tail[:-1]), tail[-1]
            if mod.endswith(("q_proj", "k_proj", "v_proj")):
                continue
            attn = {"self_attn": "self_attn", "cross_attn": "cross_attn_image"}
            if mod.endswith("o_proj"):
                out[f"{p}encode.{i}.{attn[mod.split('.')[0]]}.out_proj.{t}"] = v
            else:
                out[f"{p}encode.{i}.{sub[mod]}.{t}"] = v
        else:
            mod, t = rest.rsplit(".", 1)
            out[f"{p}{names.get(mod, mod)}.{t}"] = v
    for i in range(len(model.geometry_encoder.layers)):
        for a, theirs in (("self_attn", "self_attn"), ("cross_attn", "cross_attn_image")):
            for t in ("weight", "bias"):
                out[f"{p}encode.{i}.{theirs}.in_proj_{t}"] = torch.cat(
                    [sd[f"geometry_encoder.layers.{i}.{a}.{x}_proj.{t}"] for x in "qkv"])
    c = model.config.geometry_encoder_config.hidden_size
    out[p + "points_direct_project.weight"] = torch.zeros(c, 2)  # must be ignored, with a reason
    return out


def test_parity_sam3_pt(reference, compiled, inputs, monkeypatch, tmp_path):
    model, _ = reference
    cfg, run, expected = compiled
    feats, pos, boxes, labels, mask = inputs
    path = str(tmp_path / "sam3.pt")
    torch.save({"model": original_layout(model)}, path)
    source = open_checkpoint(path)
    weights, m, used = map_params(cfg, source, expected, "detector.")
    for name in source.meta:
        assert name in used or m.unused_reason(name), f"{name} neither mapped nor ignored"
    assert "point" in m.unused_reason("detector.geometry_encoder.points_direct_project.weight")
    ref = hf_forward(model, feats, pos, boxes, labels, mask, monkeypatch)
    tokens, _ = run(weights, boxes.numpy(), labels.numpy(), mask.numpy(), nhwc(feats), nhwc(pos))
    assert_close(tokens, ref.last_hidden_state, RTOL, ATOL, "geometry tokens (sam3.pt)")


def test_no_boxes_keeps_a_valid_cls_token(reference, compiled, inputs, monkeypatch):
    """All slots padded: the prompt is the CLS token alone and it stays valid, as the
    original encodes a text-only query (and the reference's encoder does)."""
    model, folder = reference
    cfg, run, expected = compiled
    feats, pos, boxes, labels, _ = inputs
    empty = torch.zeros(B, N, dtype=torch.int32)
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    tokens, out_mask = run(weights, boxes.numpy(), labels.numpy(), empty.numpy(), nhwc(feats), nhwc(pos))
    ref = hf_forward(model, feats, pos, boxes, labels, empty, monkeypatch)
    assert out_mask.tolist() == ref.attention_mask.int().tolist() == [[1, 0, 0, 0, 0]] * B
    assert_close(tokens[:, :1], ref.last_hidden_state[:, :1], RTOL, ATOL, "CLS token without boxes")


def test_bad_inputs_are_refused():
    cfg = Sam3Config.from_hf(tiny_hf_config().to_dict())
    c = cfg.geometry.hidden_size
    ok = {"boxes": nn.spec.Tensor([1, N, 4], "float32"), "labels": nn.spec.Tensor([1, N], "int32"),
          "mask": nn.spec.Tensor([1, N], "int32"), "feats": nn.spec.Tensor([1, 12, 12, c], "float32"),
          "pos": nn.spec.Tensor([1, 12, 12, c], "float32")}
    mode = {"$": {"param_mode": "packed", "effect_mode": "none"}}
    for key, bad, match in (("boxes", nn.spec.Tensor([1, N, 2], "float32"), "boxes must be"),
                            ("mask", nn.spec.Tensor([1, N], "float32"), "integer tensor"),
                            ("feats", nn.spec.Tensor([1, c, 12, 12], "float32"), "channel last")):
        with pytest.raises(ValueError, match=match):
            GeoWrap(cfg).export_tvm(spec={"forward": {**ok, key: bad, **mode}})
