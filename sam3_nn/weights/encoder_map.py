"""Geometry encoder + DETR encoder parameter mapping (both formats)."""

from __future__ import annotations

from ..config import Sam3Config
from .mapping import ParamMapping


def add_encoder_parts(m: ParamMapping, cfg: Sam3Config, prefix: str) -> None:
    """Rules for ``geometry_encoder.*`` and ``detr_encoder.*`` (not built yet)."""
