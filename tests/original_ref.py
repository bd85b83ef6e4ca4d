"""The original SAM 3 package (``sam3`` 0.1.4 on PyPI) run on the CPU, at any size.

The original's image model modules are built here at a tiny size, the same way
``sam3.model_builder`` builds the released model (same classes and options, smaller
widths), so tests can compare our library with the original itself rather than
with ``transformers``' port.

The package imports ``torchvision``, ``timm``, ``triton`` and ``pycocotools`` (training data
loaders) at module level; none
imports on these CPU machines. Where a real one is missing it is replaced, during the
import only, by stand-ins that compute nothing: names the image model never calls are
inert placeholders (calling one raises), and the three names it does run are exact:

* ``torchvision.ops.roi_align`` (geometry box pooling): ``tests/torch_roi_align.py``,
  checked by hand in ``test_roi_align.py``;
* ``timm.layers.Mlp`` (ViT blocks): fc1 -> GELU -> fc2, timm's layer and parameter names
  (its dropouts are 0 and its norm is ``Identity`` in the configuration SAM 3 uses);
* ``timm.layers.DropPath``: identity in eval mode (the only mode run here);
  ``trunc_normal_`` (initialisation only, every parameter is then overwritten).

The package itself must be installed (``pip install --no-deps sam3==0.1.4``, as
``make install`` does; its own dependencies ``ftfy``, ``iopath`` and ``einops`` are in the
test extras); without it the tests that use this module are skipped with that reason.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Dict, Iterable, Optional

import numpy as np
import pytest
import torch
from torch import nn

from tests import torch_roi_align

STAND_IN_ROOTS = ("torchvision", "timm", "triton", "pycocotools")


# ----------------------------------------------------------------------------
# stand-ins
# ----------------------------------------------------------------------------
class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{cls.__name__}.{name}")


class _Inert(metaclass=_InertMeta):
    """A placeholder class: importable, subclassable, constructible; never computes."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"stand-in {type(self).__name__} was called: this path needs the real package")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{type(self).__name__}.{name}")


def _inert(name: str):
    return _InertMeta(name, (_Inert,), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _inert(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class Mlp(nn.Module):
    """timm's ``Mlp`` as SAM 3's ViT builds it (GELU, no norm, dropout 0)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 norm_layer=None, bias=True, drop=0.0, use_conv=False):
        super().__init__()
        assert norm_layer is None and not use_conv, "SAM 3 builds timm's Mlp without norm or conv"
        drops = drop if isinstance(drop, (tuple, list)) else (drop, drop)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drops[0])
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drops[1])

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()

    def forward(self, x):
        assert not self.training, "the stand-in DropPath is the eval-mode identity only"
        return x


def _real_overrides() -> Dict[str, Dict[str, object]]:
    return {
        "torchvision.ops": {"roi_align": torch_roi_align.roi_align},
        "torchvision.ops.roi_align": {"roi_align": torch_roi_align.roi_align},
        "timm.layers": {"Mlp": Mlp, "DropPath": DropPath, "trunc_normal_": nn.init.trunc_normal_},
        "timm.models.layers": {"Mlp": Mlp, "DropPath": DropPath, "trunc_normal_": nn.init.trunc_normal_},
    }


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Iterable[str]):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        for k, v in _real_overrides().get(spec.name, {}).items():
            setattr(module, k, v)
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def _missing(root: str) -> bool:
    try:
        importlib.import_module(root)
        return False
    except Exception:  # torchvision may be present but fail to import (ABI mismatch)
        sys.modules.pop(root, None)
        return True


@contextmanager
def stand_ins():
    """Stand-ins for the missing heavy imports, for the duration of the import only."""
    roots = [r for r in STAND_IN_ROOTS if _missing(r)]
    finder = _StandInFinder(roots)
    sys.meta_path.insert(0, finder)
    try:
        yield roots
    finally:
        sys.meta_path.remove(finder)
        # importing a submodule rebinds the parent's attribute of that name: put the
        # functions back (``torchvision.ops.roi_align`` is the function, as in torchvision)
        for name, attrs in _real_overrides().items():
            if isinstance(sys.modules.get(name), _StandInModule):
                for k, v in attrs.items():
                    setattr(sys.modules[name], k, v)
        for name in [n for n in sys.modules if n.split(".")[0] in roots]:
            del sys.modules[name]


_MODULES: Optional[types.SimpleNamespace] = None


def original():
    """The original package's modules used here (imported once), or skip the test."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    if importlib.util.find_spec("sam3") is None:
        pytest.skip("the original SAM 3 package is not installed (pip install --no-deps sam3==0.1.4)")
    with stand_ins():
        # the package __init__ imports the builder, which needs the hub client and iopath
        # only to download checkpoints: load the submodules without running it
        spec = importlib.util.find_spec("sam3")
        if "sam3" not in sys.modules:
            pkg = types.ModuleType("sam3")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["sam3"] = pkg
        names = dict(
            vitdet="sam3.model.vitdet", necks="sam3.model.necks", pos="sam3.model.position_encoding",
            text="sam3.model.text_encoder_ve", vl="sam3.model.vl_combiner",
            encoder="sam3.model.encoder", decoder="sam3.model.decoder", misc="sam3.model.model_misc",
            seg="sam3.model.maskformer_segmentation", geo="sam3.model.geometry_encoders",
            image="sam3.model.sam3_image", data="sam3.model.data_misc",
            processor="sam3.model.sam3_image_processor", tokenizer="sam3.model.tokenizer_ve",
        )
        _MODULES = types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})
    return _MODULES


# ----------------------------------------------------------------------------
# a tiny original image model
# ----------------------------------------------------------------------------
class FixedTokenizer:
    """Stands for the BPE tokenizer: each prompt string maps to given ids (a row of
    ``[L]`` longs, 0-padded as the original's tokenizer pads)."""

    def __init__(self):
        self.rows: Dict[str, torch.Tensor] = {}

    def __call__(self, texts, context_length=None):
        return torch.stack([self.rows[t] for t in texts])


def build_tiny(image_size=168, patch=14, vit_width=64, vit_depth=3, vit_heads=4, vit_mlp=128,
               window=5, global_blocks=(2,), pretrain_image_size=70, width=32, heads=2, ffn=64,
               text_width=32, text_layers=2, text_heads=2, context=16, vocab=1000, queries=10,
               geo_layers=2, enc_layers=2, dec_layers=2, sam2_neck=False):
    """``Sam3Image`` with ``model_builder``'s options at a small size. The ViT's last block must
    be global: the original takes the ViT's output after the last global block. ``sam2_neck``:
    the tracker's second FPN neck too (``enable_inst_interactivity``)."""
    o = original()
    nn_ = torch.nn
    MHA = o.misc.MultiheadAttentionWrapper
    vit = o.vitdet.ViT(
        img_size=image_size, pretrain_img_size=pretrain_image_size, patch_size=patch,
        embed_dim=vit_width, depth=vit_depth, num_heads=vit_heads, mlp_ratio=vit_mlp / vit_width,
        norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True, use_abs_pos=True,
        tile_abs_pos=True, global_att_blocks=tuple(global_blocks), rel_pos_blocks=(), use_rope=True,
        use_interp_rope=True, window_size=window, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
        bias_patch_embed=False, compile_mode=None)
    assert vit_depth - 1 in global_blocks, "the original's ViT output is taken at the last global block"
    pos = o.pos.PositionEmbeddingSine(num_pos_feats=width, normalize=True, scale=None,
                                      temperature=10000, precompute_resolution=None)
    neck = o.necks.Sam3DualViTDetNeck(position_encoding=pos, d_model=width,
                                      scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit,
                                      add_sam2_neck=sam2_neck)
    tokenizer = FixedTokenizer()
    text = o.text.VETextEncoder(tokenizer=tokenizer, d_model=width, width=text_width,
                                heads=text_heads, layers=text_layers, context_length=context,
                                vocab_size=vocab)
    backbone = o.vl.SAM3VLBackbone(visual=neck, text=text, scalp=1)

    enc_layer = o.encoder.TransformerEncoderLayer(
        activation="relu", d_model=width, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=width, batch_first=True),
        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=width, batch_first=True))
    encoder = o.encoder.TransformerEncoderFusion(
        layer=enc_layer, num_layers=enc_layers, d_model=width, num_feature_levels=1, frozen=False,
        use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True)
    dec_layer = o.decoder.TransformerDecoderLayer(
        activation="relu", d_model=width, dim_feedforward=ffn, dropout=0.1,
        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=width), n_heads=heads,
        use_text_cross_attention=True)
    # resolution / stride only pre-fill a coordinate cache (on "cuda"): left out
    decoder = o.decoder.TransformerDecoder(
        layer=dec_layer, num_layers=dec_layers, num_queries=queries, return_intermediate=True,
        box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log", d_model=width, frozen=False,
        interaction_layer=None, dac_use_selfatt_ln=True, use_act_checkpoint=True,
        presence_token=True)
    transformer = o.misc.TransformerWrapper(encoder=encoder, decoder=decoder, d_model=width)
    scoring = o.misc.DotProductScoring(
        d_model=width, d_proj=width,
        prompt_mlp=o.misc.MLP(input_dim=width, hidden_dim=ffn, output_dim=width, num_layers=2,
                              dropout=0.1, residual=True, out_norm=nn_.LayerNorm(width)))
    pixel_decoder = o.seg.PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest",
                                       hidden_dim=width, compile_mode=None)
    seg = o.seg.UniversalSegmentationHead(
        hidden_dim=width, upsampling_stages=3, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=True,
        cross_attend_prompt=MHA(num_heads=heads, dropout=0, embed_dim=width),
        pixel_decoder=pixel_decoder)
    geo_layer = o.encoder.TransformerEncoderLayer(
        activation="relu", d_model=width, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=False,
        pre_norm=True, pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        self_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=width, batch_first=False),
        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=width, batch_first=False))
    geo = o.geo.SequenceGeometryEncoder(
        pos_enc=o.pos.PositionEmbeddingSine(num_pos_feats=width, normalize=True, scale=None,
                                            temperature=10000),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True,
        d_model=width, num_layers=geo_layers, layer=geo_layer, use_act_ckpt=True, add_cls=True,
        add_post_encode_proj=True)
    model = o.image.Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=geo,
        segmentation_head=seg, num_feature_levels=1, o2m_mask_predict=True,
        dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
        inst_interactive_predictor=None, matcher=None)
    model.tokenizer = tokenizer
    return model.eval()


def release_layout(model) -> Dict[str, torch.Tensor]:
    """The model's tensors named as in the released ``sam3.pt`` (``detector.`` prefix)."""
    return {"detector." + k: v.detach().clone() for k, v in model.state_dict().items()}


OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


@contextmanager
def _cpu_pin_memory():
    """The geometry encoder pins a 4-value tensor before moving it to the features' device;
    without an accelerator ``pin_memory`` raises, so it is the identity here (a copy
    optimisation, no computation)."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = saved


def run(model, pixels: torch.Tensor, ids: torch.Tensor, boxes: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None, box_mask: Optional[torch.Tensor] = None,
        geometry: bool = True) -> Dict[str, torch.Tensor]:
    """The original's ``forward_grounding`` for a batch of (image i, prompt i) queries.

    ``ids [B, L]``: 0-padded token ids (the original's text mask is ``ids != 0``).
    ``boxes [B, N, 4]`` cxcywh, ``labels [B, N]`` (1/0), ``box_mask [B, N]`` (True = valid,
    valid first); None: no box, the empty ("dummy") prompt of ``Sam3Processor.set_text_prompt``.
    ``geometry=False`` drops the geometry tokens after the fact: the prompt ``transformers``
    builds for a query without boxes (the port's behaviour, for contrast).
    Returns the five raw outputs named as ``transformers``' (``pred_boxes`` xyxy).
    """
    o = original()
    b = pixels.shape[0]
    keys = [f"prompt{i}" for i in range(b)]
    for k, row in zip(keys, ids):
        model.tokenizer.rows[k] = row.long()
    with torch.no_grad():
        backbone_out = {"img_batch_all_stages": pixels}
        backbone_out.update(model.backbone.forward_image(pixels))
        backbone_out.update(model.backbone.forward_text(keys, device="cpu"))
        find = o.data.FindStage(img_ids=torch.arange(b), text_ids=torch.arange(b), input_boxes=None,
                                input_boxes_mask=None, input_boxes_label=None, input_points=None,
                                input_points_mask=None)
        if boxes is None:
            prompt = model._get_dummy_prompt(num_prompts=b)
        else:
            prompt = o.geo.Prompt(box_embeddings=boxes.transpose(0, 1).float(),
                                  box_mask=~box_mask.bool(), box_labels=labels.long().transpose(0, 1))
        if not geometry:
            encode = model.geometry_encoder.forward

            def no_geometry(*args, **kwargs):
                feats, mask = encode(*args, **kwargs)
                return feats[:0], mask[:, :0]

            model.geometry_encoder.forward = no_geometry
        try:
            with _cpu_pin_memory():
                out = model.forward_grounding(backbone_out=backbone_out, find_input=find,
                                              find_target=None, geometric_prompt=prompt)
        finally:
            model.geometry_encoder.__dict__.pop("forward", None)
    return {"pred_logits": out["pred_logits"].squeeze(-1), "pred_boxes": out["pred_boxes_xyxy"],
            "pred_masks": out["pred_masks"], "presence_logits": out["presence_logit_dec"],
            "semantic_seg": out["semantic_seg"]}


# ----------------------------------------------------------------------------
# the same weights in transformers' Sam3Model (to show where the port differs)
# ----------------------------------------------------------------------------
def hf_state_from_ours(cfg, params: Dict[str, np.ndarray], hf_model) -> Dict[str, torch.Tensor]:
    """Our parameters -> ``hf_model``'s state dict, through our own HF mapping read
    backwards (pure renames, and fused q/k/v split in thirds). Tensors the mapping does
    not use (CLIP's pooled projection, a pixel-decoder stage never run) keep the model's."""
    from sam3_nn.weights.loader import TensorSource, build_mapping
    from sam3_nn.weights.mapping import concat0

    sd = hf_model.state_dict()
    meta = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
    source = TensorSource("<transformers model>", "hf", meta, lambda n: sd[n].numpy())
    m = build_mapping(cfg, source, ("vision", "text", "detector"))
    out = dict(sd)
    for ours, value in params.items():
        src = m.entries[ours]
        t = torch.from_numpy(value.copy())
        if src.transform is None:
            parts = [t]
        elif src.transform is concat0:
            parts = list(torch.chunk(t, len(src.names), dim=0))
        else:
            raise AssertionError(f"{ours}: no inverse for transform {src.transform}")
        for name, part in zip(src.names, parts):
            assert tuple(part.shape) == tuple(sd[name].shape), name
            out[name] = part
    return out


# ----------------------------------------------------------------------------
# the interactive predictor (predict_inst) at a tiny size
# ----------------------------------------------------------------------------
_TRACKER: Optional[types.SimpleNamespace] = None


def tracker_modules() -> types.SimpleNamespace:
    """The original's SAM heads and image predictor modules (imported once)."""
    global _TRACKER
    if _TRACKER is None:
        original()
        with stand_ins():
            names = dict(pe="sam3.sam.prompt_encoder", md="sam3.sam.mask_decoder", tr="sam3.sam.transformer",
                         pred="sam3.model.sam1_task_predictor", base="sam3.model.sam3_tracker_base",
                         utils="sam3.model.utils.sam1_utils", cc="sam3.perflib.connected_components")
            _TRACKER = types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})
    return _TRACKER


class TinyTracker(nn.Module):
    """The parts of ``Sam3TrackerBase`` that ``predict_inst`` uses, built as ``_build_sam_heads``
    builds them (the release's options) at a small size."""

    def __init__(self, width=32, heads=2, mlp=64, iou_hidden=32, image_size=168, stride=14):
        super().__init__()
        t = tracker_modules()
        g = image_size // stride
        self.image_size, self.num_feature_levels = image_size, 3
        self.sam_prompt_encoder = t.pe.PromptEncoder(embed_dim=width, image_embedding_size=(g, g),
                                                     input_image_size=(image_size, image_size),
                                                     mask_in_chans=16)
        self.sam_mask_decoder = t.md.MaskDecoder(
            num_multimask_outputs=3,
            transformer=t.tr.TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=mlp, num_heads=heads),
            transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=iou_hidden,
            use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
            pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.feat_sizes = [(4 * g, 4 * g), (2 * g, 2 * g), (g, g)]

    @property
    def device(self):
        return self.no_mem_embed.device

    def _prepare_backbone_features(self, backbone_out):
        return tracker_modules().base.Sam3TrackerBase._prepare_backbone_features(self, backbone_out)


def tracker_release_layout(tracker: TinyTracker) -> Dict[str, torch.Tensor]:
    """The tracker heads' tensors named as in the released ``sam3.pt`` (``tracker.`` prefix)."""
    return {"tracker." + k: v.detach().clone() for k, v in tracker.state_dict().items()
            if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed"))}


def flood_label(values, return_num=False):
    """``skimage.measure.label`` (full connectivity, background 0) by breadth-first flood fill:
    stands in for scikit-image, which the original's CPU hole filling imports."""
    values = np.asarray(values)
    h, w = values.shape
    labels = np.zeros((h, w), np.int64)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if not values[y0, x0] or labels[y0, x0]:
                continue
            n += 1
            labels[y0, x0] = n
            stack = [(y0, x0)]
            while stack:
                y, x = stack.pop()
                for yy in (y - 1, y, y + 1):
                    for xx in (x - 1, x, x + 1):
                        if 0 <= yy < h and 0 <= xx < w and values[yy, xx] and not labels[yy, xx]:
                            labels[yy, xx] = n
                            stack.append((yy, xx))
    return (labels, n) if return_num else labels


def predict_inst(image_model, tracker: TinyTracker, pixels: torch.Tensor, original_hw, **kwargs):
    """``Sam3Image.predict_inst`` after ``Sam3Processor.set_image`` on ``pixels [1, 3, S, S]``
    of an image of ``original_hw`` (the original's code throughout: the predictor's prompt
    transforms, SAM heads, post-processing with 256-pixel hole filling, +-32 clamp).
    ``SAM3InteractiveImagePredictor`` is made without ``__init__`` (its image transforms
    are torchvision's, used only by ``set_image``), with the attributes ``__init__`` sets."""
    t = tracker_modules()
    pred = t.pred.SAM3InteractiveImagePredictor.__new__(t.pred.SAM3InteractiveImagePredictor)
    nn.Module.__init__(pred)
    pred.model = tracker
    transforms = t.utils.SAM2Transforms.__new__(t.utils.SAM2Transforms)
    nn.Module.__init__(transforms)
    transforms.resolution, transforms.mask_threshold = tracker.image_size, 0.0
    transforms.max_hole_area, transforms.max_sprinkle_area = 256.0, 0.0
    pred._transforms, pred.mask_threshold = transforms, 0.0
    pred._is_image_set, pred._features, pred._orig_hw, pred._is_batch = False, None, None, False
    pred._bb_feat_sizes = tracker.feat_sizes
    skimage = types.ModuleType("skimage")
    skimage.measure = types.ModuleType("skimage.measure")
    skimage.measure.label = flood_label
    saved = {k: sys.modules.get(k) for k in ("skimage", "skimage.measure")}
    sys.modules.update({"skimage": skimage, "skimage.measure": skimage.measure})
    try:
        with torch.no_grad():
            backbone_out = image_model.backbone.forward_image(pixels)
            sam2 = backbone_out["sam2_backbone_out"]  # Sam3Processor.set_image:
            sam2["backbone_fpn"][0] = tracker.sam_mask_decoder.conv_s0(sam2["backbone_fpn"][0])
            sam2["backbone_fpn"][1] = tracker.sam_mask_decoder.conv_s1(sam2["backbone_fpn"][1])
            state = {"original_height": original_hw[0], "original_width": original_hw[1],
                     "backbone_out": backbone_out}
            holder = types.SimpleNamespace(inst_interactive_predictor=pred)
            return original().image.Sam3Image.predict_inst(holder, state, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
