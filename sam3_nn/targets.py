"""Named target presets: the one place where each hardware target's quirks live.

A preset gives the TVM target (device + host), the default dtype, the dlight rules,
the library format and the export / link step. ``compile.py --target NAME`` and
``sam3_nn.compiler.build`` take everything from here. See docs/targets.md.

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

The Tensorize segfault
----------------------
TVM 0.27's default Metal pipeline crashed in ``s_tir::Tensorize`` for a plain matmul
(``dl.gpu.Matmul`` -> ``MetalMatmul`` -> ``sch.tensorize``); CUDA's tensor-core rule
(``MatmulTensorization``) too. Cause: ``Tensorize`` deep-copies the intrinsic with
``ToJSONGraph``, which lives in ``libtvm_ffi.so`` (package ``apache-tvm-ffi``).
``apache-tvm==0.27.0.post1`` accepts any ``apache-tvm-ffi>=0.1.14.post0``, and the
0.1.15 releases are not ABI-compatible with ``libtvm_compiler.so`` there: even
``tvm.ir.save_json(tirx.Var)`` segfaults. ``apache-tvm-ffi==0.1.14.post1`` fixes it
(``make install`` pins it; ``scripts/repro_tensorize_crash.py`` reproduces). So the
GPU presets keep the fast simdgroup / tensor-core matmul rules, and fall back to the
plain (non-tensorized) dlight matmul schedule when :func:`tensorize_works` finds the
broken combination, rather than crash.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tvm
from tvm import relax


class TargetError(ValueError):
    """An unknown target, one this TVM build cannot emit, or a missing build tool."""


# ---------------------------------------------------------------------------------------
# toolchain probes
# ---------------------------------------------------------------------------------------

def find_tool(names: Sequence[str]) -> Optional[str]:
    for n in names:
        p = shutil.which(n) or (n if os.path.isabs(n) and os.access(n, os.X_OK) else None)
        if p:
            return p
    return None


LD64 = ("ld64.lld-19", "ld64.lld", "/usr/lib/llvm-19/bin/ld64.lld")
LD_ELF = ("ld.lld-19", "ld.lld", "/usr/lib/llvm-19/bin/ld.lld")
NVCC = ("nvcc", "/usr/local/cuda/bin/nvcc")

_PROBE = "import tvm\ntvm.ir.save_json(tvm.tirx.Var('x', 'int32'))\n"


@functools.lru_cache(maxsize=None)
def tensorize_works() -> bool:
    """Whether ``sch.tensorize`` can run in this environment (it segfaults with the
    apache-tvm-ffi 0.1.15 releases; see the module docstring). Probed once, in a
    subprocess, because the failure is a crash."""
    if os.environ.get("SAM3_ASSUME_TENSORIZE") in ("0", "1"):
        return os.environ["SAM3_ASSUME_TENSORIZE"] == "1"
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def _kernel_passes(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]] = None
                   ) -> List[tvm.transform.Pass]:
    """Passes of ``sam3_nn.kernels`` (hand-written GEMMs) for ``target``, if any
    (``cuda_arches``: the library's SASS arches, which pick the CUDA GEMM kernels)."""
    try:
        from sam3_nn.kernels import schedule_passes  # type: ignore
    except ImportError:
        return []
    passes = schedule_passes(target, cuda_arches)
    return list(passes or [])


def _gpu_rules(target: tvm.target.Target, log: Callable[[str], None]):
    from tvm.s_tir import dlight as dl

    if tensorize_works():
        matmul = [_SafeMatmul()]
    else:
        log("  warning: tensorize is broken in this environment (apache-tvm-ffi "
            ">= 0.1.15 with apache-tvm 0.27: run `make install`); using non-tensorized "
            "matmul schedules")
        matmul = [_PlainMatmul()]
    return matmul + [_SafeGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                     dl.gpu.Fallback()]


def _SafeGEMV():
    """dlight's ``gpu.GEMV``; where it raises (with static shapes: "'Add' object has no
    attribute 'value'" on a split it assumes constant), the next rule schedules the block."""
    from tvm.s_tir import dlight as dl

    class SafeGEMV(dl.gpu.GEMV):
        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a schedule error: Reduction/Fallback take it
                return None

    return SafeGEMV()


def _SafeMatmul():
    """dlight's ``gpu.Matmul`` (tensor cores / simdgroup), falling back to the plain SIMT
    schedule where tensorization raises (e.g. CUDA ``MatmulTensorization`` on the FPN's
    im2col'd 3x3 convolution: "scope is not a stage pipeline")."""
    from tvm.s_tir import dlight as dl

    plain = _PlainMatmul()

    class SafeMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a schedule error: take the plain schedule
                try:
                    return plain.apply(func, target, tunable)
                except Exception:  # noqa: BLE001 - let the next rule (GEMV, Fallback) try
                    return None

    return SafeMatmul()


def _PlainMatmul():
    """dlight's ``gpu.Matmul`` with tensorization turned off (no ``sch.tensorize``)."""
    from tvm.s_tir import dlight as dl

    class PlainMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            if target.kind.name in ("cuda", "metal"):
                # the rule tensorizes for cuda >= sm_70 and metal; a pre-tensor-core cuda
                # target takes the SIMT path (only the schedule is taken from it)
                target = tvm.target.Target({"kind": "cuda", "arch": "sm_60"})
            return super().apply(func, target, tunable)

    return PlainMatmul()


def _fast_math_passes(target: tvm.target.Target) -> List[tvm.transform.Pass]:
    """llvm: polynomial softmax/exp/erf/GELU (vectorizable; libm's are scalar calls)."""
    if target.kind.name != "llvm":
        return []
    from sam3_nn.kernels.cpu_rules import fast_math_pass

    return [fast_math_pass()]


# targets whose planned storages are merged into one arena per function (sam3_nn.memory_plan);
# the others keep TVM's storages (Metal, Vulkan and OpenCL address buffers, not offsets, and
# are not measured here)
ARENA_TARGETS = ("cuda", "llvm")


def _finalize_passes(backend, target: tvm.target.Target) -> list:
    """The backend's finalize passes, with TVM's RewriteCUDAGraph replaced by ours, which
    gives the small exported functions CUDA-graph storages of their own
    (sam3_nn.cuda_graph), and, on ``ARENA_TARGETS``, the arena planner after TVM's
    ``StaticPlanBlockMemory`` (sam3_nn.memory_plan)."""
    from sam3_nn.cuda_graph import rewrite_cuda_graph
    from sam3_nn.memory_plan import arena_pass

    passes = []
    for p in backend.finalize_passes(target):
        passes.append(rewrite_cuda_graph if p.info.name == "RewriteCUDAGraph" else p)
        if p.info.name == "StaticPlanBlockMemory" and target.kind.name in ARENA_TARGETS:
            passes.append(arena_pass)
    return passes


def make_pipeline(target: tvm.target.Target, gpu: bool,
                  log: Callable[[str], None] = lambda s: None,
                  cuda_arches: Optional[Sequence[str]] = None,
                  lift: Sequence[str] = ()) -> tvm.transform.Pass:
    """Relax pipeline: [our GEMM kernels] + [weight transforms of ``lift``'s functions lifted
    out (sam3_nn.param_transform)] + legalize/fuse + [dlight] + lowering."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    elif gpu:
        from tvm.relax.backend.gpu_generic import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

    @tvm.transform.module_pass(opt_level=0, name="sam3_pipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext):
        with target:
            legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                        relax.transform.FuseTIR()]
            if gpu:
                from tvm.s_tir import dlight as dl

                legalize.append(dl.ApplyDefaultSchedule(*_gpu_rules(target, log)))
            elif target.kind.name == "llvm":
                from tvm.s_tir import dlight as dl

                from sam3_nn.kernels.cpu_rules import cpu_rules

                legalize.append(dl.ApplyDefaultSchedule(*cpu_rules()))
            from sam3_nn.param_transform import lift_pass

            seq = tvm.transform.Sequential(
                _kernel_passes(target, cuda_arches)
                + _fast_math_passes(target)
                + ([lift_pass(lift)] if lift else [])
                + backend.library_dispatch_passes(target)
                + legalize
                + backend.dataflow_lower_passes(target)
                + _finalize_passes(backend, target))
            return seq(mod)

    return _pipeline


# ---------------------------------------------------------------------------------------
# export / link steps
# ---------------------------------------------------------------------------------------

def _run(cmd: List[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise TargetError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{p.stderr.strip()[-4000:]}")


def link_macho(arch: str, platform: str, min_version: str, install_name: Optional[str] = None,
               ld: Optional[str] = None):
    """An ``export_library`` fcompile linking Mach-O objects into a dylib with ld64.lld."""

    def fcompile(output: str, objects: List[str], **_):
        tool = ld or find_tool(LD64)
        if tool is None:
            raise TargetError("ld64.lld not found (Debian/Ubuntu: `make deps-metal`, i.e. "
                              "apt-get install lld-19)")
        _run([tool, "-dylib", "-arch", arch, "-platform_version", platform, min_version,
              min_version, "-undefined", "dynamic_lookup", "-install_name",
              "@rpath/" + (install_name or os.path.basename(output)), "-o", output, *objects], "ld64.lld link")

    return fcompile


def link_elf_shared(ld: Optional[str] = None):
    """An ``export_library`` fcompile linking ELF objects into a shared library with ld.lld."""

    def fcompile(output: str, objects: List[str], **_):
        tool = ld or find_tool(LD_ELF)
        if tool is None:
            raise TargetError("ld.lld not found (Debian/Ubuntu: apt-get install lld-19)")
        _run([tool, "-shared", "-o", output, *objects], "ld.lld link")

    return fcompile


# ---- CUDA: kernels compiled ahead of time into a fatbin ---------------------------------

def nvcc_fatbin(code: str, arches: Sequence[str], ptx_arch: Optional[str]) -> bytes:
    """Compile CUDA source to a fatbin holding SASS for ``arches`` (+ PTX of ``ptx_arch``)."""
    nvcc = find_tool(NVCC)
    if nvcc is None:
        raise TargetError("nvcc not found: the cuda targets compile kernels ahead of time "
                          "(install the CUDA toolkit or put nvcc on PATH)")
    gencode = []
    for a in arches:
        num = a.replace("sm_", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    if ptx_arch:
        num = ptx_arch.replace("sm_", "")
        gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "kernels.cu"), os.path.join(d, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(code)
        _run([nvcc, "--fatbin", "-O3", "-std=c++17", "-w", *gencode, "-o", out, src], "nvcc")
        with open(out, "rb") as f:
            return f.read()


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def blob(self) -> bytes:
        n = self.u64()
        v = self.data[self.pos:self.pos + n]
        if len(v) != n:
            raise ValueError("truncated module blob")
        self.pos += n
        return v

    def u64_vec(self) -> List[int]:
        return [self.u64() for _ in range(self.u64())]


def _w(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def parse_module_blob(blob: bytes) -> List[Tuple[str, bytes]]:
    """Split TVM's packed import blob (``__tvm_ffi__library_bin``: u64 size + import tree +
    per-module ``kind``/bytes) into ``(kind, bytes)`` (``"_lib"`` has empty bytes)."""
    r = _Reader(blob, 8)
    row_ptr = r.u64_vec()
    r.u64_vec()
    mods = []
    for _ in range(len(row_ptr) - 1):
        kind = r.blob().decode()
        mods.append((kind, b"" if kind == "_lib" else r.blob()))
    return mods


def device_module_parts(data: bytes) -> Tuple[str, bytes, bytes]:
    """``(fmt, fmap bytes, code)`` of a serialized CUDA/Metal-style device module:
    ``[fmt][fmap][code]`` (the code field is last)."""
    r = _Reader(data)
    fmt = r.blob().decode()
    # code is the trailing length-prefixed field; fmap sits between. Scan forward: the
    # first u64 that spans exactly to the end is the code's length (scanning back from the
    # end would stop inside the code, e.g. at trailing zeros)
    for end_len_pos in range(r.pos, len(data) - 7):
        (n,) = struct.unpack_from("<Q", data, end_len_pos)
        if end_len_pos + 8 + n == len(data):
            return fmt, data[r.pos:end_len_pos], data[end_len_pos + 8:]
    raise ValueError("cannot find the code field of the device module")


def cuda_pack_imports(arches: Sequence[str], ptx_arch: Optional[str],
                      log: Callable[[str], None]):
    """``export_library(fpack_imports=...)``: pack the imports like TVM does, but with
    every CUDA module's source replaced by a fatbin (format ``"fatbin"``), so that
    loading the library needs no NVRTC, nvcc or Python compile callback."""

    def fpack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        packed = tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod)
        blob = packed.numpy().tobytes()
        r = _Reader(blob, 8)
        row_ptr, children = r.u64_vec(), r.u64_vec()
        out = struct.pack("<Q", len(row_ptr)) + b"".join(struct.pack("<Q", v) for v in row_ptr)
        out += struct.pack("<Q", len(children)) + b"".join(struct.pack("<Q", v) for v in children)
        for _ in range(len(row_ptr) - 1):
            kind = r.blob()
            out += _w(kind)
            if kind == b"_lib":
                continue
            data = r.blob()
            if kind == b"cuda":
                fmt, fmap, code = device_module_parts(data)
                if fmt == "cuda":  # source: compile it now
                    log(f"  nvcc: {len(code) / 1024:.0f} KiB of CUDA source -> fatbin "
                        f"({', '.join(arches)}{' + PTX ' + ptx_arch if ptx_arch else ''})")
                    code = nvcc_fatbin(code.decode(), arches, ptx_arch)
                    fmt = "fatbin"
                data = _w(fmt.encode()) + fmap + _w(code)
            out += _w(data)
        full = struct.pack("<Q", len(out)) + out
        llvm_target = mod.get_function("_get_target_string")() if mod.kind == "llvm" else None
        if llvm_target is None:
            for m in mod._collect_dso_modules():
                if m.kind == "llvm":
                    llvm_target = m.get_function("_get_target_string")()
        m = tvm.get_global_func("codegen.codegen_blob")(full, is_system_lib, llvm_target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        m.write_to_file(path)
        return path

    return fpack


# ---------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------

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
    def default_rope_mode(self) -> str:
        """ViT attention path when none is asked for: the fused INLINE-RoPE kernel on GPUs;
        NORMAL on CPUs, where the composed path runs its q@k^T and p@v on our register-blocked
        GEMMs and measured faster (672 px, 2 blocks, fp32, 2 threads: 1.85 s vs 2.57 s)."""
        return "inline" if self.gpu else "normal"

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

    def pipeline(self, log: Callable[[str], None] = lambda s: None, lift: Sequence[str] = ()):
        return make_pipeline(self.tvm_target(), self.gpu, log, self.cuda_arches or None, lift)

    def check_tools(self) -> None:
        """Raise ``TargetError`` naming the missing tool before any work is done."""
        for what, names, hint in self.tools:
            if find_tool(names) is None:
                raise TargetError(f"target {self.name!r} needs {what} ({' or '.join(names[:2])}), "
                                  f"which is not installed: {hint}")
        if self.cuda_arches:
            from sam3_nn.kernels.cuda import cutlass_route

            if cutlass_route(self.cuda_arches):  # Hopper-only: the CUTLASS GEMM/conv kernels
                from sam3_nn.kernels.cuda_source import cutlass_include

                cutlass_include()  # raises with the install hint

    def compile(self, mod, log: Callable[[str], None] = lambda s: None, cuda_graph: bool = True,
                lift: Sequence[str] = ()):
        """``cuda_graph`` (CUDA): TVM's RewriteCUDAGraph lifts the statically planned
        buffers into one allocation and each run of kernel launches on them into a CUDA
        graph, captured at the first call and replayed after; it needs static shapes
        (``build(batch=N)``), and leaves dynamic-shape code as it is. ``lift``: functions
        whose weight-only work moves into a transform run once at bind time
        (sam3_nn.param_transform)."""
        kw = {"system_lib": True} if self.system_lib else {}
        target = self.tvm_target()
        config = {"relax.backend.use_cuda_graph": bool(cuda_graph and self.target["kind"] == "cuda")}
        nvcc = (_cuda_compile_callback(self.cuda_arches, self.cuda_ptx) if self.cuda_arches
                else contextlib.nullcontext())
        with tvm.transform.PassContext(config=config), nvcc:
            return relax.build(mod, target=target, relax_pipeline=self.pipeline(log, lift), **kw)

    def export(self, ex, path: str, log: Callable[[str], None] = lambda s: None,
               final_name: Optional[str] = None) -> None:
        """Write the library to ``path`` (format by preset; ``final_name``: the file name
        it will have, for the dylib install name)."""
        if self.cuda_arches:
            kw = {}
            rt = getattr(ex, "mod", ex)
            if rt._collect_from_import_tree(lambda m: m.kind == "static_library"):
                # hand-written CUDA kernels (sam3_nn/kernels/cuda): link cudart statically
                from sam3_nn.kernels.cuda_source import fcompile_with_cudart

                kw["fcompile"] = fcompile_with_cudart()
            ex.export_library(path, fpack_imports=cuda_pack_imports(self.cuda_arches,
                                                                     self.cuda_ptx, log), **kw)
        elif self.suffix == "tar":
            from tvm.support import tar as _tar

            ex.export_library(path, fcompile=_tar.tar)
        elif self.suffix == "dylib":
            arch = "arm64"
            triple = (self.host or self.target).get("mtriple", "")
            platform, version = ("ios", "15.0") if "ios" in triple else ("macos", "13.0")
            ex.export_library(path, fcompile=link_macho(arch, platform, version, final_name))
        elif self.host is not None and self.host.get("mtriple", "").startswith("aarch64"):
            ex.export_library(path, fcompile=link_elf_shared())
        elif self.target.get("mtriple", "").startswith("aarch64"):
            ex.export_library(path, fcompile=link_elf_shared())
        else:
            ex.export_library(path)

    def describe(self) -> Dict:
        d = {"name": self.name, "target": self.target, "host": self.host,
             "library_format": self.library_format, "description": self.description}
        if self.cuda_arches:
            d["cuda_arches"] = list(self.cuda_arches)
            d["cuda_ptx"] = self.cuda_ptx
        return d


class _cuda_compile_callback:
    """Override ``tvm_callback_cuda_compile`` while building: where TVM's CUDA runtime is
    present (a GPU machine), codegen JIT-compiles through this callback; we answer with our
    fatbin instead of NVRTC's single-arch cubin. Restored afterwards."""

    NAME = "tvm_callback_cuda_compile"

    def __init__(self, arches, ptx):
        self.arches, self.ptx = arches, ptx

    def __enter__(self):
        import tvm_ffi

        self.prev = tvm_ffi.get_global_func(self.NAME, allow_missing=True)
        arches, ptx = self.arches, self.ptx

        def sam3_nvcc_fatbin(code, *_):
            return bytearray(nvcc_fatbin(code, arches, ptx))

        tvm_ffi.register_global_func(self.NAME, sam3_nvcc_fatbin, override=True)
        return self

    def __exit__(self, *exc):
        import tvm_ffi

        if self.prev is not None:
            tvm_ffi.register_global_func(self.NAME, self.prev, override=True)
        else:
            tvm_ffi.registry.remove_global_func(self.NAME)
        return False


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
    from tvm.target import codegen

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
