"""SAM 3 text encoder: a CLIP-style causal text transformer and the resizer to the
detector width.

What the detector gets from a prompt (as transformers' ``Sam3Model.get_text_features``):

* ``text_features [B, L, D]``: the transformer's *last hidden state* (every token,
  after the final LayerNorm) through ``text_projection`` (Linear ``hidden -> D``,
  ``D`` = the DETR encoder width, 256 released). No pooling: the detector
  cross-attends to all tokens and pools them itself.
* ``text_mask [B, L]`` (int32, 1 = real token, 0 = padding): the detector masks
  padded tokens out of its text cross-attention and pooling with it.

CLIP's own pooled-embedding projection (``text_encoder.text_projection``, to
``projection_dim``) is part of the checkpoints but unused by SAM 3, so it is not a
parameter here (the weight mapping ignores it, with that reason).

Attention is causal *and* masks padded keys (transformers' ``create_causal_mask``
with the attention mask). With right padding the real tokens never see padding
anyway, so the features of real tokens are those of the original (causal-only)
encoder as well; padded positions match transformers. The additive mask is built
in float32 with the finite ``MASK_VALUE``.

Token ids outside ``[0, vocab_size)`` are clamped (a memory-safe gather); the
tokenizer (``sam3_nn.runtime.tokenizer``) never produces them.

Parameter names follow transformers (``text_encoder.text_model.*``, top-level
``text_projection.*``) except the fused ``self_attn.qkv`` projection (one GEMM
instead of q/k/v_proj).
"""

from __future__ import annotations

from typing import Tuple

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import TextConfig
from sam3_nn.model.common import MLP
from sam3_nn.ops.attention import MASK_VALUE, attention


def check_text_config(cfg: TextConfig) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"text hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
            f"{cfg.num_attention_heads}"
        )
    if cfg.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"unsupported text hidden_act {cfg.hidden_act!r} (expected 'gelu' or 'quick_gelu')")
    if cfg.max_position_embeddings < 2:
        raise ValueError("text max_position_embeddings (the context length) must be at least 2")


def causal_padding_bias(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` int mask (nonzero = real token) -> float32 additive bias ``[B, 1, L, L]``:
    0 where query ``i`` may see key ``j`` (``j <= i`` and key ``j`` real), ``MASK_VALUE`` elsewhere."""

    def compute(mask):
        def f(b, h, i, j):
            hidden = tirx.Or(j > i, mask[b, j] == tirx.const(0, mask.dtype))
            return tirx.Select(hidden, tirx.const(MASK_VALUE, "float32"), tirx.const(0.0, "float32"))

        bsz, length = mask.shape
        return te.compute((bsz, 1, length, length), f, name="text_attn_bias")

    return op.tensor_expr_op(compute, "causal_padding_bias", args=[attention_mask])


def binary_mask(attention_mask: Tensor) -> Tensor:
    """Any nonzero entry -> 1, zero -> 0 (int32)."""

    def compute(mask):
        return te.compute(
            mask.shape,
            lambda b, j: tirx.Select(mask[b, j] != tirx.const(0, mask.dtype),
                                     tirx.const(1, "int32"), tirx.const(0, "int32")),
            name="text_mask",
        )

    return op.tensor_expr_op(compute, "text_mask", args=[attention_mask])


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.hidden = cfg.hidden_size

    def forward(self, input_ids: Tensor) -> Tensor:
        b, length = input_ids.shape
        length = int(length)
        if length > int(self.position_embedding.weight.shape[0]):
            raise ValueError(f"{length} tokens exceed the context length "
                             f"{int(self.position_embedding.weight.shape[0])}")
        flat = op.reshape(input_ids, [-1])
        tok = op.wrap_nested(
            relax.op.take(self.token_embedding.weight._expr, flat._expr, axis=0, mode="clip"),
            name="token_embedding",
        )
        tok = op.reshape(tok, [b, length, self.hidden])
        pos = self.position_embedding.weight
        if length != int(pos.shape[0]):
            pos = op.split(pos, [length], axis=0)[0]
        return tok + op.reshape(pos, [1, length, self.hidden])


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.num_heads = cfg.num_attention_heads

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = op.split(self.qkv(x), 3, axis=-1)
        return self.out_proj(attention(q, k, v, self.num_heads, bias))


class TextEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)); x + mlp(ln2(x)) (``CLIPEncoderLayer``)."""

    def __init__(self, cfg: TextConfig):
        self.self_attn = TextAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class TextEncoderStack(nn.Module):
    def __init__(self, cfg: TextConfig):
        self.layers = nn.ModuleList([TextEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class TextTransformer(nn.Module):
    """``CLIPTextModel``: embeddings, causal encoder, final LayerNorm -> last hidden state."""

    def __init__(self, cfg: TextConfig):
        check_text_config(cfg)
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoderStack(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        x = self.encoder(x, causal_padding_bias(attention_mask))
        return self.final_layer_norm(x)


class TextEncoder(nn.Module):
    """Holds the transformer under ``text_model`` (the HF ``CLIPTextModelWithProjection``
    layout, without its unused pooled projection)."""

    def __init__(self, cfg: TextConfig):
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_model(input_ids, attention_mask)


def encode_text(encoder: TextEncoder, projection: nn.Linear, input_ids: Tensor,
                attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask) [B, L] int32 -> (text_features [B, L, D], text_mask [B, L] int32)``."""
    hidden = encoder(input_ids, attention_mask)
    return projection(hidden), binary_mask(attention_mask)
