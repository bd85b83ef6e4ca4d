"""Named target presets: one place per target's quirks.

A preset gives the TVM target, the host, the default dtype, the library suffix
and the Relax pipeline used to compile for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import tvm
from tvm import relax


class TargetError(ValueError):
    """An unknown target, or one this TVM build cannot emit."""


@dataclass(frozen=True)
class TargetPreset:
    name: str
    target: Dict
    suffix: str
    default_dtype: str
    description: str
    host: Optional[Dict] = None

    def tvm_target(self) -> tvm.target.Target:
        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)

    def pipeline(self):
        return relax.get_default_pipeline(self.tvm_target())


PRESETS: Dict[str, TargetPreset] = {
    "llvm": TargetPreset("llvm", {"kind": "llvm"}, "so", "float32", "this machine's CPU"),
}


def get_preset(name: str) -> TargetPreset:
    if name not in PRESETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
