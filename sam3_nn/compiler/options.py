"""Build options: one frozen value from the command line (or a caller) into the pipeline,
recorded in the library's manifest. Nothing in the build reads the environment; the CLI is
the one place that does (``sam3_nn.cli``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

ROPE_MODES = ("normal", "inline", "none")


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels the pipeline may route operators to. Every switch is on by default;
    off gives the portable path (tests and benchmarks compare both)."""

    # ViT attention: RoPE inside the attention kernel ("inline"), as a standalone kernel
    # before composed attention ("normal"), or not applied ("none", a test path); None:
    # the target's default (inline on GPUs, normal on CPUs)
    rope_mode: Optional[str] = None
    cuda_attention: bool = True  # the hand-written attention kernel (float16, head dim 32-256)
    cuda_layer_norm: bool = True  # the hand-written float16 LayerNorm
    cuda_transpose: bool = True  # the hand-written layout copies
    cutlass: bool = True  # CUTLASS GEMMs/convs on Hopper-only libraries
    ln_fold: bool = True  # LayerNorm folded into the GEMMs around it (CUTLASS route)
    # a long RoPE self-attention rotates q/k in its qkv GEMM's epilogue (CUTLASS route)
    rope_in_projection: bool = True
    pdl: bool = True  # hand-written kernels launch with programmatic dependent launch (sm_90)
    attention_wgmma: bool = True  # the attention kernel's wgmma path on sm_90a (else mma.sync)
    # (query rows, keys) per block of the GPU TIR attention kernel; None: by dtype
    gpu_attention_tiles: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        if self.rope_mode is not None and self.rope_mode not in ROPE_MODES:
            raise ValueError(f"unknown rope mode {self.rope_mode!r}; expected one of {list(ROPE_MODES)}")

    def cuda_defines(self) -> Tuple[str, ...]:
        """Preprocessor definitions of the hand-written CUDA kernels for these options."""
        return (() if self.pdl else ("SAM3_NO_PDL",)) + \
            (() if self.attention_wgmma else ("SAM3_ATTENTION_NO_WGMMA",))


@dataclass(frozen=True)
class Toolchain:
    """Where the build tools are (not recorded: it says nothing about the library). None:
    looked up on PATH and in the usual places."""

    cuda_home: Optional[str] = None
    cutlass_include: Optional[str] = None
    cache_dir: Optional[str] = None  # compiled CUDA objects


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides what a build produces besides the model config."""

    target: str = "llvm"
    arch: Optional[str] = None  # cuda targets: SASS arches, "sm_80,sm_90a"
    dtype: Optional[str] = None  # None: the target's default
    # the one batch size the functions take (static shapes); 0: any; None: target default
    batch: Optional[int] = None
    parts: Tuple[str, ...] = ("vision", "text", "detector")  # add "interactive" for clicks
    max_boxes: int = 8
    max_points: int = 16  # point slots of predict_masks (interactive part; a box takes two)
    cuda_graph: bool = True
    kernels: KernelOptions = field(default_factory=KernelOptions)
    toolchain: Toolchain = field(default_factory=Toolchain)

    def with_(self, **changes) -> "BuildOptions":
        kernel_keys = {f.name for f in dataclasses.fields(KernelOptions)}
        kernels = {k: changes.pop(k) for k in list(changes) if k in kernel_keys}
        out = dataclasses.replace(self, **changes)
        return dataclasses.replace(out, kernels=dataclasses.replace(out.kernels, **kernels)) \
            if kernels else out

    def record(self) -> Dict:
        """What the manifest records (the toolchain's paths left out)."""
        d = dataclasses.asdict(self)
        d.pop("toolchain")
        d["parts"] = list(self.parts)
        tiles = d["kernels"]["gpu_attention_tiles"]
        d["kernels"]["gpu_attention_tiles"] = list(tiles) if tiles else None
        return d
