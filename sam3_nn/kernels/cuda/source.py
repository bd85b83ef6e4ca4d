"""Hand-written CUDA kernels (``sam3_nn/kernels/cuda/*.cu``) linked into the library.

The plumbing in four calls; a kernel author writes a ``.cu`` file and uses them from a
Relax rewrite (or an ``nn.Module``'s trace)::

    from sam3_nn.kernels.cuda import source as cs

    obj = cs.compile_object("gemm_sm90", arches=("sm_90a",), cutlass=True)  # cached .o
    call = cs.extern_call("sam3_gemm_sm90_f16", [a, w, bias],
                          relax.TensorType([m, n], "float16"))             # Relax expr
    mod = cs.attach(mod, [obj])                                              # IRModule

* ``compile_object(name, arches)`` runs ``nvcc -c`` on ``cuda/<name>.cu`` for the given
  SASS arches (``sm_90a`` -> ``-gencode=arch=compute_90a,code=sm_90a``), with the
  tvm-ffi / DLPack headers (and CUTLASS's with ``cutlass=True``) on the include path.
  The object is cached under :func:`cache_dir` by a hash of the source (and the headers in
  ``cuda/``), flags and nvcc version, so a rebuild costs nothing.
* The ``.cu`` file exports each entry point with tvm-ffi, in destination-passing style
  (outputs are the trailing arguments, allocated by the VM)::

      #include <tvm/ffi/function.h>
      #include <tvm/ffi/container/tensor.h>
      #include <tvm/ffi/extra/c_env_api.h>
      void my_kernel(tvm::ffi::TensorView a, tvm::ffi::TensorView out) {
        auto stream = static_cast<cudaStream_t>(
            TVMFFIEnvGetStream(a.device().device_type, a.device().device_id));
        ...launch on `stream`; TVM_FFI_THROW(RuntimeError) << ... on errors
      }
      TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_my_kernel, my_kernel);

  (symbols are global in the final library: prefix them ``sam3_``).
* ``extern_call(symbol, args, out_sinfo)`` is ``relax.call_dps_packed``; the VM finds
  ``symbol`` in the loaded library (``__tvm_ffi_<symbol>``).
* ``attach(mod, objects)`` adds the objects to the IRModule's ``external_mods``
  attribute (as ``static_library`` runtime modules): ``relax.build`` imports them into
  the executable and ``TargetPreset.export`` links them into ``sam3-<target>.so``
  together with ``libcudart_static.a`` (:func:`link_objects`; the library then needs only
  the driver, ``ldd`` shows no libcudart). A pass may call ``attach`` on its output
  module; attaching the same object twice is a no-op.

nvcc is required whenever a kernel is compiled (``CudaSourceError`` says so);
CUTLASS (``pip install 'sam3_nn[cuda]'`` or ``nvidia-cutlass==4.2.0.0``: we use its
headers only) when ``cutlass=True``. CPU-only installs never import any of this.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import tvm
from tvm import relax

from sam3_nn.compiler.options import Toolchain
from sam3_nn.compiler.tools import NVCC, TargetError, find_tool

CUDA_DIR = Path(__file__).resolve().parent / "csrc"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
_ATTR = "sam3_cuda_objects"  # module attr: paths already attached (dedup)


class CudaSourceError(TargetError):
    """nvcc or CUTLASS missing, or a CUDA source failed to compile (a ``TargetError``:
    ``compile.py`` reports it without a traceback)."""


def nvcc_path(tc: Toolchain = Toolchain()) -> str:
    p = find_tool(((str(Path(tc.cuda_home) / "bin" / "nvcc"),) if tc.cuda_home else ()) + NVCC)
    if p:
        return p
    raise CudaSourceError("nvcc not found: the cuda targets compile hand-written kernels "
                          "(sam3_nn/kernels/cuda/*.cu) with it; install the CUDA toolkit "
                          "or put nvcc on PATH")


def cuda_home(tc: Toolchain = Toolchain()) -> Path:
    """The toolchain's CUDA home (the CLI takes ``$CUDA_HOME`` / ``$CUDA_PATH``), the toolkit
    around nvcc, or /usr/local/cuda."""
    cands = [tc.cuda_home]
    try:
        cands.append(str(Path(os.path.realpath(nvcc_path(tc))).parent.parent))
    except CudaSourceError:
        pass
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    raise CudaSourceError("CUDA toolkit not found (set CUDA_HOME)")


def cutlass_include(tc: Toolchain = Toolchain()) -> Path:
    """CUTLASS/CuTe headers: the toolchain's (the CLI takes ``$CUTLASS_HOME/include``) or the
    ``nvidia-cutlass`` wheel's."""
    if tc.cutlass_include and (Path(tc.cutlass_include) / "cutlass").is_dir():
        return Path(tc.cutlass_include)
    spec = importlib.util.find_spec("cutlass_library")  # no import: it pulls cuda-python
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            inc = Path(loc) / "source" / "include"
            if (inc / "cutlass").is_dir() and (inc / "cute").is_dir():
                return inc
    raise CudaSourceError(
        "CUTLASS headers not found: the cuda GEMM kernels need them at build time. "
        f"Install them with `pip install --no-deps '{CUTLASS_PIN}'` (or `make compile "
        "TARGET=cuda`, which does), or set CUTLASS_HOME to a CUTLASS checkout")


def cutlass_available(tc: Toolchain = Toolchain()) -> bool:
    try:
        cutlass_include(tc)
        return True
    except CudaSourceError:
        return False


def nvcc_available(tc: Toolchain = Toolchain()) -> bool:
    try:
        nvcc_path(tc)
        return True
    except CudaSourceError:
        return False


def cache_dir(tc: Toolchain = Toolchain()) -> Path:
    """The toolchain's cache folder (the CLI takes ``$SAM3_CUDA_CACHE``), else
    ``<repo>/build/cuda-objects`` (git-ignored), else ``~/.cache/sam3_nn/cuda-objects``."""
    if tc.cache_dir:
        return Path(tc.cache_dir)
    repo = CUDA_DIR.parents[3]
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / "build" / "cuda-objects"
    return Path.home() / ".cache" / "sam3_nn" / "cuda-objects"


def gencode(arches: Sequence[str]) -> List[str]:
    """``sm_90a`` -> ``-gencode=arch=compute_90a,code=sm_90a`` (SASS only, per arch)."""
    out = []
    for a in arches:
        if not a.startswith("sm_"):
            raise CudaSourceError(f"bad CUDA arch {a!r}; expected sm_<digits>[a]")
        num = a[3:]
        out.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return out


def _includes(cutlass: bool, tc: Toolchain) -> List[str]:
    import tvm_ffi.libinfo as ffi_info

    inc = [str(CUDA_DIR), ffi_info.find_include_path(), ffi_info.find_dlpack_include_path()]
    if cutlass:
        root = cutlass_include(tc)
        inc.append(str(root))
        util = root.parent / "tools" / "util" / "include"  # cutlass/util/*.hpp
        if util.is_dir():
            inc.append(str(util))
    return [f"-I{p}" for p in inc]


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def compile_object(name: str, arches: Sequence[str], *, cutlass: bool = False,
                   defines: Iterable[str] = (), flags: Iterable[str] = (),
                   log=lambda s: None, toolchain: Toolchain = Toolchain()) -> Path:
    """Compile ``csrc/<name>.cu`` to an object for ``arches``; cached, returns its path."""
    tc = toolchain
    src = CUDA_DIR / f"{name}.cu"
    if not src.is_file():
        raise CudaSourceError(f"no CUDA source {src}")
    nvcc = nvcc_path(tc)
    cmd_flags = (["-c", "-O3", "-std=c++17", "-Xcompiler=-fPIC", "--expt-relaxed-constexpr",
                  "-DNDEBUG", "-w"] + gencode(arches) + _includes(cutlass, tc)
                 + [f"-D{d}" for d in defines] + list(flags))
    h = hashlib.sha256()
    h.update(_nvcc_version(nvcc).encode())
    h.update("\0".join(c for c in cmd_flags if not c.startswith("-I")).encode())
    if cutlass:
        h.update(str(cutlass_include(tc)).encode())
    for f in [src] + sorted(CUDA_DIR.iterdir()):  # the .cu and every local header
        if f == src or (f.is_file() and f.suffix in (".cuh", ".h", ".hpp")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    key = h.hexdigest()[:16]
    out_dir = cache_dir(tc)
    out = out_dir / f"{name}-{'-'.join(arches)}-{key}.o"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"  nvcc: {src.name} ({', '.join(arches)})")
    fd, tmp = tempfile.mkstemp(suffix=".o", dir=out_dir)
    os.close(fd)
    try:
        p = subprocess.run([nvcc, *cmd_flags, "-o", tmp, str(src)], capture_output=True, text=True)
        if p.returncode != 0:
            raise CudaSourceError(f"nvcc failed on {src.name}:\n{(p.stdout + p.stderr)[-6000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def compile_objects(jobs: Sequence[dict], log=lambda s: None) -> List[Path]:
    """Several :func:`compile_object` calls (dicts of its keyword arguments + ``name``)
    run in parallel (nvcc is single-threaded per file)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        futs = [ex.submit(compile_object, log=log, **j) for j in jobs]
        return [f.result() for f in futs]


def extern_call(symbol: str, args: Sequence[relax.Expr],
                out_sinfo: Union[relax.TensorType, Sequence[relax.TensorType]]) -> relax.Call:
    """``call_dps_packed(symbol, args)``: outputs ``out_sinfo`` allocated by the VM and
    passed after ``args``."""
    return relax.call_dps_packed(symbol, list(args), out_sinfo)


def attach(mod: tvm.IRModule, objects: Sequence[Union[str, Path]]) -> tvm.IRModule:
    """``mod`` with ``objects`` added to ``external_mods`` (linked into the library)."""
    attrs = dict(mod.attrs) if mod.attrs else {}
    done = [str(p) for p in attrs.get(_ATTR, [])]
    ext = list(attrs.get("external_mods", []))
    new = [str(Path(p)) for p in objects if str(Path(p)) not in done]
    if not new:
        return mod
    for p in new:
        ext.append(tvm.runtime.load_static_library(p, []))
    mod = mod.with_attr("external_mods", ext)
    return mod.with_attr(_ATTR, done + new)


def link_objects(tc: Toolchain = Toolchain()) -> List[str]:
    """Extra linker inputs for a library holding :func:`attach`'d objects: the static CUDA
    runtime, its symbols kept local (no clash with another libcudart in the process)."""
    home = cuda_home(tc)
    lib = home / "lib64" / "libcudart_static.a"
    if not lib.is_file():
        alt = home / "targets" / "x86_64-linux" / "lib" / "libcudart_static.a"
        lib = alt if alt.is_file() else lib
    if not lib.is_file():
        raise CudaSourceError(f"libcudart_static.a not found under {home}")
    return [str(lib), "-Wl,--exclude-libs,ALL", "-ldl", "-lrt", "-lpthread"]


def has_static_objects(rt_mod) -> bool:
    """Whether a built module tree imports ``static_library`` objects (needs cudart)."""
    return bool(rt_mod._collect_from_import_tree(lambda m: m.kind == "static_library"))


def fcompile_with_cudart(base=None, tc: Toolchain = Toolchain()):
    """An ``export_library`` fcompile: ``base`` (default ``cc.create_shared``) with
    :func:`link_objects` appended after the objects."""
    from tvm.support import cc as _cc

    base = base or _cc.create_shared

    def fcompile(output, objects, **kw):
        return base(output, list(objects) + link_objects(tc), **kw)

    return fcompile


def calls_extern(mod: tvm.IRModule, symbols: Sequence[str]) -> bool:
    """Whether a Relax function of ``mod`` calls one of ``symbols``."""
    found = []

    def visit(e):
        if isinstance(e, relax.ExternFunc) and e.global_symbol in symbols:
            found.append(e)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function) and not found:
            relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def sass_arches(target: Optional[tvm.target.Target], cuda_arches: Optional[Sequence[str]],
                what: str) -> tuple:
    """The SASS arches to compile ``what`` for: ``cuda_arches`` (a preset's), else the
    target's own arch."""
    if cuda_arches:
        return tuple(cuda_arches)
    arch = str(target.attrs.get("arch", "")) if target is not None else ""
    if not arch.startswith("sm_"):
        raise ValueError(f"the CUDA {what} kernel needs the target's SASS arch (e.g. sm_90a)")
    return (arch,)


def attach_pass(source: str, symbols: Sequence[str], what: str,
                target: Optional[tvm.target.Target] = None,
                cuda_arches: Optional[Sequence[str]] = None, log=lambda s: None,
                defines: Sequence[str] = (), toolchain: Toolchain = Toolchain()) -> tvm.transform.Pass:
    """Module pass: compile ``csrc/<source>.cu`` for ``cuda_arches`` (default: the target's
    arch) with ``defines`` and attach the object when the module calls one of ``symbols``;
    cheap otherwise. It has to run in the CUDA pipeline before the build."""

    @tvm.transform.module_pass(opt_level=0, name=f"sam3_{source}_cuda_object")
    def _attach(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not calls_extern(mod, symbols):
            return mod
        tgt = target or tvm.target.Target.current(allow_none=True)
        return attach(mod, [compile_object(source, sass_arches(tgt, cuda_arches, what), log=log,
                                           defines=defines, toolchain=toolchain)])

    return _attach
