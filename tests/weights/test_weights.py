"""Weight loader: the released sam3.pt layout, both formats' failure modes, the converted file."""

import json
import os

import numpy as np
import pytest
import torch

from tests.refs import fixture_source
from sam3_nn.config import Sam3Config
from sam3_nn.weights import CheckpointError, load_converted, load_params, open_checkpoint, plan, save_converted


def full_size_vision_params(dtype="float32"):
    """Our full-size vision parameters (names and shapes), without compiling."""
    from sam3_nn.model.vision import VisionModel

    model = VisionModel(Sam3Config().vision)
    return {"vision_encoder." + n: (tuple(int(s) for s in p.shape), dtype)
            for n, p in model.named_parameters()}


def test_released_layout_maps_every_vision_tensor():
    src = fixture_source()
    expected = full_size_vision_params()
    mapping, report = plan(Sam3Config(), src, expected, ["vision"])
    # every parameter of ours has sources whose shapes fit
    vision = [n for n in src.meta if n.startswith("detector.backbone.vision_backbone.")]
    used = {n for names in report.mapped.values() for n in names}
    unused_vision = {n for reason, names in report.unused.items() for n in names
                     if n.startswith("detector.backbone.vision_backbone.")}
    assert set(vision) == used | unused_vision
    # only RoPE tables and the tracker's neck are left out of the vision backbone
    for reason, names in report.unused.items():
        if any(n.startswith("detector.backbone.vision_backbone.") for n in names):
            assert "RoPE" in reason or "tracker" in reason, reason
    assert all(n.endswith("freqs_cis") or ".sam2_convs." in n for n in unused_vision)
    # everything else is reported with the part it belongs to, nothing unexplained
    assert not any("unexpected" in r for r in report.unused)
    assert any(n.startswith("tracker.") for r, ns in report.unused.items() if "tracker" in r for n in ns)
    params, _ = load_params(Sam3Config(), src, expected, ["vision"])
    assert set(params) == set(expected)
    for name, arr in params.items():
        assert arr.shape == expected[name][0], name
    assert params["vision_encoder.backbone.embeddings.position_embeddings"].shape == (1, 576, 1024)
    assert params["vision_encoder.backbone.layers.0.attention.qkv.weight"].shape == (3072, 1024)


def test_fixture_has_complex_rope_tables_never_read():
    src = fixture_source()
    complex_names = [n for n, (_, t) in src.meta.items() if t.startswith("complex")]
    assert len(complex_names) == 32
    _, report = plan(Sam3Config(), src, full_size_vision_params(), ["vision"])
    used = {n for names in report.mapped.values() for n in names}
    assert not used & set(complex_names)


def _tiny_source(tmp_path, tensors):
    from safetensors.numpy import save_file

    folder = tmp_path / "snap"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "sam3"}))
    return str(folder)


def _one_layer_cfg():
    cfg = Sam3Config()
    bb = cfg.vision.backbone
    bb.hidden_size, bb.intermediate_size, bb.num_hidden_layers, bb.num_attention_heads = 8, 16, 1, 2
    bb.image_size, bb.patch_size, bb.pretrain_image_size, bb.window_size = 28, 14, 28, 2
    bb.global_attn_indexes = []
    cfg.vision.fpn_hidden_size = 4
    cfg.vision.scale_factors = [1.0]
    return cfg


def _one_layer_tensors():
    from sam3_nn.model.vision import VisionModel

    rng = np.random.default_rng(0)
    model = VisionModel(_one_layer_cfg().vision)
    hf = {}
    for n, p in model.named_parameters():
        shape = tuple(int(s) for s in p.shape)
        if n.endswith("attention.qkv.weight") or n.endswith("attention.qkv.bias"):
            third = (shape[0] // 3,) + shape[1:]
            for x in "qkv":
                hf["vision_encoder." + n.replace("qkv", f"{x}_proj")] = rng.standard_normal(third).astype("float32")
        elif n.endswith("patch_embeddings.weight"):
            hf["vision_encoder." + n.replace("patch_embeddings.weight", "patch_embeddings.projection.weight")] = \
                rng.standard_normal(shape).astype("float32")
        else:
            hf["vision_encoder." + n] = rng.standard_normal(shape).astype("float32")
    expected = {"vision_encoder." + n: (tuple(int(s) for s in p.shape), "float32")
                for n, p in model.named_parameters()}
    return hf, expected


def test_hf_small_loads_and_fuses_qkv(tmp_path):
    hf, expected = _one_layer_tensors()
    params, _ = load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected, ["vision"])
    qkv = params["vision_encoder.backbone.layers.0.attention.qkv.weight"]
    p = "vision_encoder.backbone.layers.0.attention."
    np.testing.assert_array_equal(qkv, np.concatenate([hf[p + f"{x}_proj.weight"] for x in "qkv"]))


def test_cast_to_float16(tmp_path):
    hf, expected = _one_layer_tensors()
    expected16 = {k: (s, "float16") for k, (s, _) in expected.items()}
    params, _ = load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected16, ["vision"])
    name = "vision_encoder.backbone.layer_norm.weight"
    assert params[name].dtype == np.float16
    np.testing.assert_allclose(params[name], hf[name], rtol=1e-3)


def test_missing_tensor_is_named(tmp_path):
    hf, expected = _one_layer_tensors()
    del hf["vision_encoder.backbone.layers.0.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.0\.mlp\.fc1\.bias"):
        load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected, ["vision"])


def test_wrong_shape_is_named(tmp_path):
    hf, expected = _one_layer_tensors()
    hf["vision_encoder.backbone.layers.0.mlp.fc2.weight"] = np.zeros((8, 17), np.float32)
    with pytest.raises(CheckpointError, match=r"mlp\.fc2\.weight: expected \(8, 16\), got \(8, 17\)"):
        load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected, ["vision"])


def test_unexpected_tensor_is_named(tmp_path):
    hf, expected = _one_layer_tensors()
    hf["vision_encoder.backbone.layers.0.extra_gate"] = np.zeros((3,), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*extra_gate"):
        load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected, ["vision"])
    # non-strict: loads, and reports it
    _, report = load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected,
                            ["vision"], strict=False)
    assert any("extra_gate" in n for n in report.unused["unexpected (not mapped)"])


def test_integer_tensor_is_rejected(tmp_path):
    hf, expected = _one_layer_tensors()
    hf["vision_encoder.backbone.layer_norm.bias"] = np.zeros((8,), np.int32)
    with pytest.raises(CheckpointError, match=r"layer_norm\.bias: expected floating point"):
        load_params(_one_layer_cfg(), open_checkpoint(_tiny_source(tmp_path, hf)), expected, ["vision"])


def test_corrupt_safetensors(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        open_checkpoint(str(folder))


def test_truncated_safetensors(tmp_path):
    hf, expected = _one_layer_tensors()
    folder = _tiny_source(tmp_path, hf)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        src = open_checkpoint(folder)
        load_params(_one_layer_cfg(), src, expected, ["vision"])


def test_corrupt_torch_checkpoint(tmp_path):
    path = tmp_path / "sam3.pt"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_checkpoint(str(path))


def test_wrong_checkpoint(tmp_path):
    """A checkpoint of some other model: no SAM 3 vision tensors at all."""
    path = tmp_path / "other.pt"
    torch.save({"encoder.layer.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no vision backbone .* tensors found.*SAM 3 checkpoint"):
        load_params(_one_layer_cfg(), open_checkpoint(str(path)), _one_layer_tensors()[1], ["vision"])


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        open_checkpoint(str(tmp_path / "x.bin"))


def test_converted_roundtrip_and_atomic(tmp_path):
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = str(tmp_path / "w.safetensors")
    save_converted(path, params, {"format": "sam3_nn", "dtype": "float32"})
    back, meta = load_converted(path)
    np.testing.assert_array_equal(back["a"], params["a"])
    assert meta["dtype"] == "float32"
    assert [f for f in os.listdir(tmp_path)] == ["w.safetensors"]  # no temporary left
    # a failing write leaves nothing behind
    with pytest.raises(Exception):
        save_converted(str(tmp_path / "x.safetensors"), {"a": object()}, {"format": "sam3_nn"})
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_converted_rejects_foreign_file(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "foreign.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, path)
    with pytest.raises(CheckpointError, match="not converted sam3_nn weights"):
        load_converted(path)


def test_whole_released_checkpoint_is_accounted_for():
    """Every tensor of the released sam3.pt layout: mapped onto the full-size model
    (all parts), or unused with a stated reason. The interactive part takes the tracker
    neck's three used levels (``sam2_convs.0..2``), ``tracker.sam_prompt_encoder.*``,
    ``tracker.sam_mask_decoder.*`` and ``tracker.no_mem_embed``; the rest of ``tracker.*``
    is the video tracker (part ``video``)."""
    from sam3_nn.model.sam3 import PARTS, Sam3Model

    model = Sam3Model(Sam3Config(), parts=PARTS)
    expected = {n: (tuple(int(s) for s in p.shape), "float32") for n, p in model.named_parameters()}
    src = fixture_source()
    _, report = plan(Sam3Config(), src, expected, PARTS, strict=True)
    used = {n for names in report.mapped.values() for n in names}
    unused = {n: r for r, names in report.unused.items() for n in names}
    assert used.isdisjoint(unused)
    assert set(src.meta) == used | set(unused)
    assert len(report.mapped) == len(expected)
    detector_unused = {n: r for n, r in unused.items() if n.startswith("detector.")}
    for n, r in detector_unused.items():
        assert not r.endswith("not built in this model"), f"{n}: {r}"
    interactive = [n for n in src.meta if n.startswith(("tracker.sam_prompt_encoder.",
                                                          "tracker.sam_mask_decoder.", "tracker.no_mem_embed"))]
    neck = [n for n in src.meta if ".sam2_convs." in n]
    assert len(interactive) == 17 + 131 + 1 and len(neck) == 22  # prompt encoder, decoder, no_mem_embed
    assert set(interactive) <= used
    assert all(n in used for n in neck if ".sam2_convs.3." not in n)
    assert all("0.5x level" in unused[n] for n in neck if ".sam2_convs.3." in n)
    video = [n for n in src.meta if n.startswith("tracker.") and n not in interactive]
    assert len(video) == 309 - len(interactive)
    # the video tracker: every tensor mapped but no_mem_pos_enc, which nothing reads
    assert {n for n in video if n in unused} == {"tracker.no_mem_pos_enc"}
    assert "never read" in unused["tracker.no_mem_pos_enc"]
    assert report.mapped["tracker_model.memory_encoder.memory_fuser.layers.1.scale"] == \
        ("tracker.maskmem_backbone.fuser.layers.1.gamma",)
    assert report.mapped["tracker_model.object_pointer_proj.proj_out.weight"] == \
        ("tracker.obj_ptr_proj.layers.2.weight",)
    # shapes: every mapped parameter is built with the shape the model expects
    params, _ = load_params(Sam3Config(), src, expected, PARTS)
    assert all(params[n].shape == expected[n][0] for n in expected)
    # the one Gaussian matrix of the original feeds both position encodings
    assert report.mapped["tracker_model.shared_image_embedding.positional_embedding"] == \
        report.mapped["tracker_model.prompt_encoder.shared_embedding.positional_embedding"] == \
        ("tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",)


def _plan_for(parts, src, cfg=None):
    from sam3_nn.model.sam3 import Sam3Model

    cfg = cfg or Sam3Config()
    model = Sam3Model(cfg, parts=parts)
    expected = {n: (tuple(int(s) for s in p.shape), "float32") for n, p in model.named_parameters()}
    _, report = plan(cfg, src, expected, parts, strict=True)
    used = {n for names in report.mapped.values() for n in names}
    unused = {n: r for r, names in report.unused.items() for n in names}
    assert len(report.mapped) == len(expected) and set(src.meta) == used | set(unused)
    return report, used, unused


def test_released_layout_interactive_only():
    """A library of parts vision + interactive: the tracker neck alone, the detector's neck
    (``convs.*``) and the detector, text and video tracker reported with their reasons."""
    src = fixture_source()
    _, used, unused = _plan_for(("vision", "interactive"), src)
    convs = [n for n in src.meta if n.startswith("detector.backbone.vision_backbone.convs.")]
    assert convs and all("detector FPN neck: not built" in unused[n] for n in convs)
    assert all(".sam2_convs." in n or not n.startswith("detector.backbone.vision_backbone.conv")
               for n in used)
    assert any("text encoder: not built" in r for r in unused.values())
    assert any("detector (geometry encoder" in r for r in unused.values())
    # without the interactive part its tensors are reported as such
    _, _, unused = _plan_for(("vision", "text", "detector"), src)
    assert all("interactive segmentation" in unused[n] and "not built" in unused[n]
               for n in src.meta if n.startswith(("tracker.sam_", "detector.backbone.vision_backbone.sam2_convs.")))


@pytest.fixture(scope="module")
def hf_tiny_tracker_layouts():
    """Tiny ``transformers`` models: a ``Sam3TrackerModel`` and a ``Sam3VideoModel`` (the
    layout of the hub's ``facebook/sam3``: ``detector_model.``, ``tracker_model.``,
    ``tracker_neck.``), with the config our tiny tracker tests use."""
    from transformers import Sam3TrackerModel, Sam3VideoConfig, Sam3VideoModel

    from tests.refs import tiny_hf_config, tiny_tracker_hf_config

    tracker_cfg = tiny_tracker_hf_config()
    video_tracker = {k: tracker_cfg.to_dict()[k]
                     for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    video = Sam3VideoModel(Sam3VideoConfig(detector_config=tiny_hf_config().to_dict(),
                                           tracker_config=dict(video_tracker, image_size=168)))
    return Sam3TrackerModel(tracker_cfg).state_dict(), video.state_dict(), video.config


def test_hf_tracker_layouts_fully_mapped(hf_tiny_tracker_layouts):
    """Both HF layouts: every tensor mapped or unused with a reason; a Sam3TrackerModel
    checkpoint (whose vision neck is the tracker's) refused for a library with the
    detector's neck."""
    from tests.refs import state_dict_source

    tracker_sd, video_sd, video_cfg = hf_tiny_tracker_layouts
    cfg = Sam3Config.from_hf(video_cfg.to_dict())
    tracker_src = state_dict_source(tracker_sd)
    report, used, unused = _plan_for(("vision", "interactive"), tracker_src, cfg)
    assert {n for n in tracker_sd if n.startswith(("prompt_encoder.", "mask_decoder."))} <= used
    assert all("0.5x level" in unused[n] for n in tracker_sd if n.startswith("vision_encoder.neck.fpn_layers.3."))
    assert report.mapped["tracker_neck.fpn_layers.0.proj2.weight"] == ("vision_encoder.neck.fpn_layers.0.proj2.weight",)
    with pytest.raises(CheckpointError, match="Sam3TrackerModel checkpoint"):
        _plan_for(("vision", "text", "detector", "interactive"), tracker_src, cfg)

    from sam3_nn.model.sam3 import PARTS

    # this tiny Sam3VideoModel's video tracker keeps the released widths (256/64, not the
    # neck's 32): the image parts load from it, the video tracker is reported as not built
    image_parts = tuple(p for p in PARTS if p != "video")
    report, used, unused = _plan_for(image_parts, state_dict_source(video_sd), cfg)
    assert report.mapped["tracker_neck.fpn_layers.0.proj2.weight"] == ("tracker_neck.fpn_layers.0.proj2.weight",)
    assert report.mapped["vision_encoder.neck.fpn_layers.0.proj2.weight"] == \
        ("detector_model.vision_encoder.neck.fpn_layers.0.proj2.weight",)
    video = [n for n in video_sd if n.startswith("tracker_model.") and n not in used]
    assert video and all("video tracker" in unused[n] and "not built" in unused[n] for n in video)
    assert all("0.5x level" in unused[n] for n in video_sd if n.startswith("tracker_neck.fpn_layers.3."))


def test_hf_tracker_video_layouts_fully_mapped():
    """The video tracker through both HF layouts: a ``Sam3TrackerVideoModel`` (no prefix) and a
    ``Sam3VideoModel`` (``tracker_model.``): every tensor mapped, but
    ``no_memory_positional_encoding`` (never read) and the neck's 0.5x level."""
    from transformers import Sam3TrackerVideoModel, Sam3VideoConfig, Sam3VideoModel

    from sam3_nn.model.sam3 import PARTS
    from tests.refs import state_dict_source, tiny_hf_config, tiny_video_hf_config

    tracker_cfg = tiny_video_hf_config()
    cfg = Sam3Config.from_hf(tracker_cfg.to_dict())
    parts = ("vision", "interactive", "video")
    sd = Sam3TrackerVideoModel(tracker_cfg).state_dict()
    report, used, unused = _plan_for(parts, state_dict_source(sd), cfg)
    assert {n for n in sd if n.startswith(("memory_", "object_pointer", "temporal_", "occlusion_"))} <= used
    assert set(unused) == {"no_memory_positional_encoding"} | {
        n for n in sd if n.startswith("vision_encoder.neck.fpn_layers.3.")}
    assert report.mapped["tracker_model.memory_attention.layers.0.cross_attn_image.k_proj.weight"] == \
        ("memory_attention.layers.0.cross_attn_image.k_proj.weight",)

    detector = tiny_hf_config().to_dict()
    detector["vision_config"]["fpn_hidden_size"] = 128
    for k in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
        detector[k]["hidden_size"] = 128
    video = Sam3VideoModel(Sam3VideoConfig(detector_config=detector, tracker_config=tracker_cfg.to_dict()))
    vcfg = Sam3Config.from_hf(video.config.to_dict())
    assert vcfg.video == cfg.video
    vsd = video.state_dict()
    report, used, unused = _plan_for(PARTS, state_dict_source(vsd), vcfg)
    tracker = [n for n in vsd if n.startswith("tracker_model.") and n not in used]
    assert tracker == ["tracker_model.no_memory_positional_encoding"]
    assert report.mapped["tracker_model.no_object_pointer"] == ("tracker_model.no_object_pointer",)
