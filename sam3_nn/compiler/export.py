"""Export a built module as a library file: the per-format link steps (ELF, Mach-O,
tar of objects) and, for CUDA, the device code compiled ahead of time into a fatbin so that
loading the library needs no NVRTC, nvcc or Python compile callback."""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

import tvm
import tvm_ffi
from tvm.support import tar as _tar

from sam3_nn.compiler.options import Toolchain
from sam3_nn.compiler.tools import LD64, LD_ELF, NVCC, TargetError, find_tool, run
from sam3_nn.kernels.cuda.source import fcompile_with_cudart


def link_macho(arch: str, platform: str, min_version: str, install_name: Optional[str] = None,
               ld: Optional[str] = None):
    """An ``export_library`` fcompile linking Mach-O objects into a dylib with ld64.lld."""

    def fcompile(output: str, objects: List[str], **_):
        tool = ld or find_tool(LD64)
        if tool is None:
            raise TargetError("ld64.lld not found (Debian/Ubuntu: `make deps-metal`, i.e. "
                              "apt-get install lld-19)")
        run([tool, "-dylib", "-arch", arch, "-platform_version", platform, min_version,
              min_version, "-undefined", "dynamic_lookup", "-install_name",
              "@rpath/" + (install_name or os.path.basename(output)), "-o", output, *objects], "ld64.lld link")

    return fcompile


def link_elf_shared(ld: Optional[str] = None):
    """An ``export_library`` fcompile linking ELF objects into a shared library with ld.lld."""

    def fcompile(output: str, objects: List[str], **_):
        tool = ld or find_tool(LD_ELF)
        if tool is None:
            raise TargetError("ld.lld not found (Debian/Ubuntu: apt-get install lld-19)")
        run([tool, "-shared", "-o", output, *objects], "ld.lld link")

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
        run([nvcc, "--fatbin", "-O3", "-std=c++17", "-w", *gencode, "-o", out, src], "nvcc")
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




class cuda_compile_callback:
    """Override ``tvm_callback_cuda_compile`` while building: where TVM's CUDA runtime is
    present (a GPU machine), codegen JIT-compiles through this callback; we answer with our
    fatbin instead of NVRTC's single-arch cubin. Restored afterwards."""

    NAME = "tvm_callback_cuda_compile"

    def __init__(self, arches, ptx):
        self.arches, self.ptx = arches, ptx

    def __enter__(self):


        self.prev = tvm_ffi.get_global_func(self.NAME, allow_missing=True)
        arches, ptx = self.arches, self.ptx

        def sam3_nvcc_fatbin(code, *_):
            return bytearray(nvcc_fatbin(code, arches, ptx))

        tvm_ffi.register_global_func(self.NAME, sam3_nvcc_fatbin, override=True)
        return self

    def __exit__(self, *exc):


        if self.prev is not None:
            tvm_ffi.register_global_func(self.NAME, self.prev, override=True)
        else:
            tvm_ffi.registry.remove_global_func(self.NAME)
        return False




def export_library(preset, ex, path: str, log: Callable[[str], None] = lambda s: None,
                   final_name: Optional[str] = None, toolchain: Toolchain = Toolchain()) -> None:
    """Write the built ``ex`` to ``path`` in ``preset``'s format (``final_name``: the file
    name it will have, for the dylib install name)."""
    if preset.cuda_arches:
        kw = {}
        rt = getattr(ex, "mod", ex)
        if rt._collect_from_import_tree(lambda m: m.kind == "static_library"):
            # hand-written CUDA kernels (sam3_nn/kernels/cuda): link cudart statically
            kw["fcompile"] = fcompile_with_cudart(tc=toolchain)
        ex.export_library(path, fpack_imports=cuda_pack_imports(preset.cuda_arches,
                                                                 preset.cuda_ptx, log), **kw)
    elif preset.suffix == "tar":
        ex.export_library(path, fcompile=_tar.tar)
    elif preset.suffix == "dylib":
        triple = (preset.host or preset.target).get("mtriple", "")
        platform, version = ("ios", "15.0") if "ios" in triple else ("macos", "13.0")
        ex.export_library(path, fcompile=link_macho("arm64", platform, version, final_name))
    elif (preset.host or preset.target).get("mtriple", "").startswith("aarch64"):
        ex.export_library(path, fcompile=link_elf_shared())
    else:
        ex.export_library(path)
