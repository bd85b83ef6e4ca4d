"""SAM 3's interactive segmentation on images (the SAM 1/2 task): clicks, a box or a
previous mask select one object. The parts of ``transformers``' ``Sam3TrackerModel``
that the original's ``Sam3Image.predict_inst`` runs, on the image features of the
tracker neck (``sam2_convs``, fed by the same ViT trunk as the detector's neck).

* :meth:`InteractiveModel.image_embeddings`: the tracker neck's three finer maps as the
  original's ``set_image`` leaves them (``sam3_image_processor.py`` and
  ``sam3_image.py:predict_inst``): ``conv_s0`` on the 4x level (``[B, 4g, 4g, C/8]``),
  ``conv_s1`` on the 2x level (``[B, 2g, 2g, C/4]``), the 1x level plus ``no_mem_embed``
  (``[B, g, g, C]``); channel last. The 1x1 convolutions are folded into the neck's 3x3
  ones, so the 256-channel 4x and 2x maps are never stored.
* :meth:`InteractiveModel.predict_masks`: prompt encoder + mask decoder, all four mask
  logits ``[B, 4, 4g, 4g]`` with slot 0 the single-mask output (dynamic multimask choice),
  slots 1..3 the multimask outputs, IoU predictions ``[B, 4]`` in the same slots, the object
  score logit ``[B, 1]``. The caller takes slots 1..3 for ``multimask_output=True``, slot
  0 else: one compiled function serves both.

Parameter names follow ``Sam3TrackerModel`` (``prompt_encoder``, ``mask_decoder``,
``shared_image_embedding``, ``no_memory_embedding``). Its ``shared_image_embedding`` (the
image's dense position encoding) and the prompt encoder's ``shared_embedding`` are the
same matrix in the original (``pe_layer``); both are kept so either layout loads exactly.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import Sam3Config
from sam3_nn.model.prompt_encoder import PromptEncoder, RandomPositionEmbedding
from sam3_nn.model.sam_mask_decoder import SamMaskDecoder, choose_single_mask


class InteractiveModel(nn.Module):
    def __init__(self, cfg: Sam3Config):
        c = cfg.vision.fpn_hidden_size
        self.cfg = cfg
        self.grid = cfg.vision.backbone.grid_size
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = SamMaskDecoder(cfg)
        self.shared_image_embedding = RandomPositionEmbedding(c)
        self.no_memory_embedding = nn.Parameter((1, 1, c))

    def image_embeddings(self, neck_layers: Sequence[nn.Module], rescaled: Sequence[Tensor]) -> List[Tensor]:
        """The tracker neck's levels 0..2 after their rescaling (``FPNLayer.rescale``) ->
        ``[feat_s0, feat_s1, image_embed]`` (module docstring)."""
        dec = self.mask_decoder
        s0 = neck_layers[0].proj2(rescaled[0], then=dec.conv_s0)
        s1 = neck_layers[1].proj2(rescaled[1], then=dec.conv_s1)
        c = int(self.no_memory_embedding.shape[-1])
        embed = neck_layers[2].proj2(rescaled[2]) + op.reshape(self.no_memory_embedding, [1, 1, 1, c])
        return [s0, s1, embed]

    def predict_masks(self, feat_s0: Tensor, feat_s1: Tensor, image_embed: Tensor, points: Tensor,
                      labels: Tensor, point_mask: Tensor, mask_input: Tensor,
                      mask_valid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        sparse, dense = self.prompt_encoder(points, labels, mask_input, mask_valid)
        # the padding point the prompt encoder appends is a real token when there are points;
        # a prompt of no point (a mask alone) has no sparse token at all, as the original
        # predictor's (points and boxes None: the prompt encoder pads nothing)
        any_point = op.max(point_mask, axis=1, keepdims=True)
        token_mask = op.concat([point_mask, any_point], dim=1)
        image_pe = self.shared_image_embedding.grid(self.grid, image_embed.dtype)
        masks, iou, obj = self.mask_decoder(image_embed, feat_s0, feat_s1, image_pe, sparse,
                                            token_mask, dense)
        masks, iou = choose_single_mask(masks, iou, self.cfg.tracker)
        return masks, iou, obj
