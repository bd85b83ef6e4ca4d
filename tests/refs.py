"""Shared test helpers: tiny random-weight references and our compiled counterparts."""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
import torch
import tvm
from tvm import relax

from sam3_nn.compiler.build import build, compile_module as build_module, resolve
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.compiler.pipeline import routing_passes
from sam3_nn.config import TINY_HF, Sam3Config  # noqa: F401  (TINY_HF: the tests' config)
from sam3_nn.model.sam3 import DEFAULT_PARTS
from sam3_nn.runtime.api import channel_first  # noqa: F401  (tests compare encode_image's maps in the reference's layout)
from sam3_nn.runtime.engine import CompiledModel


def tiny_hf_config(**overrides):
    from transformers import Sam3Config as HFSam3Config

    d = json.loads(json.dumps(TINY_HF))
    for k, v in overrides.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return HFSam3Config(**d)


# the tracker (interactive part) at the tiny size: the FPN's width (32), 2 heads
TINY_TRACKER = dict(
    prompt_encoder_config=dict(hidden_size=32, image_size=168, patch_size=14),
    mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
)


def tiny_tracker_hf_config(**overrides):
    """``transformers``' ``Sam3TrackerConfig`` at the tiny size (vision: ``TINY_HF``'s)."""
    from transformers import Sam3TrackerConfig

    d = json.loads(json.dumps(TINY_TRACKER))
    vision = json.loads(json.dumps(TINY_HF["vision_config"]))
    g = 168 // 14
    vision["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    # the last block global, as the original's ViT needs (original_ref.build_tiny): one
    # library serves the tests against transformers and against the original
    vision["backbone_config"]["global_attn_indexes"] = [2]
    d["vision_config"] = vision
    for k, v in overrides.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return Sam3TrackerConfig(**d)


def tiny_config(tracker: bool = True) -> Sam3Config:
    """Our tiny config (``TINY_HF``), with the tiny tracker section."""
    cfg = Sam3Config.from_hf(json.loads(json.dumps(TINY_HF)))
    if tracker:
        cfg.tracker = Sam3Config.from_hf(tiny_tracker_hf_config().to_dict()).tracker
    return cfg.validate()


def state_dict_source(state_dict, name: str = "<torch state dict>", fmt: str = "hf"):
    """A ``sam3_nn.weights`` tensor source over an in-memory state dict (names, shapes from
    the tensors; reading gives their float32 values)."""
    from sam3_nn.weights.loader import TensorSource

    meta = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}
    return TensorSource(name, fmt, meta, lambda k: state_dict[k].detach().float().cpu().numpy())


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values (LayerNorm weights near 1), so that no
    parameter is left at a default that would hide a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


def save_hf_snapshot(model, folder: str) -> str:
    """Write ``config.json`` + ``model.safetensors`` as an HF snapshot does."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f)
    return folder


def compile_library(cfg: Sam3Config, folder: str, dtype: str = "float32",
                    rope_mode: str = "normal", target: str = "llvm", parts=None, **options):
    """Compile ``cfg`` (the default parts, or ``parts``) for ``target`` into ``folder`` and load it (CPU).
    ``options``: further ``BuildOptions`` / ``KernelOptions`` fields."""
    art = build(cfg, BuildOptions(target=target, dtype=dtype, parts=tuple(parts or DEFAULT_PARTS))
                .with_(rope_mode=rope_mode, **options), folder)
    return CompiledModel(art["library"])


def compile_ir(mod, target="llvm", **options):
    """``mod`` (an exported IRModule) built through ``target``'s pipeline (operators routed
    as in a library build; ``options``: ``BuildOptions`` / ``KernelOptions`` fields), as a
    virtual machine on the CPU (built, not run, for other targets: the executable then)."""
    preset, opts = resolve(BuildOptions(target=target).with_(**options))
    ex = build_module(preset, opts, mod)
    return relax.VirtualMachine(ex, tvm.cpu()) if preset.target["kind"] == "llvm" else ex


def compile_module(module, spec, target="llvm", **options):
    """``module.forward`` exported with ``spec`` (inputs; packed parameters) and built by
    :func:`compile_ir`. Returns ``(run, expected)``: ``run(weights, *inputs)`` gives the
    outputs as numpy arrays, ``expected`` the parameters' names, shapes and dtypes in order."""
    mod, params = module.export_tvm(spec={"forward": {**spec, "$": {"param_mode": "packed",
                                                                    "effect_mode": "none"}}})
    vm = compile_ir(mod, target, **options)
    expected = {n: (tuple(int(s) for s in p.shape), str(p.dtype)) for n, p in params}

    def run(weights, *inputs):
        ps = [tvm.runtime.tensor(weights[n]) for n in expected]
        out = vm["forward"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs], ps)
        return [o.numpy() for o in out] if not hasattr(out, "numpy") else [out.numpy()]

    return run, expected


def routed(mod, target="llvm", **options):
    """``mod`` after the routing step of ``target``'s pipeline alone (operators and GEMMs to
    the target's kernels), to inspect what the pipeline chose."""
    preset, opts = resolve(BuildOptions(target=target).with_(**options))
    tgt = preset.tvm_target()
    with tgt:
        return tvm.transform.Sequential(routing_passes(tgt, opts.kernels, preset.cuda_arches or None))(mod)


def expected_params(compiled) -> Dict:
    return {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in compiled.manifest["params"]}


def assert_close(ours: np.ndarray, ref, rtol: float, atol: float, what: str = ""):
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=rtol, atol=atol, err_msg=what)


# the released sam3.pt layout (names, shapes, dtypes; no weights): a copy of
# shared/fixtures/sam3_pt_layout.json kept with the tests so a bare clone can run them
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "sam3_pt_layout.json")


def fixture_source():
    """A ``TensorSource`` with the released ``sam3.pt`` layout (names, shapes, dtypes from
    ``shared/fixtures/sam3_pt_layout.json``); reading a tensor gives zeros of its shape."""
    from sam3_nn.weights.loader import TensorSource

    path = os.environ.get("SAM3_PT_LAYOUT", FIXTURE)
    with open(path) as f:
        tensors = json.load(f)["tensors"]
    meta = {k: (tuple(s), t.replace("torch.", "")) for k, (s, t) in tensors.items()}

    def read(name):
        shape, dtype = meta[name]
        if dtype.startswith("complex"):
            raise AssertionError(f"complex tensor {name} must never be read")
        return np.zeros(shape, np.float32)

    return TensorSource(path, "pt", meta, read)


def tracker_processor():
    """``transformers``' ``Sam3TrackerProcessor`` for its coordinate and mask post-processing
    (``post_process_masks``, ``_normalize_tensor_coordinates``). Its image processor module
    imports ``torchvision.ops.boxes.batched_nms`` at module level, and torchvision does not
    import beside this CPU torch: a stand-in module holds that name during the import (the
    methods used never call it); the processors are made without ``__init__`` (which would
    set up torchvision transforms), with the attributes those methods read."""
    import sys
    import types

    from transformers import Sam3TrackerProcessor

    names = ("torchvision", "torchvision.ops", "torchvision.ops.boxes")
    saved = {k: sys.modules.get(k) for k in names}
    tv, ops, boxes = (types.ModuleType(n) for n in names)
    boxes.batched_nms = None
    tv.ops, ops.boxes = ops, boxes
    sys.modules.update(dict(zip(names, (tv, ops, boxes))))
    try:
        from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    image = Sam3ImageProcessor.__new__(Sam3ImageProcessor)
    proc = Sam3TrackerProcessor.__new__(Sam3TrackerProcessor)
    proc.image_processor, proc.point_pad_value = image, -10
    proc.target_size = TINY_HF["vision_config"]["backbone_config"]["image_size"]
    return proc


# the video tracker at the tiny size: a 128-wide FPN (two 64-wide memory tokens per object
# pointer, as the released 256 gives four), 12x12 grid, small MLPs
TINY_VIDEO = dict(
    prompt_encoder_config=dict(hidden_size=128, image_size=168, patch_size=14),
    mask_decoder_config=dict(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    memory_attention_hidden_size=128, memory_attention_feed_forward_hidden_size=64,
    memory_encoder_hidden_size=128, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
    memory_fuser_intermediate_dim=64, image_size=168,
)


def tiny_video_hf_config(**overrides):
    """``transformers``' ``Sam3TrackerVideoConfig`` at the tiny size (vision: ``TINY_HF``'s with
    a 128-wide neck)."""
    from transformers import Sam3TrackerVideoConfig

    d = json.loads(json.dumps(TINY_VIDEO))
    vision = json.loads(json.dumps(TINY_HF["vision_config"]))
    g = 168 // 14
    vision["fpn_hidden_size"] = 128
    vision["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    vision["backbone_config"]["global_attn_indexes"] = [2]
    d["vision_config"] = vision
    d.update(overrides)
    return Sam3TrackerVideoConfig(**d)


def tiny_sam3_video_hf_config(**overrides):
    """``transformers``' ``Sam3VideoConfig`` at the tiny size: ``TINY_HF``'s detector with the
    video tracker's 128-wide neck (the detector 128 wide too: it reads the same FPN width) and
    ``tiny_video_hf_config``'s tracker. ``overrides``: the planner's thresholds."""
    from transformers import Sam3VideoConfig

    d = json.loads(json.dumps(TINY_HF))
    g = 168 // 14
    d["vision_config"]["fpn_hidden_size"] = 128
    d["vision_config"]["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
    d["vision_config"]["backbone_config"]["global_attn_indexes"] = [2]
    for k in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
        d[k]["hidden_size"] = 128
    return Sam3VideoConfig(detector_config=d, tracker_config=tiny_video_hf_config().to_dict(),
                           low_res_mask_size=4 * g, **overrides)


def tracker_video_from(video_model):
    """A ``Sam3TrackerVideoModel`` with ``video_model``'s (a ``Sam3VideoModel``) weights: the
    detector's ViT trunk, the tracker neck and the tracker, as ``Sam3VideoModel`` runs them."""
    from transformers import Sam3TrackerVideoModel

    tracker = Sam3TrackerVideoModel(tiny_video_hf_config()).eval()
    src = video_model.state_dict()
    state = {}
    for k in tracker.state_dict():
        if k.startswith("vision_encoder.backbone."):
            state[k] = src["detector_model." + k]
        elif k.startswith("vision_encoder.neck."):
            state[k] = src["tracker_neck." + k[len("vision_encoder.neck."):]]
        else:
            state[k] = src["tracker_model." + k]
    tracker.load_state_dict(state, strict=True)
    return tracker


OBJECT_SCORE_SHIFT = 2.0


def build_tiny_video(folder: str, seed: int = 7) -> Dict:
    """A tiny ``Sam3VideoModel`` with every parameter perturbed (its HF snapshot, with a tiny
    word-level tokenizer, under ``folder/hf``) and one llvm float32 library with every part
    (``folder/lib``: vision, text, detector, interactive, video; 8 point slots), its weights
    bound through the HF ``Sam3VideoModel`` layout. ``hf``: the ``Sam3TrackerVideoModel``
    with the same weights (the tracker tests' reference), ``video_hf``: the whole model."""
    from transformers import Sam3VideoModel

    from sam3_nn.weights import load_params
    from tests.runtime.test_runtime import write_tokenizer

    torch.manual_seed(seed)  # the buffers drawn at construction (the prompt encoders' Fourier features)
    video_hf = randomize_(Sam3VideoModel(tiny_sam3_video_hf_config()).eval(), seed=seed)
    with torch.no_grad():  # objects mostly present (score logit > 0): tracked masks are not all empty
        video_hf.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.add_(OBJECT_SCORE_SHIFT)
    snapshot = save_hf_snapshot(video_hf, os.path.join(folder, "hf"))
    tokenizer = write_tokenizer(snapshot)
    cfg = Sam3Config.from_pretrained(snapshot)
    library = os.path.join(folder, "lib", "sam3-llvm.so")
    if not os.path.isfile(library):  # a folder reused across runs keeps its library
        art = build(cfg, BuildOptions(target="llvm", dtype="float32", parts=("vision", "text", "detector",
                                                                          "interactive", "video"),
                                      max_points=8), os.path.join(folder, "lib"))
        library = art["library"]
    lib = CompiledModel(library)
    params, _ = load_params(cfg, state_dict_source(video_hf.state_dict()), expected_params(lib),
                            lib.manifest["parts"])
    lib.bind(params)
    return {"hf": tracker_video_from(video_hf), "video_hf": video_hf, "lib": lib, "cfg": cfg,
            "snapshot": snapshot, "library": library, "tokenizer": tokenizer}
