"""Detector heads parity: transformers Sam3DotProductScoring and Sam3MaskDecoder ->
our mapping -> llvm (fp32); decoder/heads weight mapping over the sam3.pt layout.

Tiny config (32 wide, 2 heads), FPN levels 48/24/12 (the three the image model
gives the mask decoder), batch 2, 2 decoder layers x 10 queries, 7 prompt tokens
with the second prompt padded after 3. Tolerances float32: rtol 1e-4, atol 1e-5
for every output (largest errors seen ~2e-6 on mask logits of O(1)).
"""

import re

import numpy as np
import pytest
import torch
import tvm
from tvm.relax.frontend import nn

from tests.refs import assert_close, compile_ir, fixture_source, randomize_, save_hf_snapshot, tiny_hf_config
from sam3_nn.config import Sam3Config
from sam3_nn.model.detr_decoder import DetrDecoder
from sam3_nn.model.heads import DotProductScoring, MaskDecoder
from sam3_nn.weights import load_params, open_checkpoint

RTOL, ATOL = 1e-4, 1e-5
MASK_ATOL = 1e-5
BATCH, TOKENS, PROMPT = 2, 7, 5
SIZES = (48, 24, 12)


class Heads(nn.Module):
    def __init__(self, cfg: Sam3Config):
        self.dot_product_scoring = DotProductScoring(cfg.detr_decoder)
        self.mask_decoder = MaskDecoder(cfg.mask_decoder, cfg.mask_decoder_levels())

    def score(self, hidden, text, mask):
        return self.dot_product_scoring(hidden, text, mask)

    def score_unmasked(self, hidden, text):
        return self.dot_product_scoring(hidden, text, None)

    def masks(self, queries, f0, f1, f2, enc, prompt, prompt_mask):
        return self.mask_decoder(queries, [f0, f1, f2], enc, prompt, prompt_mask)

    def masks_no_prompt(self, queries, f0, f1, f2, enc):
        return self.mask_decoder(queries, [f0, f1, f2], enc)


def _spec(cfg: Sam3Config):
    c, q, layers = cfg.detr_decoder.hidden_size, cfg.detr_decoder.num_queries, cfg.detr_decoder.num_layers
    mode = {"param_mode": "packed", "effect_mode": "none"}
    f32 = lambda *s: nn.spec.Tensor(list(s), "float32")  # noqa: E731
    maps = {f"f{i}": f32("batch", s, s, c) for i, s in enumerate(SIZES)}
    base = dict(queries=f32("batch", q, c), **maps, enc=f32("batch", SIZES[-1] ** 2, c))
    return {
        "score": {"hidden": f32(layers, "batch", q, c), "text": f32("batch", "tokens", c),
                  "mask": nn.spec.Tensor(["batch", "tokens"], "int64"), "$": mode},
        "score_unmasked": {"hidden": f32(layers, "batch", q, c), "text": f32("batch", "tokens", c),
                           "$": mode},
        "masks": {**base, "prompt": f32("batch", "plen", c),
                  "prompt_mask": nn.spec.Tensor(["batch", "plen"], "int64"), "$": mode},
        "masks_no_prompt": {**base, "$": mode},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import Sam3Model

    model = randomize_(Sam3Model(tiny_hf_config()).eval(), seed=5)
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_heads")))
    g = torch.Generator().manual_seed(6)
    cfg = model.config
    c, q = cfg.detr_decoder_config.hidden_size, cfg.detr_decoder_config.num_queries
    layers = cfg.detr_decoder_config.num_layers
    x = dict(
        hidden=torch.randn(layers, BATCH, q, c, generator=g),
        text=torch.randn(BATCH, TOKENS, c, generator=g),
        mask=torch.tensor([[1] * TOKENS, [1] * 3 + [0] * (TOKENS - 3)], dtype=torch.int64),
        queries=torch.randn(BATCH, q, c, generator=g),
        maps=[torch.randn(BATCH, c, s, s, generator=g) for s in SIZES],
        enc=torch.randn(BATCH, SIZES[-1] ** 2, c, generator=g),
        prompt=torch.randn(BATCH, PROMPT, c, generator=g),
        prompt_mask=torch.tensor([[1] * PROMPT, [1, 1, 0, 0, 0]], dtype=torch.int64),
    )
    return model, folder, x


@pytest.fixture(scope="module")
def library(reference):
    cfg = Sam3Config.from_pretrained(reference[1])
    mod, params = Heads(cfg).export_tvm(spec=_spec(cfg))
    expected = {n: (tuple(int(s) for s in p.shape), p.dtype) for n, p in params}
    vm = compile_ir(mod)
    return cfg, vm, expected


def _weights(library, folder):
    cfg, _, expected = library
    params, _ = load_params(cfg, open_checkpoint(folder), expected, ["detector"], strict=False)
    return [tvm.runtime.tensor(params[n]) for n in expected]


def _run(vm, fn, args, weights):
    out = vm[fn](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], weights)
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def _hf_scores(model, x, mask):
    with torch.no_grad():
        return model.dot_product_scoring(decoder_hidden_states=x["hidden"], text_features=x["text"],
                                         text_mask=None if mask is None else mask.bool()).squeeze(-1)


def _hf_masks(model, x, prompt=True):
    kw = dict(prompt_features=x["prompt"], prompt_mask=x["prompt_mask"].bool()) if prompt else {}
    with torch.no_grad():
        out = model.mask_decoder(decoder_queries=x["queries"], backbone_features=list(x["maps"]),
                                 encoder_hidden_states=x["enc"], **kw)
    return out.pred_masks, out.semantic_seg


def _mask_args(x, prompt=True):
    args = [x["queries"].numpy()] + [_nhwc(m) for m in x["maps"]] + [x["enc"].numpy()]
    if prompt:
        args += [x["prompt"].numpy(), x["prompt_mask"].numpy()]
    return args


def test_scoring_parity(reference, library):
    model, folder, x = reference
    _, vm, _ = library
    w = _weights(library, folder)
    ours = _run(vm, "score", [x["hidden"].numpy(), x["text"].numpy(), x["mask"].numpy()], w)[0]
    ref = _hf_scores(model, x, x["mask"])
    assert_close(ours, ref, RTOL, ATOL, "scores (padded prompt)")
    ours_u = _run(vm, "score_unmasked", [x["hidden"].numpy(), x["text"].numpy()], w)[0]
    ref_u = _hf_scores(model, x, None)
    assert (ref_u[:, 1] - ref[:, 1]).abs().max() > 1e-3  # the padding matters
    assert_close(ours_u, ref_u, RTOL, ATOL, "scores (no mask)")


def test_scoring_clamp(reference, library, tmp_path):
    """Scale the query projection so logits pass +-12 (weights bound at run time)."""
    model, _, x = reference
    _, vm, _ = library
    proj = model.dot_product_scoring.query_proj.weight
    saved = proj.detach().clone()
    try:
        with torch.no_grad():
            proj.mul_(12.0 / float(_hf_scores(model, x, x["mask"]).abs().mean()))
        folder = save_hf_snapshot(model, str(tmp_path / "hf"))
        ref = _hf_scores(model, x, x["mask"])
    finally:
        with torch.no_grad():
            proj.copy_(saved)
    ours = _run(vm, "score", [x["hidden"].numpy(), x["text"].numpy(), x["mask"].numpy()],
                _weights(library, folder))[0]
    assert (ref.abs() == 12.0).any() and (ref.abs() < 12.0).any()
    assert_close(ours, ref, RTOL, ATOL, "scores (clamped)")


def test_mask_decoder_parity(reference, library):
    model, folder, x = reference
    _, vm, _ = library
    w = _weights(library, folder)
    masks, semantic = _run(vm, "masks", _mask_args(x), w)
    ref_masks, ref_semantic = _hf_masks(model, x)
    assert masks.shape == (BATCH, 10, SIZES[0], SIZES[0])
    assert_close(masks, ref_masks, RTOL, MASK_ATOL, "pred_masks")
    assert_close(semantic, ref_semantic, RTOL, ATOL, "semantic_seg")

    masks_np, semantic_np = _run(vm, "masks_no_prompt", _mask_args(x, prompt=False), w)
    ref_masks_np, ref_semantic_np = _hf_masks(model, x, prompt=False)
    assert (ref_masks_np - ref_masks).abs().max() > 1e-3  # the prompt attention matters
    assert_close(masks_np, ref_masks_np, RTOL, MASK_ATOL, "pred_masks (no prompt)")
    assert_close(semantic_np, ref_semantic_np, RTOL, ATOL, "semantic_seg (no prompt)")


# ---------------------------------------------------------------------------------
# sam3.pt layout
# ---------------------------------------------------------------------------------
# HF name -> sam3.pt name, the reference conversion's table read backwards (written
# independently of sam3_nn.weights.decoder_map).
_TO_PT = [
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn\.", r"transformer.decoder.layers.\1.ca_text."),
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"^detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^detr_decoder\.layers\.", "transformer.decoder.layers."),
    (r"^detr_decoder\.output_layer_norm\.", "transformer.decoder.norm."),
    (r"^detr_decoder\.presence_layer_norm\.", "transformer.decoder.presence_token_out_norm."),
    (r"^detr_decoder\.presence_head\.layer(\d)\.", "transformer.decoder.presence_token_head.layers.{}."),
    (r"^detr_decoder\.box_head\.layer(\d)\.", "transformer.decoder.bbox_embed.layers.{}."),
    (r"^detr_decoder\.ref_point_head\.layer(\d)\.", "transformer.decoder.ref_point_head.layers.{}."),
    (r"^detr_decoder\.box_rpb_embed_x\.layer(\d)\.", "transformer.decoder.boxRPB_embed_x.layers.{}."),
    (r"^detr_decoder\.box_rpb_embed_y\.layer(\d)\.", "transformer.decoder.boxRPB_embed_y.layers.{}."),
    (r"^detr_decoder\.", "transformer.decoder."),
    (r"^dot_product_scoring\.text_mlp\.layer(\d)\.", "dot_prod_scoring.prompt_mlp.layers.{}."),
    (r"^dot_product_scoring\.text_mlp_out_norm\.", "dot_prod_scoring.prompt_mlp.out_norm."),
    (r"^dot_product_scoring\.text_proj\.", "dot_prod_scoring.prompt_proj."),
    (r"^dot_product_scoring\.query_proj\.", "dot_prod_scoring.hs_proj."),
    (r"^mask_decoder\.mask_embedder\.", "segmentation_head.mask_predictor.mask_embed."),
    (r"^mask_decoder\.instance_projection\.", "segmentation_head.instance_seg_head."),
    (r"^mask_decoder\.semantic_projection\.", "segmentation_head.semantic_seg_head."),
    (r"^mask_decoder\.prompt_cross_attn_norm\.", "segmentation_head.cross_attn_norm."),
    (r"^mask_decoder\.prompt_cross_attn\.", "segmentation_head.cross_attend_prompt."),
    (r"^mask_decoder\.", "segmentation_head."),
]


def _pt_name(name: str) -> str:
    for pat, rep in _TO_PT:
        m = re.match(pat, name)
        if m:
            if "{}" in rep:  # layerN (1-based) -> layers.N-1
                return rep.format(int(m.group(1)) - 1) + name[m.end():]
            return re.sub(pat, rep, name)
    raise AssertionError(name)


def original_layout(model) -> dict:
    """The HF decoder/head weights rewritten as sam3.pt holds them (fused in_proj)."""
    out = {}
    sd = {k: v for k, v in model.state_dict().items()
          if k.startswith(("detr_decoder.", "dot_product_scoring.", "mask_decoder."))}
    for k, v in sd.items():
        m = re.match(r"(.*)\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            if m.group(2) == "q":
                fused = torch.cat([sd[f"{m.group(1)}.{p}_proj.{m.group(3)}"] for p in "qkv"])
                out[f"detector.{_pt_name(m.group(1) + '.')}in_proj_{m.group(3)}"] = fused
            continue
        k2 = k.replace(".o_proj.", ".out_proj.")
        out["detector." + _pt_name(k2)] = v
    return out


class DecoderAndHeads(nn.Module):
    def __init__(self, cfg):
        self.detr_decoder = DetrDecoder(cfg.detr_decoder)
        self.dot_product_scoring = DotProductScoring(cfg.detr_decoder)
        self.mask_decoder = MaskDecoder(cfg.mask_decoder, cfg.mask_decoder_levels())


def _all_params(cfg):
    """Our decoder + heads parameters (name -> shape, dtype), without compiling."""
    return {n: (tuple(int(s) for s in p.shape), "float32")
            for n, p in DecoderAndHeads(cfg).named_parameters()}


def test_pt_layout_matches_hf(reference, tmp_path):
    model, folder, _ = reference
    cfg = Sam3Config.from_pretrained(folder)
    expected = _all_params(cfg)
    sd = original_layout(model)
    path = str(tmp_path / "sam3.pt")
    torch.save({"model": sd}, path)
    from_hf, hf_report = load_params(cfg, open_checkpoint(folder), expected, ["detector"], strict=False)
    from_pt, report = load_params(cfg, open_checkpoint(path), expected, ["detector"], strict=False)
    for name in expected:
        np.testing.assert_array_equal(from_pt[name], from_hf[name], err_msg=name)
    # every tensor written is used, except the pixel-decoder stage the image model never runs
    unused = {n for names in report.unused.values() for n in names}
    assert unused == {n for n in sd if ".pixel_decoder.conv_layers.2." in n or ".pixel_decoder.norms.2." in n}
    # same in the HF snapshot, ignored with a reason (not reported as unexpected)
    hf_mine = {n: r for r, names in hf_report.unused.items() for n in names
               if n.startswith(("detr_decoder.", "dot_product_scoring.", "mask_decoder."))}
    assert set(hf_mine) == {n for n in model.state_dict() if n.startswith("mask_decoder.pixel_decoder.")
                            and (".conv_layers.2." in n or ".norms.2." in n)}
    assert all("pixel decoder stages" in r for r in hf_mine.values())


def test_fixture_coverage():
    """Released sam3.pt layout: every decoder/scoring/segmentation tensor is mapped or
    ignored with a reason, and our full-size modules get every parameter at its shape."""

    cfg = Sam3Config()
    expected = _all_params(cfg)
    src = fixture_source()
    params, report = load_params(cfg, src, expected, ["detector"], strict=False)
    assert set(params) == set(expected)
    for n, (shape, _) in expected.items():
        assert params[n].shape == shape, n
    mine = [n for n in src.meta if n.startswith(("detector.transformer.decoder.",
                                                  "detector.dot_prod_scoring.",
                                                  "detector.segmentation_head."))]
    used = {s for names in report.mapped.values() for s in names}
    reasons = {n: r for r, names in report.unused.items() for n in names}
    unmapped = [n for n in mine if n not in used and (n not in reasons or "unexpected" in reasons[n])]
    assert not unmapped, unmapped
    assert {int(n.split(".")[4]) for n in mine if ".decoder.layers." in n} == set(range(cfg.detr_decoder.num_layers))
    ignored = sorted(n for n in mine if n not in used)
    assert ignored == sorted(f"detector.segmentation_head.pixel_decoder.{m}.2.{t}"
                             for m in ("conv_layers", "norms") for t in ("weight", "bias"))


def test_bad_inputs_are_reported():
    cfg = Sam3Config.from_hf(tiny_hf_config().to_dict())
    c = cfg.mask_decoder.hidden_size

    class Two(Heads):
        def masks_no_prompt(self, queries, f0, f1, f2, enc):
            return self.mask_decoder(queries, [f0, f1], enc)

    spec = {"masks_no_prompt": _spec(cfg)["masks_no_prompt"]}
    with pytest.raises(ValueError, match="3 FPN levels, got 2"):
        Two(cfg).export_tvm(spec=spec)

    odd = dict(spec["masks_no_prompt"], f1=nn.spec.Tensor([2, 20, 20, c], "float32"))
    with pytest.raises(ValueError, match="integer factors"):
        Heads(cfg).export_tvm(spec={"masks_no_prompt": odd})

    with pytest.raises(ValueError, match="built for 3 levels|3 FPN levels"):
        MaskDecoder(cfg.mask_decoder, 3).pixel_decoder([None, None])
