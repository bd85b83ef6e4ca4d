"""SAM 3's video tracker (the SAM 2 task): the interactive decoder conditioned on a memory of
earlier frames. The parts of ``transformers``' ``Sam3TrackerVideoModel`` that run per frame,
as two compiled functions over all objects of a frame at once (objects are the batch):

* :meth:`VideoTrackerModel.track_step`: per object, the frame's features conditioned on
  its memory (``mode`` 1: memory attention over the memory bank and object pointers; 0:
  an initial conditioning frame, the features plus ``no_memory_embedding``; 2: the raw
  features, for a mask prompt's object pointer) -> prompt encoder + mask decoder -> the
  chosen mask (``multimask`` 1: the multimask output of highest predicted IoU, else the
  single-mask output), its IoU, the object score, the object pointer (the chosen output
  token through ``object_pointer_proj``; ``no_object_pointer`` where the score is <= 0, or
  where ``pointer_present`` is 0: the reference blends a mask prompt's pointer once more by
  the mask's presence).
  Masks of an absent object (score <= 0) are -1024 everywhere; the high-resolution mask is
  the low-resolution one upsampled bilinearly (``align_corners=False``) to the input size.
* :meth:`VideoTrackerModel.encode_memory`: the frame's raw features and the high-resolution
  masks (resized to ``16 g``, the mask encoder's input, as the reference does; binarised at 0 or through a sigmoid, then scaled by 20 and shifted by -10) through
  the memory encoder, plus ``occlusion_spatial_embedding_parameter`` where the object is
  absent -> the memory ``[N, g*g, mem_dim]``.

The memory bank is the caller's (``sam3_nn.runtime.video``): ``memory [N, M, g*g, mem_dim]``
in ``M`` slots with ``memory_mask [N, M]`` (1 present) and ``memory_tpos [N, M]``, the
index into ``memory_temporal_positional_encoding`` (``num_maskmem - 1`` for a conditioning
frame, ``t - 1`` for the frame ``t`` steps back); ``pointers [N, P, C]`` with
``pointer_mask`` and ``pointer_tpos [N, P]`` (the temporal distance divided by
``max_object_pointers - 1``), each pointer split into ``C / mem_dim`` tokens sharing its
temporal encoding (``get_1d_sine_pe`` then ``temporal_positional_encoding_projection_layer``).
The memory's spatial position encoding (sine, normalised) depends on the grid alone and is
made here. ``tracker_embeddings_2`` (``encode_image``) carries ``no_memory_embedding``
already; the raw features are it minus that embedding (float32: within an ulp).

The reference stores memory features in bfloat16; the runtime rounds them the same way.
"""

from __future__ import annotations

from typing import Tuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import Sam3Config
from sam3_nn.model.common import sine_position_encoding
from sam3_nn.model.interactive import InteractiveModel
from sam3_nn.model.memory_attention import MemoryAttention
from sam3_nn.model.memory_encoder import MemoryEncoder, StridedConv
from sam3_nn.model.prompt_encoder import _cos, _sin
from sam3_nn.model.sam_mask_decoder import FeedForward, choose_single_mask
from sam3_nn.ops.attention import key_padding_bias

NO_OBJ_SCORE = -1024.0  # the reference's mask logit for an absent object
MODE_INIT, MODE_MEMORY, MODE_RAW = 0, 1, 2  # track_step's per-object feature source


class VideoTrackerModel(InteractiveModel):
    """The interactive model plus the video tracker's parts (names as ``Sam3TrackerVideoModel``)."""

    def __init__(self, cfg: Sam3Config):
        super().__init__(cfg)
        c = cfg.vision.fpn_hidden_size
        v = cfg.video
        self.video = v
        self.hidden = c
        self.memory_attention = MemoryAttention(c, v.memory_attention_num_layers, v.memory_attention_num_heads,
                                                v.memory_attention_feed_forward_size, v.mem_dim, self.grid,
                                                v.rope_theta)
        self.memory_encoder = MemoryEncoder(c, v)
        self.memory_temporal_positional_encoding = nn.Parameter((v.num_maskmem, 1, 1, v.mem_dim))
        self.no_object_pointer = nn.Parameter((1, c))
        self.mask_downsample = StridedConv(1, 1, 4, 4, 0)
        self.object_pointer_proj = FeedForward(c, c, c, 3)
        self.temporal_positional_encoding_projection_layer = nn.Linear(c, v.mem_dim)
        self.occlusion_spatial_embedding_parameter = nn.Parameter((1, v.mem_dim))

    # ---- helpers ------------------------------------------------------------------------
    def _raw(self, image_embed: Tensor) -> Tensor:
        """``tracker_embeddings_2`` less ``no_memory_embedding``: the neck's 1x map."""
        return image_embed - op.reshape(self.no_memory_embedding, [1, 1, 1, self.hidden])

    def _memory_keys(self, like: Tensor, memory: Tensor, memory_tpos: Tensor, memory_mask: Tensor,
                     pointers: Tensor, pointer_tpos: Tensor, pointer_mask: Tensor):
        """-> keys ``[N, M*g*g + P*s, mem]``, their position encodings, the key bias."""
        v = self.video
        n, m, hw, d = memory.shape
        p = pointers.shape[1]
        s = self.hidden // v.mem_dim
        dtype = memory.dtype
        spatial = sine_position_encoding(like, d // 2, dtype)  # [1, d, g, g]
        spatial = op.reshape(op.permute_dims(spatial, [0, 2, 3, 1]), [1, 1, hw, d])
        table = op.reshape(self.memory_temporal_positional_encoding, [v.num_maskmem, d])
        temporal = op.reshape(_gather_rows(table, memory_tpos), [n, m, 1, d])
        mem_pos = op.reshape(spatial + temporal, [n, m * hw, d])
        ptr_pe = _sine_1d(pointer_tpos, self.hidden, dtype)  # [N, P, C]
        ptr_pe = self.temporal_positional_encoding_projection_layer(ptr_pe)  # [N, P, mem]
        ptr_pe = op.reshape(op.broadcast_to(op.reshape(ptr_pe, [n, p, 1, d]), [n, p, s, d]), [n, p * s, d])
        keys = op.concat([op.reshape(memory, [n, m * hw, d]), op.reshape(pointers, [n, p * s, d])], dim=1)
        pos = op.concat([mem_pos, ptr_pe], dim=1)
        mask = op.concat([op.reshape(op.broadcast_to(op.reshape(memory_mask, [n, m, 1]), [n, m, hw]), [n, m * hw]),
                          op.reshape(op.broadcast_to(op.reshape(pointer_mask, [n, p, 1]), [n, p, s]), [n, p * s])],
                         dim=1)
        return keys, pos, key_padding_bias(mask), int(m) * int(hw)

    # ---- exported -----------------------------------------------------------------------
    def track_step(self, feat_s0: Tensor, feat_s1: Tensor, image_embed: Tensor, memory: Tensor,
                   memory_tpos: Tensor, memory_mask: Tensor, pointers: Tensor, pointer_tpos: Tensor,
                   pointer_mask: Tensor, mode: Tensor, points: Tensor, labels: Tensor, point_mask: Tensor,
                   mask_input: Tensor, mask_valid: Tensor, multimask: Tensor,
                   pointer_present: Tensor) -> Tuple[Tensor, ...]:
        n = memory.shape[0]
        g, c = self.grid, self.hidden
        raw = self._raw(image_embed)
        keys, key_pos, bias, rotated = self._memory_keys(image_embed, memory, memory_tpos, memory_mask,
                                                         pointers, pointer_tpos, pointer_mask)
        pos = sine_position_encoding(image_embed, c // 2, image_embed.dtype)
        pos = op.reshape(op.permute_dims(pos, [0, 2, 3, 1]), [1, g * g, c])
        feats = op.reshape(raw, [1, g * g, c])  # one frame for every object
        conditioned = op.reshape(self.memory_attention(feats, pos, keys, key_pos, rotated, bias), [n, g, g, c])
        embed = _select_source(mode, image_embed, conditioned, raw)

        sparse, dense = self.prompt_encoder(points, labels, mask_input, mask_valid)
        any_point = op.max(point_mask, axis=1, keepdims=True)
        token_mask = op.concat([point_mask, any_point], dim=1)
        image_pe = self.shared_image_embedding.grid(g, embed.dtype)
        masks, iou, obj, tokens = self.mask_decoder(embed, feat_s0, feat_s1, image_pe, sparse, token_mask,
                                                    dense, with_tokens=True)
        masks, iou = choose_single_mask(masks, iou, self.cfg.tracker)
        low, iou, token = _choose_output(masks, iou, tokens, multimask, obj)
        high = _upsample_bilinear(low, self.cfg.image_size)
        ptr = self.object_pointer_proj(token)
        present = _present(obj, ptr.dtype, pointer_present)  # [N, 1]
        ptr = ptr * present + op.reshape(self.no_object_pointer, [1, c]) * (1.0 - present)
        return low, high, iou, obj, ptr

    def encode_memory(self, image_embed: Tensor, high_res_masks: Tensor, object_score_logits: Tensor,
                      binarize: Tensor) -> Tensor:
        v = self.video
        n = high_res_masks.shape[0]
        g = self.grid
        size = 16 * g  # the mask encoder's input: 16x the grid (1152 at 1008 px, as the reference resizes)
        if int(high_res_masks.shape[2]) != size:
            # the reference's antialiased resize; for an enlargement that is plain bilinear
            high_res_masks = _upsample_bilinear(high_res_masks, size)
        masks = _mask_for_memory(high_res_masks, op.sigmoid(high_res_masks), binarize)
        masks = masks * v.sigmoid_scale_for_mem_enc + v.sigmoid_bias_for_mem_enc
        features = self.memory_encoder(self._raw(image_embed), masks)  # [N, g, g, mem]
        absent = 1.0 - _present(object_score_logits, features.dtype)
        occl = op.reshape(self.occlusion_spatial_embedding_parameter, [1, 1, 1, v.mem_dim])
        features = features + op.reshape(absent, [n, 1, 1, 1]) * occl
        # the reference stores a frame's memory in bfloat16: rounded here, so it can stay on the device
        return op.reshape(_round_bfloat16(features), [n, g * g, v.mem_dim])

    def mask_prompt(self, masks: Tensor) -> Tensor:
        """A binary mask prompt ``[N, 1, S, S]`` (0/1) -> the decoder's mask input ``[N, 1, 4g,
        4g]`` (``mask_downsample``, the reference's ``_use_mask_as_output``)."""
        return self.mask_downsample(masks)


# ---- elementwise pieces (TE) -------------------------------------------------------------
def _gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table [K, D]``, ``index [N, M]`` int32 -> ``[N, M, D]``."""

    def compute(t, i):
        return te.compute((i.shape[0], i.shape[1], t.shape[1]), lambda a, b, d: t[i[a, b], d], name="gather_rows")

    return op.tensor_expr_op(compute, "gather_rows", args=[table, index])


def _sine_1d(pos: Tensor, dim: int, dtype: str) -> Tensor:
    """``get_1d_sine_pe``: ``[N, P]`` float32 -> ``[N, P, dim]`` (``[sin | cos]`` of ``pos /
    10000 ** (2 (i // 2) / (dim / 2))``)."""
    half = dim // 2

    def compute(p):
        def f(a, b, i):
            expo = tirx.Cast("float32", (i // 2) * 2) / float(half)
            return p[a, b] / tirx.power(tirx.const(10000.0, "float32"), expo)

        return te.compute((p.shape[0], p.shape[1], half), f, name="sine_1d_arg")

    arg = op.tensor_expr_op(compute, "sine_1d_arg", args=[pos])
    return op.astype(op.concat([_sin(arg), _cos(arg)], dim=2), dtype)


def _select_source(mode: Tensor, image_embed: Tensor, conditioned: Tensor, raw: Tensor) -> Tensor:
    """Per object: ``image_embed`` (mode 0), ``conditioned`` (1) or ``raw`` (2)."""

    def compute(md, e, cnd, r):
        def f(a, y, x, ch):
            return tirx.Select(md[a] == MODE_MEMORY, cnd[a, y, x, ch],
                               tirx.Select(md[a] == MODE_RAW, r[0, y, x, ch], e[0, y, x, ch]))

        return te.compute(cnd.shape, f, name="feature_source")

    return op.tensor_expr_op(compute, "feature_source", args=[mode, image_embed, conditioned, raw])


def _choose_output(masks: Tensor, iou: Tensor, tokens: Tensor, multimask: Tensor, obj: Tensor):
    """Per object: slot ``k`` = the multimask output (1..3) of highest IoU (the first on ties)
    where ``multimask`` is 1, else slot 0 -> its mask ``[N, 1, H, W]`` (-1024 where the object
    score is <= 0), its IoU ``[N, 1]`` and output token ``[N, C]`` (token 0 for the single
    output, as the reference, whichever mask the dynamic choice took)."""

    def compute(m, s, t, mm, o):
        def slot(a):
            i1, i2, i3 = s[a, 1], s[a, 2], s[a, 3]
            best = tirx.Select(tirx.all(i1 >= i2, i1 >= i3), 1, tirx.Select(i2 >= i3, 2, 3))
            return tirx.Select(mm[a] != 0, best, 0)

        n, _, h, w = m.shape
        out_m = te.compute((n, 1, h, w), lambda a, _k, y, x: tirx.Select(
            o[a, 0] > tirx.const(0, o.dtype), m[a, slot(a), y, x], tirx.const(NO_OBJ_SCORE, m.dtype)),
            name="chosen_mask")
        out_s = te.compute((n, 1), lambda a, _k: s[a, slot(a)], name="chosen_iou")
        out_t = te.compute((n, t.shape[2]), lambda a, ch: t[a, slot(a), ch], name="chosen_token")
        return [out_m, out_s, out_t]

    out = op.tensor_expr_op(compute, "choose_output", args=[masks, iou, tokens, multimask, obj])
    return out[0], out[1], out[2]


def _round_bfloat16(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 (to nearest, ties to even, on float32's bits), in its own
    dtype: ``runtime.video.round_bfloat16`` on the device."""

    def compute(t):
        def f(*i):
            u = tirx.reinterpret("uint32", tirx.Cast("float32", t[i]))
            u = (u + tirx.const(0x7FFF, "uint32") + ((u >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))) \
                & tirx.const(0xFFFF0000, "uint32")
            return tirx.Cast(t.dtype, tirx.reinterpret("float32", u))

        return te.compute(t.shape, f, name="round_bfloat16")

    return op.tensor_expr_op(compute, "round_bfloat16", args=[x])


def _present(obj: Tensor, dtype: str, override: Tensor = None) -> Tensor:
    """1 where the object score logit is > 0, else 0: ``[N, 1]``; where ``override [N]`` is 0
    or 1 it wins (the runtime gives 0 for an empty mask prompt, -1 otherwise)."""

    def compute(o, *ov):
        def f(a, k):
            by_score = tirx.Select(o[a, k] > tirx.const(0, o.dtype), tirx.const(1, dtype), tirx.const(0, dtype))
            if not ov:
                return by_score
            return tirx.Select(ov[0][a] < 0, by_score, tirx.Cast(dtype, ov[0][a]))

        return te.compute(o.shape, f, name="present")

    return op.tensor_expr_op(compute, "present", args=[obj] + ([override] if override is not None else []))


def _mask_for_memory(logits: Tensor, probs: Tensor, binarize: Tensor) -> Tensor:
    """Per object: ``logits > 0`` as 0/1 where ``binarize`` is 1, else the sigmoid ``probs``."""

    def compute(lg, pr, bz):
        return te.compute(lg.shape, lambda a, c, y, x: tirx.Select(
            bz[a] != 0, tirx.Select(lg[a, c, y, x] > tirx.const(0, lg.dtype), tirx.const(1, lg.dtype),
                                    tirx.const(0, lg.dtype)), pr[a, c, y, x]), name="mask_for_memory")

    return op.tensor_expr_op(compute, "mask_for_memory", args=[logits, probs, binarize])


def _upsample_bilinear(x: Tensor, size: int) -> Tensor:
    """``[N, C, h, w]`` -> ``[N, C, size, size]``, ``F.interpolate(mode="bilinear",
    align_corners=False)`` (source ``(dst + 0.5) * in/out - 0.5`` clamped at 0; float32)."""
    h, w = int(x.shape[2]), int(x.shape[3])

    def compute(t):
        def coord(dst, n_in):
            src = (tirx.Cast("float32", dst) + 0.5) * tirx.const(n_in / size, "float32") - 0.5
            src = tirx.max(src, tirx.const(0.0, "float32"))
            i0 = tirx.Cast("int32", tirx.floor(src))
            i0 = tirx.min(i0, n_in - 1)
            i1 = tirx.min(i0 + 1, n_in - 1)
            return i0, i1, src - tirx.Cast("float32", i0)

        def f(a, c, y, xx):
            y0, y1, ly = coord(y, h)
            x0, x1, lx = coord(xx, w)

            def at(yy, xv):
                return tirx.Cast("float32", t[a, c, yy, xv])

            top = at(y0, x0) * (1.0 - lx) + at(y0, x1) * lx
            bottom = at(y1, x0) * (1.0 - lx) + at(y1, x1) * lx
            return tirx.Cast(t.dtype, top * (1.0 - ly) + bottom * ly)

        return te.compute((t.shape[0], t.shape[1], size, size), f, name="upsample_bilinear")

    return op.tensor_expr_op(compute, "upsample_bilinear", args=[x])


__all__ = ["VideoTrackerModel", "NO_OBJ_SCORE", "MODE_INIT", "MODE_MEMORY", "MODE_RAW"]
