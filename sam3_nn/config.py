"""One configuration object for the whole SAM 3 image model.

The defaults are the released SAM 3 sizes. ``Sam3Config.from_hf`` builds any size
from an HF ``config.json`` (the ``transformers`` ``Sam3Config`` layout), so the
tests can run the same code at tiny sizes.

LayerNorm epsilons are always the original SAM 3's (``ORIGINAL_LAYER_NORM_EPS``,
1e-5 in every part: ``vitdet.py`` builds its norms with ``eps=1e-5``, the rest use
PyTorch's default), whatever the checkpoint format: an HF ``config.json`` carries
``transformers``' defaults (1e-6 for the ViT, which the port really uses), written
out by ``save_pretrained`` whether or not they were ever the model's, so ``from_hf``
does not read them (docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

# the original's LayerNorm eps in every part (see the module docstring)
ORIGINAL_LAYER_NORM_EPS = 1e-5


def _pair(value, key: str = "size"):
    """Square sizes only: accept ``n`` or ``[n, n]`` (anything else is left for the type check)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}: only square sizes are supported, got {value!r}")
        return value[0]
    return value


@dataclass
class ViTConfig:
    """Perception-Encoder ViT trunk."""

    hidden_size: int = 1024
    intermediate_size: int = 4736
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 1008
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS
    window_size: int = 24
    global_attn_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])
    pretrain_image_size: int = 336
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side of the patch grid (72 at 1008 px)."""
        return self.image_size // self.patch_size

    @property
    def pretrain_grid(self) -> int:
        """Side of the absolute position-embedding table (24 for SAM 3)."""
        return self.pretrain_image_size // self.patch_size

    def is_global(self, layer: int) -> bool:
        return layer in self.global_attn_indexes

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vit hidden_size must be a multiple of num_attention_heads")
        if self.head_dim % 4:
            raise ValueError(f"2D axial RoPE needs head_dim % 4 == 0, got {self.head_dim}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"unsupported vit hidden_act {self.hidden_act!r} (expected 'gelu')")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.num_hidden_layers - 1}")


@dataclass
class VisionConfig:
    """ViT trunk + FPN neck."""

    backbone: ViTConfig = field(default_factory=ViTConfig)
    fpn_hidden_size: int = 256
    scale_factors: List[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])

    def validate(self) -> None:
        self.backbone.validate()
        for s in self.scale_factors:
            if s not in (4.0, 2.0, 1.0, 0.5):
                raise ValueError(f"unsupported FPN scale factor {s} (expected 4, 2, 1 or 0.5)")

    def level_sizes(self) -> List[int]:
        g = self.backbone.grid_size
        return [int(g * s) if s >= 1 else g // 2 for s in self.scale_factors]


@dataclass
class TextConfig:
    """CLIP-style text transformer (causal) + resizer to the detector width."""

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 32
    hidden_act: str = "gelu"
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclass
class GeometryEncoderConfig:
    hidden_size: int = 256
    num_layers: int = 3
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS
    roi_size: int = 7


@dataclass
class DetrEncoderConfig:
    hidden_size: int = 256
    num_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS


@dataclass
class DetrDecoderConfig:
    hidden_size: int = 256
    num_layers: int = 6
    num_queries: int = 200
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS


@dataclass
class MaskDecoderConfig:
    hidden_size: int = 256
    num_upsampling_stages: int = 3
    layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS
    num_attention_heads: int = 8


@dataclass
class TrackerConfig:
    """SAM 3's interactive (SAM 2-style) prompt encoder and mask decoder: the tracker's
    ``sam_prompt_encoder`` / ``sam_mask_decoder`` (released sizes as defaults). Their
    width is the FPN's (``vision.fpn_hidden_size``); the image and mask-input sizes
    follow from the ViT grid (``4 x grid`` mask inputs, 288 at 1008 px)."""

    mask_input_channels: int = 16
    num_attention_heads: int = 8
    mlp_dim: int = 2048
    num_layers: int = 2  # two-way transformer blocks
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # single-mask output falls back to the best multimask one when its stability
    # (IoU of the masks thresholded at +-delta) is below thresh (release: on, 0.05, 0.98)
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    def validate(self, hidden: int) -> None:
        internal = hidden // self.attention_downsample_rate
        if hidden % self.num_attention_heads or internal % self.num_attention_heads:
            raise ValueError(f"tracker: width {hidden} (and {internal} in the cross attentions) "
                             f"is not a multiple of {self.num_attention_heads} heads")
        if self.mask_input_channels % 4 or hidden % 8:
            raise ValueError(f"tracker: mask_input_channels ({self.mask_input_channels}) must be a "
                             f"multiple of 4 and the width ({hidden}) of 8")
        if self.num_multimask_outputs != 3 or self.num_layers < 1 or self.iou_head_depth < 2:
            raise ValueError("tracker: 3 multimask outputs, at least one block and a 2+ layer IoU head "
                             "are supported")


@dataclass
class VideoConfig:
    """The video tracker (memory attention, memory encoder, object pointers) of
    ``Sam3TrackerVideoConfig``; released sizes as defaults. Its width is the FPN's
    (``fpn_hidden_size``), the memory's ``mem_dim`` (64)."""

    num_maskmem: int = 7  # memory frames: the conditioning slot + 6 most recent
    max_cond_frame_num: int = 4
    max_object_pointers: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    mem_dim: int = 64
    memory_attention_num_layers: int = 4
    memory_attention_num_heads: int = 1
    memory_attention_feed_forward_size: int = 2048
    rope_theta: float = 10000.0
    mask_downsampler_total_stride: int = 16
    memory_fuser_num_layers: int = 2
    memory_fuser_intermediate_dim: int = 1024
    memory_fuser_kernel_size: int = 7
    # the HF flags the released model sets; only these values are supported
    enable_occlusion_spatial_embedding: bool = True
    enable_temporal_pos_encoding_for_object_pointers: bool = True

    def validate(self, hidden: int) -> None:
        if hidden % self.mem_dim:
            raise ValueError(f"video: the width {hidden} must be a multiple of mem_dim {self.mem_dim}")
        head = hidden // self.memory_attention_num_heads
        if hidden % self.memory_attention_num_heads or head % 4:
            raise ValueError(f"video: width {hidden} over {self.memory_attention_num_heads} heads needs a "
                             "head width that is a multiple of 4 (2D RoPE)")
        if self.mask_downsampler_total_stride != 16 or self.memory_fuser_kernel_size % 2 == 0:
            raise ValueError("video: a mask downsampler of total stride 16 and an odd fuser kernel are supported")
        if not (self.enable_occlusion_spatial_embedding and self.enable_temporal_pos_encoding_for_object_pointers):
            raise ValueError("video: the occlusion embedding and the pointers' temporal encoding must be on "
                             "(the released model's settings)")
        if self.num_maskmem < 2 or self.max_object_pointers < 2:
            raise ValueError("video: num_maskmem and max_object_pointers must be at least 2")

    @property
    def memory_slots(self) -> int:
        """Memory frames one step attends to: conditioning frames + the recent ones."""
        return self.max_cond_frame_num + self.num_maskmem - 1

    @property
    def pointer_slots(self) -> int:
        """Object pointers one step attends to: conditioning frames' + the recent ones."""
        return self.max_cond_frame_num + self.max_object_pointers - 1


def _video_from_hf(d: Dict[str, Any]) -> "VideoConfig":
    """A ``Sam3TrackerVideoConfig`` dict -> ours (checks what we do not model)."""
    for key, want in (("memory_attention_downsample_rate", 1), ("memory_attention_feed_forward_hidden_act", "relu"),
                      ("mask_downsampler_stride", 2), ("mask_downsampler_kernel_size", 3),
                      ("mask_downsampler_padding", 1), ("mask_downsampler_hidden_act", "gelu"),
                      ("memory_fuser_hidden_act", "gelu"), ("multimask_output_in_sam", True),
                      ("multimask_min_pt_num", 0), ("multimask_max_pt_num", 1),
                      ("multimask_output_for_tracking", True), ("memory_encoder_output_channels", 64)):
        if key in d and d[key] != want:
            raise ValueError(f"tracker_config: {key} {d[key]!r} is not supported (expected {want!r})")
    rope = d.get("rope_parameters") or {}
    keys = {"num_maskmem": "num_maskmem", "max_cond_frame_num": "max_cond_frame_num",
            "max_object_pointers": "max_object_pointers_in_encoder",
            "sigmoid_scale_for_mem_enc": "sigmoid_scale_for_mem_enc",
            "sigmoid_bias_for_mem_enc": "sigmoid_bias_for_mem_enc",
            "memory_attention_num_layers": "memory_attention_num_layers",
            "memory_attention_num_heads": "memory_attention_num_attention_heads",
            "memory_attention_feed_forward_size": "memory_attention_feed_forward_hidden_size",
            "mask_downsampler_total_stride": "mask_downsampler_total_stride",
            "memory_fuser_num_layers": "memory_fuser_num_layers",
            "memory_fuser_intermediate_dim": "memory_fuser_intermediate_dim",
            "memory_fuser_kernel_size": "memory_fuser_kernel_size",
            "enable_occlusion_spatial_embedding": "enable_occlusion_spatial_embedding",
            "enable_temporal_pos_encoding_for_object_pointers": "enable_temporal_pos_encoding_for_object_pointers"}
    values = {ours: d[theirs] for ours, theirs in keys.items() if d.get(theirs) is not None}
    if isinstance(rope, dict) and "rope_theta" in rope:
        values["rope_theta"] = float(rope["rope_theta"])
    # the sigmoid bias is negative: check_fields wants positive floats, so it is kept as given
    return VideoConfig(**values)


_SECTIONS = {
    "vision": VisionConfig,
    "text": TextConfig,
    "geometry": GeometryEncoderConfig,
    "detr_encoder": DetrEncoderConfig,
    "detr_decoder": DetrDecoderConfig,
    "mask_decoder": MaskDecoderConfig,
    "tracker": TrackerConfig,
    "video": VideoConfig,
}

# HF config.json section name -> our section name
_HF_SECTIONS = {
    "text_config": "text",
    "geometry_encoder_config": "geometry",
    "detr_encoder_config": "detr_encoder",
    "detr_decoder_config": "detr_decoder",
    "mask_decoder_config": "mask_decoder",
}


def _fill(cls, values: Dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from the keys of ``values`` it knows; ignore the rest."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or cls.__name__} must be a JSON object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_SIGNED = {"sigmoid_bias_for_mem_enc"}  # float fields that may be negative


def check_fields(obj, where: str) -> None:
    """Every field of a config dataclass (and those nested in it) has its declared type:
    sizes and counts are integers >= 1 (token ids >= 0), floats finite and positive,
    lists of those; ``ValueError`` naming the key otherwise (a config.json with ``"64"`` for
    a size would fail far later, inside the model code)."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{where}.{f.name}"
        if dataclasses.is_dataclass(v):
            check_fields(v, key)
            continue
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if t == "int":
            low = 0 if f.name.endswith("_id") else 1
            if not _is_int(v) or v < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")
        elif t == "float":
            if not _is_number(v) or (v <= 0 and f.name not in _SIGNED):
                raise ValueError(f"{key} must be a positive number, got {v!r}")
        elif t == "str":
            if not isinstance(v, str):
                raise ValueError(f"{key} must be a string, got {v!r}")
        elif t == "List[int]":
            if not isinstance(v, list) or not all(_is_int(x) and x >= 0 for x in v):
                raise ValueError(f"{key} must be a list of integers >= 0, got {v!r}")
        elif t == "List[float]":
            if not isinstance(v, list) or not all(_is_number(x) and x > 0 for x in v):
                raise ValueError(f"{key} must be a list of positive numbers, got {v!r}")


def _without_eps(values: Dict[str, Any]) -> Dict[str, Any]:
    """An HF config section less ``layer_norm_eps``: its value is the port's default, not
    the original's (module docstring)."""
    return {k: v for k, v in values.items() if k != "layer_norm_eps"}


def _tracker_from_hf(prompt: Dict[str, Any], decoder: Dict[str, Any]) -> TrackerConfig:
    """``Sam3TrackerPromptEncoderConfig`` + ``Sam3TrackerMaskDecoderConfig`` dicts -> ours
    (their widths must be the FPN's; their eps are the port's 1e-6, the original's
    LayerNorm2d default, fixed in the model)."""
    for name, d in (("prompt_encoder_config", prompt), ("mask_decoder_config", decoder)):
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{name}: hidden_act {act!r} is not supported (expected 'gelu')")
    if decoder.get("num_hidden_layers", 2) != 2:
        raise ValueError("mask_decoder_config: the two-way transformer's MLP has 2 layers "
                         f"(num_hidden_layers 2), got {decoder['num_hidden_layers']}")
    keys = {"mask_input_channels": prompt, "num_attention_heads": decoder, "mlp_dim": decoder,
            "attention_downsample_rate": decoder, "num_multimask_outputs": decoder,
            "iou_head_depth": decoder, "iou_head_hidden_dim": decoder,
            "dynamic_multimask_via_stability": decoder, "dynamic_multimask_stability_delta": decoder,
            "dynamic_multimask_stability_thresh": decoder}
    return _fill(TrackerConfig, {k: src[k] for k, src in keys.items() if k in src})


@dataclass
class Sam3Config:
    """The SAM 3 image model (detector) with the released sizes as defaults."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    geometry: GeometryEncoderConfig = field(default_factory=GeometryEncoderConfig)
    detr_encoder: DetrEncoderConfig = field(default_factory=DetrEncoderConfig)
    detr_decoder: DetrDecoderConfig = field(default_factory=DetrDecoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    @property
    def image_size(self) -> int:
        return self.vision.backbone.image_size

    def mask_decoder_levels(self) -> int:
        """FPN levels the mask decoder receives: all but the coarsest (0.5x) one."""
        return len(self.vision.scale_factors) - 1

    def tracker_levels(self) -> List[int]:
        """Sizes of the tracker neck's maps (its 0.5x level is dropped, ``scalp=1``):
        ``[4g, 2g, g]`` for a ``g x g`` ViT grid (288, 144, 72 at 1008 px)."""
        if list(self.vision.scale_factors[:3]) != [4.0, 2.0, 1.0]:
            raise ValueError("the tracker needs FPN scale factors starting 4, 2, 1, got "
                             f"{self.vision.scale_factors}")
        return self.vision.level_sizes()[:3]

    def validate(self) -> "Sam3Config":
        check_fields(self, "config")
        self.vision.validate()
        self.tracker.validate(self.vision.fpn_hidden_size)
        # the video tracker's widths are checked where it is built (a tiny image model may
        # be narrower than its 64-wide memory)
        return self

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Sam3Config":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        vision = d.get("vision", {})
        if not isinstance(vision, dict):
            raise ValueError(f"vision must be a JSON object, got {type(vision).__name__}")
        vision = dict(vision)
        backbone = _fill(ViTConfig, vision.pop("backbone", {}), "vision.backbone")
        kw = {"vision": _fill(VisionConfig, {**vision, "backbone": backbone}, "vision")}
        for name, sub in _SECTIONS.items():
            if name != "vision" and name in d:
                kw[name] = _fill(sub, d[name], name)
        return cls(**kw).validate()

    @classmethod
    def from_hf(cls, hf: Dict[str, Any], base: "Sam3Config | None" = None) -> "Sam3Config":
        """From an HF ``Sam3Config`` dict (``config.json``), a ``Sam3VisionConfig``, a
        ``Sam3TrackerConfig`` (``sam3_tracker``: vision + prompt encoder + mask decoder), a
        ``Sam3TrackerVideoConfig`` (``sam3_tracker_video``: that + the video tracker) or a
        ``Sam3VideoConfig`` (``sam3_video``: its detector and tracker configs). Sections the
        dict does not describe come from ``base`` (default: the released sizes)."""
        if not isinstance(hf, dict):
            raise ValueError(f"an HF config (config.json) must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type == "sam3_video":
            detector = dict(hf.get("detector_config") or {}, model_type="sam3")
            cfg = cls.from_hf(detector, base)
            tracker = hf.get("tracker_config")
            if tracker:
                cfg.tracker = cls.from_hf(dict(tracker, model_type="sam3_tracker")).tracker
                try:
                    cfg.video = cls.from_hf(dict(tracker, model_type="sam3_tracker_video")).video
                except ValueError:
                    pass  # a video tracker we cannot build (its widths): the image parts still can
            return cfg.validate()
        if model_type == "sam3_tracker_video":
            cfg = cls.from_hf(dict(hf, model_type="sam3_tracker"), base)
            width = cfg.vision.fpn_hidden_size
            for key in ("memory_attention_hidden_size", "memory_encoder_hidden_size",
                        "mask_downsampler_embed_dim", "memory_fuser_embed_dim"):
                if hf.get(key, width) != width:
                    raise ValueError(f"{key} {hf[key]} differs from the FPN's width {width}")
            cfg.video = _video_from_hf(hf)
            cfg.video.validate(width)
            return cfg.validate()
        if model_type == "sam3_tracker":
            vision = dict(hf.get("vision_config") or {}, model_type="sam3_vision_model")
            cfg = cls.from_hf(vision, base)
            prompt, decoder = hf.get("prompt_encoder_config") or {}, hf.get("mask_decoder_config") or {}
            width = cfg.vision.fpn_hidden_size
            for name, d in (("prompt_encoder_config", prompt), ("mask_decoder_config", decoder)):
                if d.get("hidden_size", width) != width:
                    raise ValueError(f"{name}: hidden_size {d['hidden_size']} differs from the FPN's "
                                     f"{width}")
            for key, ours in (("image_size", cfg.image_size),
                              ("patch_size", cfg.vision.backbone.patch_size)):
                if key in prompt and _pair(prompt[key]) != ours:
                    raise ValueError(f"prompt_encoder_config: {key} {prompt[key]} differs from the "
                                     f"vision encoder's {ours}")
            cfg.tracker = _tracker_from_hf(prompt, decoder)
            return cfg.validate()
        if model_type == "sam3_vision_model":
            vision_hf, rest = hf, {}
        elif model_type in (None, "sam3"):
            vision_hf, rest = hf.get("vision_config") or {}, hf
        else:
            raise ValueError(
                f"config.json has model_type {model_type!r}; expected 'sam3', 'sam3_tracker', 'sam3_tracker_video' or "
                "'sam3_video' (a SAM 3 checkpoint)"
            )
        if not isinstance(vision_hf, dict):
            raise ValueError(f"vision_config must be a JSON object, got {type(vision_hf).__name__}")
        bb = vision_hf.get("backbone_config") or {}
        if not isinstance(bb, dict):
            raise ValueError(f"vision_config.backbone_config must be a JSON object, got {type(bb).__name__}")
        bb = dict(bb)
        for key in ("image_size", "patch_size", "pretrain_image_size"):
            if key in bb:
                bb[key] = _pair(bb[key], f"vision_config.backbone_config.{key}")
        rope = bb.get("rope_parameters") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            bb["rope_theta"] = rope["rope_theta"]
        vision = _fill(VisionConfig, {**_without_eps(vision_hf),
                                      "backbone": _fill(ViTConfig, _without_eps(bb), "vision_config.backbone_config")},
                       "vision_config")
        kw: Dict[str, Any] = {"vision": vision}
        if base is not None:
            kw.update({name: dataclasses.replace(getattr(base, name)) for name in _SECTIONS
                       if name != "vision"})
        for hf_name, ours in _HF_SECTIONS.items():
            if rest.get(hf_name):
                if not isinstance(rest[hf_name], dict):
                    raise ValueError(f"{hf_name} must be a JSON object, got {type(rest[hf_name]).__name__}")
                kw[ours] = _fill(_SECTIONS[ours], _without_eps(rest[hf_name]), hf_name)
        return cls(**kw).validate()

    @classmethod
    def from_pretrained(cls, path: str) -> "Sam3Config":
        """From an HF snapshot directory, a ``config.json``, or a ``sam3.pt`` (released sizes)."""
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(
                    f"{path} is a directory without config.json; expected an HF SAM 3 snapshot"
                )
            path = cfg_path
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {path}: {e}") from e
            return cls.from_hf(hf)
        if path.endswith((".pt", ".pth")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            # The original checkpoint carries no config: it is the released architecture.
            return cls()
        raise ValueError(
            f"cannot take a model architecture from {path!r}: expected an HF snapshot "
            "directory, a config.json or a sam3.pt"
        )


# A tiny SAM 3: 12x12 token grid with window 5 (not a multiple: padding is exercised),
# one global block, every part 32 wide with 2 heads. The ViT's LayerNorm eps is the
# original's 1e-5 (transformers' default 1e-6 is the port's, not SAM 3's: docs/fidelity.md).
TINY_HF = dict(
    vision_config=dict(
        backbone_config=dict(model_type="sam3_vit_model", hidden_size=64, intermediate_size=128,
                             num_hidden_layers=3, num_attention_heads=4, image_size=168,
                             patch_size=14, window_size=5, global_attn_indexes=[1],
                             pretrain_image_size=70, layer_norm_eps=1e-5),
        fpn_hidden_size=32),
    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                     bos_token_id=998, eos_token_id=999, pad_token_id=1),
    geometry_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2,
                                 intermediate_size=64),
    detr_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2,
                             intermediate_size=64),
    detr_decoder_config=dict(hidden_size=32, num_layers=2, num_queries=10,
                             num_attention_heads=2, intermediate_size=64),
    mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
)
