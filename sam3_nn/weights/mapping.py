"""Declarative parameter mapping: our parameter <- source tensor(s) + a transform.

A ``ParamMapping`` is built per checkpoint format ("hf" or "pt") by the part
mappings (``vision_map`` ...). Each entry names the source tensors one of our
parameters is made from; ``unused`` rules name source tensors that are
deliberately not loaded, each with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Transform = Callable[[List[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Source:
    names: Tuple[str, ...]
    transform: Optional[Transform] = None
    note: str = ""

    def build(self, tensors: List[np.ndarray]) -> np.ndarray:
        if self.transform is None:
            if len(tensors) != 1:
                raise ValueError("several sources need a transform")
            return tensors[0]
        return self.transform(tensors)


def concat0(tensors: List[np.ndarray]) -> np.ndarray:
    """q, k, v projections -> one fused projection (rows stacked)."""
    return np.concatenate(tensors, axis=0)


def drop_first_token(tensors: List[np.ndarray]) -> np.ndarray:
    """``[1, 1 + P*P, C]`` position table with a class-token row -> ``[1, P*P, C]``."""
    (t,) = tensors
    return t[:, 1:, :]


def transpose2d(tensors: List[np.ndarray]) -> np.ndarray:
    (t,) = tensors
    return np.ascontiguousarray(t.T)


def chunk(index: int, parts: int = 3) -> Transform:
    """Rows ``index``-th third of a fused in-projection."""

    def f(tensors: List[np.ndarray]) -> np.ndarray:
        (t,) = tensors
        n = t.shape[0] // parts
        return t[index * n:(index + 1) * n]

    f.__name__ = f"chunk{index}of{parts}"
    return f


@dataclass
class ParamMapping:
    fmt: str
    entries: Dict[str, Source] = field(default_factory=dict)
    unused: List[Tuple[re.Pattern, str]] = field(default_factory=list)
    parts: Dict[str, str] = field(default_factory=dict)  # source-name prefix -> part description

    def add(self, ours: str, names: Sequence[str] | str, transform: Optional[Transform] = None):
        if ours in self.entries:
            raise KeyError(f"parameter {ours} mapped twice")
        names = (names,) if isinstance(names, str) else tuple(names)
        self.entries[ours] = Source(names, transform)

    def same(self, ours: str, src_prefix: str, our_prefix: str = ""):
        """Map ``our_prefix + rest`` from ``src_prefix + rest`` (a pure renaming)."""
        assert ours.startswith(our_prefix)
        self.add(ours, src_prefix + ours[len(our_prefix):])

    def ignore(self, pattern: str, reason: str, first: bool = False):
        """Tensors matching ``pattern`` are not loaded, for ``reason`` (``first``: this rule
        wins over the ones added before it)."""
        rule = (re.compile(pattern), reason)
        self.unused.insert(0, rule) if first else self.unused.append(rule)

    def part(self, prefix: str, description: str):
        """Source tensors under ``prefix`` belong to a part described as ``description``."""
        self.parts[prefix] = description

    def unused_reason(self, name: str) -> Optional[str]:
        for pat, reason in self.unused:
            if pat.search(name):
                return reason
        for prefix, desc in self.parts.items():
            if name.startswith(prefix):
                return desc
        return None
