"""DETR decoder, dot-product scoring and mask decoder parameter mapping (both formats)."""

from __future__ import annotations

from ..config import Sam3Config
from .mapping import ParamMapping


def add_decoder_parts(m: ParamMapping, cfg: Sam3Config, prefix: str) -> None:
    """Rules for ``detr_decoder.*``, ``dot_product_scoring.*``, ``mask_decoder.*`` (not built yet)."""
