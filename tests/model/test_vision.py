"""Vision backbone parity: transformers Sam3VisionModel -> our loader -> llvm library.

Tiny config: 12x12 token grid with window 5 (padding to 15x15 exercised), one global
block, batch 2. Tolerance float32: rtol 1e-4, atol 1e-5 (relative to values of O(0.1-1)).
"""


import pytest
import torch

from tests.refs import (TINY_HF, assert_close, channel_first, compile_library, expected_params, randomize_,
                  save_hf_snapshot)
from sam3_nn.config import Sam3Config
from sam3_nn.weights import load_params, open_checkpoint

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import Sam3VisionConfig, Sam3VisionModel

    hf_cfg = Sam3VisionConfig(**TINY_HF["vision_config"])
    model = randomize_(Sam3VisionModel(hf_cfg).eval(), seed=1)
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_vision")))
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 168, 168)
    with torch.no_grad():
        out = model(pixels)
    return model, folder, pixels, out


@pytest.fixture(scope="module")
def library(reference, tmp_path_factory):
    cfg = Sam3Config.from_pretrained(reference[1])
    return cfg, compile_library(cfg, str(tmp_path_factory.mktemp("lib")), parts=["vision"])


def test_config_from_snapshot(reference, library):
    cfg, lib = library
    assert lib.manifest["parts"] == ["vision"]
    assert sorted(lib.manifest["functions"]) == ["encode_image", "image_position_encoding", "release_outputs"]
    bb = cfg.vision.backbone
    assert (bb.hidden_size, bb.num_hidden_layers, bb.window_size, bb.global_attn_indexes) == (64, 3, 5, [1])
    assert bb.grid_size == 12 and bb.grid_size % bb.window_size != 0


def _run(library, params, pixels):
    cfg, lib = library
    lib.bind(params)
    return (channel_first(lib("encode_image", pixels.numpy())),
            lib("image_position_encoding", pixels.shape[0]))


def test_parity_hf_snapshot(reference, library):
    _, folder, pixels, out = reference
    cfg, lib = library
    params, report = load_params(cfg, open_checkpoint(folder), expected_params(lib), ["vision"])
    maps, pos = _run(library, params, pixels)
    assert len(maps) == len(out.fpn_hidden_states) == 4
    for i, (ours, ref) in enumerate(zip(maps, out.fpn_hidden_states)):
        assert_close(ours, ref, RTOL, ATOL, f"fpn level {i}")
    for i, (ours, ref) in enumerate(zip(pos, out.fpn_position_encoding)):
        assert_close(ours, ref, RTOL, ATOL, f"position encoding {i}")


def original_layout(model) -> dict:
    """The HF vision weights rewritten in the original sam3.pt layout (what the
    released checkpoint holds), written independently of our mapping."""
    sd = model.state_dict()
    p = "detector.backbone.vision_backbone."
    out = {}
    pos = sd["backbone.embeddings.position_embeddings"]
    out[p + "trunk.pos_embed"] = torch.cat([torch.randn(1, 1, pos.shape[-1]), pos], dim=1)
    out[p + "trunk.patch_embed.proj.weight"] = sd["backbone.embeddings.patch_embeddings.projection.weight"]
    for t in ("weight", "bias"):
        out[f"{p}trunk.ln_pre.{t}"] = sd[f"backbone.layer_norm.{t}"]
    n_layers = len(model.backbone.layers)
    for i in range(n_layers):
        s, o = f"backbone.layers.{i}.", f"{p}trunk.blocks.{i}."
        for t in ("weight", "bias"):
            out[f"{o}attn.qkv.{t}"] = torch.cat([sd[f"{s}attention.{x}_proj.{t}"] for x in "qkv"])
            out[f"{o}attn.proj.{t}"] = sd[f"{s}attention.o_proj.{t}"]
            out[f"{o}norm1.{t}"] = sd[f"{s}layer_norm1.{t}"]
            out[f"{o}norm2.{t}"] = sd[f"{s}layer_norm2.{t}"]
            out[f"{o}mlp.fc1.{t}"] = sd[f"{s}mlp.fc1.{t}"]
            out[f"{o}mlp.fc2.{t}"] = sd[f"{s}mlp.fc2.{t}"]
        out[f"{o}attn.freqs_cis"] = torch.polar(torch.ones(9, 8), torch.zeros(9, 8))
    names = {"scale_layers.0": ("dconv_2x2_0", "dconv_2x2"), "scale_layers.2": ("dconv_2x2_1",),
             "proj1": ("conv_1x1",), "proj2": ("conv_3x3",)}
    for k, v in sd.items():
        if not k.startswith("neck.fpn_layers."):
            continue
        _, _, lvl, *rest = k.split(".")
        layer, t = ".".join(rest[:-1]), rest[-1]
        has_two = f"neck.fpn_layers.{lvl}.scale_layers.2.weight" in sd
        theirs = names[layer][0] if (layer != "scale_layers.0" or has_two) else names[layer][-1]
        out[f"{p}convs.{lvl}.{theirs}.{t}"] = v
        out[f"{p}sam2_convs.{lvl}.{theirs}.{t}"] = v.clone()  # tracker neck: must be ignored
    out["tracker.no_mem_embed"] = torch.zeros(1, 1, 8)
    return out


def test_parity_sam3_pt(reference, library, tmp_path):
    model, _, pixels, out = reference
    cfg, lib = library
    path = str(tmp_path / "sam3.pt")
    torch.save({"model": original_layout(model)}, path)
    params, report = load_params(cfg, open_checkpoint(path), expected_params(lib), ["vision"])
    reasons = " | ".join(report.unused)
    assert "complex RoPE" in reasons and "tracker neck" in reasons  # sam2_convs: interactive part
    maps, _ = _run(library, params, pixels)
    for i, (ours, ref) in enumerate(zip(maps, out.fpn_hidden_states)):
        assert_close(ours, ref, RTOL, ATOL, f"fpn level {i} (sam3.pt)")


def test_single_image_batch(reference, library):
    """Batch is dynamic: one image gives the same result as in a batch of two."""
    _, folder, pixels, out = reference
    cfg, lib = library
    params, _ = load_params(cfg, open_checkpoint(folder), expected_params(lib), ["vision"])
    lib.bind(params)
    maps = channel_first(lib("encode_image", pixels[1:].numpy()))
    for i, (ours, ref) in enumerate(zip(maps, out.fpn_hidden_states)):
        assert_close(ours, ref[1:], RTOL, ATOL, f"fpn level {i}, batch 1")


def test_vm_lets_go_of_outputs_the_caller_dropped(reference, library, monkeypatch):
    """TVM's VM keeps the value of its last call until its next call; the engine calls the
    library's ``release_outputs`` after each call, so outputs the caller drops go back to
    the memory pool at once and the next call's outputs reuse their buffers (some of them:
    sizes shared with intermediates shuffle the rest). Without it (the function hidden from
    the engine) the previous outputs are still alive during each call, so no buffer can be
    shared between consecutive calls' outputs."""
    import numpy as np

    from sam3_nn.interface import RELEASE

    _, folder, pixels, _ = reference
    cfg, lib = library
    params, _ = load_params(cfg, open_checkpoint(folder), expected_params(lib), ["vision"])
    lib.bind(params)
    x = pixels.numpy()

    def consecutive_overlaps():
        lib.reset()
        seq = []
        for _ in range(5):
            out = lib.call_device("encode_image", x)
            seq.append({o.data_ptr() for o in out})
            del out
        return [len(a & b) for a, b in zip(seq, seq[1:])]

    assert all(n > 0 for n in consecutive_overlaps())
    token = np.array([7], np.int32)  # the function itself: its argument back, no weights taken
    np.testing.assert_array_equal(lib(RELEASE, token)[0], token)
    functions = {k: v for k, v in lib.manifest["functions"].items() if k != RELEASE}
    monkeypatch.setitem(lib.manifest, "functions", functions)
    assert consecutive_overlaps() == [0, 0, 0, 0]
    assert np.isfinite(lib("encode_image", x)[0]).all()
