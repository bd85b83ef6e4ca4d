"""Build tools: where they are, and the error a missing one gives."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional, Sequence


class TargetError(ValueError):
    """An unknown target, one this TVM build cannot emit, or a missing build tool."""


def find_tool(names: Sequence[str]) -> Optional[str]:
    for n in names:
        p = shutil.which(n) or (n if os.path.isabs(n) and os.access(n, os.X_OK) else None)
        if p:
            return p
    return None


LD64 = ("ld64.lld-19", "ld64.lld", "/usr/lib/llvm-19/bin/ld64.lld")
LD_ELF = ("ld.lld-19", "ld.lld", "/usr/lib/llvm-19/bin/ld.lld")
NVCC = ("nvcc", "/usr/local/cuda/bin/nvcc")


def run(cmd: List[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise TargetError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{p.stderr.strip()[-4000:]}")

