"""Named target presets: the one place where each hardware target's quirks live.

A preset is data: the TVM target (device + host), the default dtype and batch, the library
format and the tools its link step needs. ``sam3-nn compile --target NAME`` and
``sam3_nn.compiler.build.build`` take it from here; the pass pipeline of each target kind is
``sam3_nn.compiler.pipeline``, the link steps ``sam3_nn.compiler.export``. See
docs/targets.md.

Targets
-------
* ``llvm``          this machine's CPU, ``.so``.
* ``llvm-aarch64``  64-bit Arm Linux CPU (cross), ``.so`` linked with ``ld.lld``.
* ``llvm-macos``    Apple-silicon CPU (cross), Mach-O ``.dylib`` linked with ``ld64.lld``.
* ``metal``         macOS Apple-silicon GPU (float16), Mach-O arm64 ``.dylib`` (``ld64.lld``).
* ``metal-ios``     iOS GPU: ``.tar`` of Mach-O arm64 objects (system library) for Xcode.
* ``cuda``          NVIDIA, one fatbin with SASS for sm_80 and sm_90 (+ compute_90 PTX).
* ``cuda-sm90a`` … any ``--arch`` list gives a preset of its own (``cuda-<archs>``).
* ``opencl``        generic OpenCL GPU (kernels as OpenCL C source, compiled by the driver).
* ``rocm``, ``webgpu``, ``vulkan``: refused with the reason (see ``UNSUPPORTED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import tvm
from tvm.target import codegen

from sam3_nn.compiler.tools import LD64, LD_ELF, NVCC, TargetError, find_tool


@dataclass(frozen=True)
class TargetPreset:
    name: str
    target: Dict
    suffix: str
    default_dtype: str
    description: str
    host: Optional[Dict] = None
    gpu: bool = False
    # library format written beside the manifest: "so", "dylib" or "tar" (+ device part)
    library_format: str = "shared library"
    tools: Tuple[Tuple[str, Tuple[str, ...], str], ...] = ()  # (what, candidates, install hint)
    cuda_arches: Tuple[str, ...] = ()
    cuda_ptx: Optional[str] = None
    system_lib: bool = False
    quirks: Tuple[str, ...] = ()

    @property
    def default_batch(self) -> Optional[int]:
        """Batch size of a library when none is asked for: 1 on CUDA, where static shapes
        let every call replay as CUDA graphs (pipeline 22.6 ms against 24.2 without, H200);
        any (None) elsewhere: on llvm the static-shape build ran the same GEMM kernels 2.6x
        slower (0.78 s against 0.30 s for a 5184x1024->4736 call, cause not found; the
        kernel compiled alone is as fast either way)."""
        return 1 if self.target["kind"] == "cuda" else None

    def tvm_target(self) -> tvm.target.Target:
        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)

    def check_tools(self) -> None:
        """Raise ``TargetError`` naming the missing tool before any work is done."""
        for what, names, hint in self.tools:
            if find_tool(names) is None:
                raise TargetError(f"target {self.name!r} needs {what} ({' or '.join(names[:2])}), "
                                  f"which is not installed: {hint}")

    def describe(self) -> Dict:
        d = {"name": self.name, "target": self.target, "host": self.host,
             "library_format": self.library_format, "description": self.description}
        if self.cuda_arches:
            d["cuda_arches"] = list(self.cuda_arches)
            d["cuda_ptx"] = self.cuda_ptx
        return d


_LD64 = (("ld64.lld (Mach-O linker)", LD64,
          "run `make deps-metal` (apt-get install lld-19) or put ld64.lld on PATH"),)
_LDELF = (("ld.lld (ELF linker)", LD_ELF, "apt-get install lld-19"),)
_NVCC = (("nvcc (CUDA toolkit)", NVCC, "install the CUDA toolkit"),)

# Metal: Apple GPUs (M1 and later): 32-wide SIMD groups, 32 KiB threadgroup memory.
_METAL = {"kind": "metal", "max_threads_per_block": 1024, "max_shared_memory_per_block": 32768,
          "thread_warp_size": 32, "max_function_args": 31}
_MACOS_HOST = {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}
_IOS_HOST = {"kind": "llvm", "mtriple": "arm64-apple-ios", "mcpu": "apple-a14"}

CUDA_DEFAULT_ARCHES = ("sm_80", "sm_90")


def _host_cpu() -> Dict:
    name = codegen.llvm_get_system_cpu()
    return {"kind": "llvm", "mcpu": name} if name and name != "generic" else {"kind": "llvm"}


def cuda_preset(arches: Sequence[str] = CUDA_DEFAULT_ARCHES, name: Optional[str] = None
                ) -> TargetPreset:
    """A CUDA preset for the given SASS arches (``sm_80``, ``sm_90a``, ...)."""
    arches = tuple(a.strip() for a in arches if a.strip())
    for a in arches:
        if not (a.startswith("sm_") and a[3:].rstrip("af").isdigit()):
            raise TargetError(f"bad CUDA arch {a!r}; expected sm_<digits>[a|f], e.g. sm_90a")
    nums = [int(a[3:].rstrip("af")) for a in arches]
    if min(nums) < 70:
        raise TargetError("CUDA arches below sm_70 are not supported (no tensor cores)")
    # codegen and dlight see the lowest arch, digits only: dlight parses the arch as
    # an integer and silently drops tensor cores for "sm_90a"
    lowest = f"sm_{min(nums)}"
    ptx_src = max(arches, key=lambda a: int(a[3:].rstrip("af")))
    ptx = None if ptx_src[-1] in "af" else ptx_src  # arch-specific PTX does not carry forward
    return TargetPreset(
        name or "cuda-" + "-".join(a.replace("sm_", "sm") for a in arches),
        {"kind": "cuda", "arch": lowest}, "so", "float16",
        f"NVIDIA GPUs: fatbin with SASS for {', '.join(arches)}"
        + (f" and PTX for {ptx}" if ptx else ""),
        host=_host_cpu_portable(), gpu=True, library_format="shared library + fatbin",
        tools=_NVCC, cuda_arches=arches, cuda_ptx=ptx)


def _host_cpu_portable() -> Dict:
    """x86-64 host code for the GPU libraries (portable; the host part is thin)."""
    return {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}


PRESETS: Dict[str, TargetPreset] = {}


def _add(p: TargetPreset) -> None:
    PRESETS[p.name] = p


_add(TargetPreset("llvm", _host_cpu(), "so", "float32", "this machine's CPU (its vector ISA)"))
_add(TargetPreset("llvm-x86_64", {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu",
                                  "mcpu": "x86-64-v3"}, "so", "float32",
                  "any x86-64 Linux CPU with AVX2 (portable x86-64-v3 build)"))
_add(TargetPreset("llvm-aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                   "mattr": ["+neon"]}, "so", "float32",
                  "64-bit Arm Linux CPU (cross build, ELF .so linked with ld.lld)",
                  tools=_LDELF))
_add(TargetPreset("llvm-macos", _MACOS_HOST, "dylib", "float32",
                  "Apple-silicon CPU, macOS (cross build, Mach-O dylib linked with ld64.lld)",
                  tools=_LD64))
_add(TargetPreset("metal", _METAL, "dylib", "float16",
                  "Apple-silicon GPU, macOS 13+ (Metal; Mach-O arm64 dylib linked with ld64.lld)",
                  host=_MACOS_HOST, gpu=True, library_format="Mach-O dylib + Metal source",
                  tools=_LD64,
                  quirks=("Metal source is compiled by the OS at load (no metallib here)",)))
_add(TargetPreset("metal-ios", _METAL, "tar", "float16",
                  "iOS GPU (Metal): static system library, a .tar of Mach-O arm64 objects for Xcode",
                  host=_IOS_HOST, gpu=True, library_format="tar of objects (system library)",
                  system_lib=True))
_add(cuda_preset(CUDA_DEFAULT_ARCHES, "cuda"))
_add(cuda_preset(("sm_90a",), "cuda-sm90a"))
_add(TargetPreset("opencl", {"kind": "opencl", "max_threads_per_block": 256,
                             "max_shared_memory_per_block": 16384, "thread_warp_size": 1},
                  "so", "float32",
                  "generic OpenCL GPU (OpenCL C source compiled by the driver at load)",
                  host=_host_cpu_portable(), gpu=True,
                  library_format="shared library + OpenCL C source"))

UNSUPPORTED = {
    "vulkan": "this TVM build has no SPIR-V code generator (target.build.vulkan is missing)",
    "rocm": "building HSA code objects needs the ROCm device libraries (ocml/ockl bitcode) "
            "and ld.lld linked for amdgcn; the wheel's TVM has no ROCm runtime either, so "
            "the result cannot be checked here",
    "webgpu": "a WebGPU library is a WebAssembly module linked with emscripten (emcc), "
              "which is not installed, and needs the tvmjs runtime",
}


def get_preset(name: str, arch: Optional[str] = None) -> TargetPreset:
    """The preset called ``name``; for ``cuda``, ``arch`` (``sm_80,sm_90a``) picks the SASS."""
    if name in UNSUPPORTED and name not in PRESETS:
        raise TargetError(f"target {name!r} is not supported by this TVM build: {UNSUPPORTED[name]}")
    if arch:
        if not name.startswith("cuda"):
            raise TargetError(f"--arch applies to the cuda targets only, not {name!r}")
        p = cuda_preset(arch.split(","))
        return p if name == "cuda" else cuda_preset(arch.split(","), name)
    if name not in PRESETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(sorted(PRESETS))}"
                          f" (not supported here: {', '.join(sorted(UNSUPPORTED))})")
    return PRESETS[name]

