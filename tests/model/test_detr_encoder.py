"""DETR encoder parity: transformers' Sam3DetrEncoder (from a randomized tiny
Sam3Model) vs ours compiled for llvm, weights through our mapping (HF snapshot and
the sam3.pt layout); plus loader coverage of the released sam3.pt layout for the
geometry encoder and the DETR encoder at full size.

Cases: batch 2, 12x12 image tokens, 7 prompt tokens with two mask patterns
(trailing padding; holes, as text + geometry concatenated give), and all valid.
Tolerance float32: rtol 1e-4, atol 1e-5 (outputs O(1)).
"""


import numpy as np
import pytest
import torch

from tvm.relax.frontend import nn

from tests.refs import assert_close, compile_module, fixture_source, save_hf_snapshot
from sam3_nn.config import Sam3Config
from sam3_nn.model.detr_encoder import DetrEncoder
from sam3_nn.model.geometry import GeometryEncoder
from sam3_nn.weights import open_checkpoint
from sam3_nn.weights.encoder_map import add_encoder_parts
from sam3_nn.weights.mapping import ParamMapping
from tests.model.test_geometry_encoder import hf_tiny_model, map_params, nhwc

RTOL, ATOL = 1e-4, 1e-5
B, L = 2, 7


class EncWrap(nn.Module):
    def __init__(self, cfg):
        self.detr_encoder = DetrEncoder(cfg.detr_encoder)

    def forward(self, feats, pos, prompt, mask):
        return self.detr_encoder(feats, pos, prompt, mask)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = hf_tiny_model(seed=7)
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_enc")))
    return model, folder


@pytest.fixture(scope="module")
def compiled(reference):
    cfg = Sam3Config.from_pretrained(reference[1])
    c, h = cfg.detr_encoder.hidden_size, cfg.vision.level_sizes()[2]
    spec = {"feats": nn.spec.Tensor(["b", h, h, c], "float32"),
            "pos": nn.spec.Tensor(["b", h, h, c], "float32"),
            "prompt": nn.spec.Tensor(["b", L, c], "float32"),
            "mask": nn.spec.Tensor(["b", L], "int32")}
    run, expected = compile_module(EncWrap(cfg), spec)
    return cfg, run, expected


@pytest.fixture(scope="module")
def inputs(compiled):
    cfg = compiled[0]
    c, h = cfg.detr_encoder.hidden_size, cfg.vision.level_sizes()[2]
    g = torch.Generator().manual_seed(21)
    feats = torch.randn(B, c, h, h, generator=g)
    pos = torch.randn(B, c, h, h, generator=g)
    prompt = torch.randn(B, L, c, generator=g)
    return feats, pos, prompt


MASKS = {
    "trailing_padding_and_holes": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 0, 0, 1]],
    "all_valid": [[1] * L, [1] * L],
}


def hf_forward(model, feats, pos, prompt, mask):
    with torch.no_grad():
        out = model.detr_encoder(vision_features=[feats], text_features=prompt,
                                 vision_pos_embeds=[pos], text_mask=mask.bool())
    return out.last_hidden_state


@pytest.mark.parametrize("mask_case", list(MASKS))
def test_parity_hf_snapshot(reference, compiled, inputs, mask_case):
    model, folder = reference
    cfg, run, expected = compiled
    feats, pos, prompt = inputs
    mask = torch.tensor(MASKS[mask_case], dtype=torch.int32)
    ref = hf_forward(model, feats, pos, prompt, mask)
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    (ours,) = run(weights, nhwc(feats), nhwc(pos), prompt.numpy(), mask.numpy())
    assert_close(ours, ref, RTOL, ATOL, f"detr encoder ({mask_case})")


def test_padded_prompt_tokens_are_ignored(reference, compiled, inputs):
    """Changing a masked prompt token changes nothing; changing a valid one does."""
    _, folder = reference
    cfg, run, expected = compiled
    feats, pos, prompt = inputs
    mask = torch.tensor(MASKS["trailing_padding_and_holes"], dtype=torch.int32)
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    (base,) = run(weights, nhwc(feats), nhwc(pos), prompt.numpy(), mask.numpy())
    p2 = prompt.clone()
    p2[0, 6] += 5.0  # masked
    p2[1, 2] -= 5.0  # masked (a hole)
    (same,) = run(weights, nhwc(feats), nhwc(pos), p2.numpy(), mask.numpy())
    np.testing.assert_array_equal(same, base)
    p2[1, 3] += 1.0  # valid
    (moved,) = run(weights, nhwc(feats), nhwc(pos), p2.numpy(), mask.numpy())
    assert np.abs(moved[1] - base[1]).max() > 1e-3
    np.testing.assert_array_equal(moved[0], base[0])


def test_masked_tail_equals_shorter_prompt(reference, compiled, inputs):
    """Fully masked extra tokens (e.g. the geometry tokens of a box-less prompt) give
    exactly the reference run on the shorter prompt alone (text only)."""
    model, folder = reference
    cfg, run, expected = compiled
    feats, pos, prompt = inputs
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.int32)
    ref = hf_forward(model, feats, pos, prompt[:, :4], text_mask)
    mask = torch.cat([text_mask, torch.zeros(B, L - 4, dtype=torch.int32)], dim=1)
    weights, _, _ = map_params(cfg, open_checkpoint(folder), expected, "")
    (ours,) = run(weights, nhwc(feats), nhwc(pos), prompt.numpy(), mask.numpy())
    assert_close(ours, ref, RTOL, ATOL, "detr encoder, masked tail vs text only")


def original_layout(model) -> dict:
    """The HF DETR encoder weights in the original sam3.pt layout (independent of our mapping)."""
    sd = model.state_dict()
    p = "detector.transformer.encoder.layers."
    out = {}
    sub = {"layer_norm1": "norm1", "layer_norm2": "norm2", "layer_norm3": "norm3",
           "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    for i in range(len(model.detr_encoder.layers)):
        s = f"detr_encoder.layers.{i}."
        for t in ("weight", "bias"):
            for ours, theirs in sub.items():
                out[f"{p}{i}.{theirs}.{t}"] = sd[f"{s}{ours}.{t}"]
            for a, theirs in (("self_attn", "self_attn"), ("cross_attn", "cross_attn_image")):
                out[f"{p}{i}.{theirs}.in_proj_{t}"] = torch.cat([sd[f"{s}{a}.{x}_proj.{t}"] for x in "qkv"])
                out[f"{p}{i}.{theirs}.out_proj.{t}"] = sd[f"{s}{a}.o_proj.{t}"]
    return out


def test_parity_sam3_pt(reference, compiled, inputs, tmp_path):
    model, _ = reference
    cfg, run, expected = compiled
    feats, pos, prompt = inputs
    path = str(tmp_path / "sam3.pt")
    torch.save({"model": original_layout(model)}, path)
    weights, _, used = map_params(cfg, open_checkpoint(path), expected, "detector.")
    assert used == set(original_layout(model))
    mask = torch.tensor(MASKS["trailing_padding_and_holes"], dtype=torch.int32)
    (ours,) = run(weights, nhwc(feats), nhwc(pos), prompt.numpy(), mask.numpy())
    assert_close(ours, hf_forward(model, feats, pos, prompt, mask), RTOL, ATOL, "detr encoder (sam3.pt)")


# ---------------------------------------------------------------- released layout, full size
PREFIXES = ("detector.geometry_encoder.", "detector.transformer.encoder.")


class FullWrap(nn.Module):
    def __init__(self, cfg):
        self.geometry_encoder = GeometryEncoder(cfg.geometry)
        self.detr_encoder = DetrEncoder(cfg.detr_encoder)


def test_loader_coverage_released_layout():
    cfg = Sam3Config()  # released sizes: 256 wide, 3 + 6 layers, FFN 2048
    ours = {n: tuple(int(s) for s in p.shape) for n, p in FullWrap(cfg).named_parameters()}
    assert ours["geometry_encoder.boxes_pool_project.weight"] == (256, 256, 7, 7)
    assert ours["detr_encoder.layers.5.mlp.fc1.weight"] == (2048, 256)
    source = fixture_source()
    m = ParamMapping("pt")
    add_encoder_parts(m, cfg, "detector.")
    assert set(m.entries) == set(ours), sorted(set(m.entries) ^ set(ours))[:10]
    used = set()
    for name, shape in ours.items():
        src = m.entries[name]
        missing = [n for n in src.names if n not in source.meta]
        assert not missing, f"{name}: no {missing} in the released layout"
        arr = src.build([source.read(n) for n in src.names])
        assert tuple(arr.shape) == shape, f"{name}: built {arr.shape}, model wants {shape}"
        used.update(src.names)
    ignored = {}
    for name in source.meta:
        if not name.startswith(PREFIXES) or name in used:
            continue
        reason = m.unused_reason(name)
        assert reason, f"{name} is neither mapped nor ignored"
        ignored[name] = reason
    assert sorted(ignored) == sorted(
        f"detector.geometry_encoder.points_{p}_project.{t}"
        for p in ("direct", "pool", "pos_enc") for t in ("weight", "bias"))
    counts = {p: sum(n.startswith(p) for n in source.meta) for p in PREFIXES}
    assert counts[PREFIXES[0]] == len([n for n in used if n.startswith(PREFIXES[0])]) + len(ignored)
    assert counts[PREFIXES[1]] == len([n for n in used if n.startswith(PREFIXES[1])])
