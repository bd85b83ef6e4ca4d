"""Config: released defaults, HF config.json round trip, bad configs."""

import json

import pytest

from sam3_nn.config import Sam3Config


def test_released_defaults():
    c = Sam3Config()
    bb = c.vision.backbone
    assert (bb.image_size, bb.patch_size, bb.hidden_size, bb.num_hidden_layers) == (1008, 14, 1024, 32)
    assert (bb.num_attention_heads, bb.intermediate_size, bb.window_size) == (16, 4736, 24)
    assert bb.global_attn_indexes == [7, 15, 23, 31] and bb.pretrain_grid == 24 and bb.grid_size == 72
    assert c.vision.fpn_hidden_size == 256 and c.vision.scale_factors == [4.0, 2.0, 1.0, 0.5]
    assert c.vision.level_sizes() == [288, 144, 72, 36]


def test_from_hf_default_config_equals_released():
    from transformers import Sam3Config as HF

    ours = Sam3Config.from_hf(json.loads(HF().to_json_string()))
    assert ours.to_dict() == Sam3Config().to_dict()


def test_from_hf_small_config():
    from transformers import Sam3Config as HF

    from tests.refs import TINY_HF

    ours = Sam3Config.from_hf(HF(**TINY_HF).to_dict())
    assert ours.vision.backbone.hidden_size == 64 and ours.vision.fpn_hidden_size == 32
    assert ours.text.hidden_size == 32 and ours.detr_decoder.num_queries == 10


def test_dict_roundtrip():
    c = Sam3Config()
    c.vision.backbone.num_hidden_layers = 8
    c.vision.backbone.global_attn_indexes = [3, 7]
    assert Sam3Config.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="model_type 'clip'"):
        Sam3Config.from_hf({"model_type": "clip"})
    c = Sam3Config()
    c.vision.backbone.image_size = 1000
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        c.validate()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        Sam3Config.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read"):
        Sam3Config.from_pretrained(str(tmp_path))


def test_config_values_of_the_wrong_type_are_named(tmp_path):
    """A config.json that is not an object, or holds strings, fractions or negative numbers
    where sizes go, is a ValueError naming the key (not a TypeError from deep in the model)."""
    from tests.refs import TINY_HF

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Sam3Config.from_pretrained(str(tmp_path))
    cases = [(("text_config", "hidden_size"), "64", "text.hidden_size"),
             (("detr_decoder_config", "num_queries"), 2.5, "detr_decoder.num_queries"),
             (("detr_encoder_config", "num_layers"), 0, "detr_encoder.num_layers"),
             (("geometry_encoder_config", "hidden_act"), 3, "geometry.hidden_act"),
             (("vision_config", "fpn_hidden_size"), True, "vision.fpn_hidden_size")]
    for (section, key), value, name in cases:
        hf = json.loads(json.dumps(TINY_HF))
        hf[section][key] = value
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            Sam3Config.from_hf(hf)
    hf = json.loads(json.dumps(TINY_HF))
    hf["vision_config"]["backbone_config"]["image_size"] = -14  # a multiple of the patch size
    with pytest.raises(ValueError, match="image_size must be an integer >= 1"):
        Sam3Config.from_hf(hf)
    hf["vision_config"] = "tiny"
    with pytest.raises(ValueError, match="vision_config must be a JSON object"):
        Sam3Config.from_hf(hf)
    c = Sam3Config()
    c.vision.backbone.image_size = -1008
    with pytest.raises(ValueError, match="image_size"):
        c.validate()


def test_from_hf_tracker_and_video_configs():
    """``Sam3TrackerConfig`` (vision + prompt encoder + mask decoder) and ``Sam3VideoConfig``
    (detector + tracker): the released defaults read back as ours; a tiny tracker config
    gives its sizes, sections it does not describe come from ``base``."""
    from transformers import Sam3TrackerConfig, Sam3VideoConfig

    from tests.refs import tiny_tracker_hf_config

    assert Sam3Config.from_hf(Sam3TrackerConfig().to_dict()).to_dict() == Sam3Config().to_dict()
    assert Sam3Config.from_hf(Sam3VideoConfig().to_dict()).to_dict() == Sam3Config().to_dict()
    base = Sam3Config()
    base.text.num_hidden_layers = 3
    tiny = Sam3Config.from_hf(tiny_tracker_hf_config().to_dict(), base=base)
    assert tiny.vision.fpn_hidden_size == 32 and tiny.tracker.num_attention_heads == 2
    assert tiny.tracker.mlp_dim == 64 and tiny.tracker.iou_head_hidden_dim == 32
    assert tiny.text.num_hidden_layers == 3  # not in a tracker config: the base's
    assert tiny.tracker_levels() == [48, 24, 12]
    with pytest.raises(ValueError, match="hidden_size 64 differs from the FPN's 32"):
        Sam3Config.from_hf(tiny_tracker_hf_config(mask_decoder_config={"hidden_size": 64}).to_dict())
