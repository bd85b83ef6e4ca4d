"""Build a library + manifest for one target from a config.

``build`` is what ``compile.py`` and the tests call. Weights are never baked in:
parameters are the trailing (packed) argument of every exported function.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional

import tvm
from tvm.relax.frontend import nn

from . import __version__
from .attention import kernel_target
from .config import Sam3Config
from .model import PARTS, Sam3Model
from .param_transform import packed_functions, transform_name
from .rope import RopeMode
from .targets import get_preset

ROPE_MODES = {"none": RopeMode.NONE, "normal": RopeMode.NORMAL, "inline": RopeMode.INLINE}


def _shape_list(shape):
    return [int(s) if isinstance(s, (int, tvm.tirx.IntImm)) else str(s) for s in shape]


def export(cfg: Sam3Config, dtype: str, rope_mode: RopeMode, parts=PARTS, target=None,
           batch: Optional[int] = None):
    """Trace the model to Relax. ``target`` (a ``tvm.target.Target``) decides which
    hand-written kernels are emitted (GPU or CPU attention schedule); None: the current
    target, else the CPU kernels. ``batch``: the one batch size the functions take, or
    None for any (see ``Sam3Model.export_spec``)."""
    with (kernel_target(target) if target is not None else contextlib.nullcontext()):
        model = Sam3Model(cfg, rope_mode, parts)
        model.to(dtype)
        spec = model.export_spec(dtype, batch)
        mod, params = model.export_tvm(spec=spec)
    return model, mod, params, spec


def manifest_for(cfg, model, mod, params, spec, dtype, target_name, rope_mode,
                 batch: Optional[int] = None) -> Dict:
    functions = {}
    outs = model.output_names()
    for fname, args in spec.items():
        inputs = []
        for aname, a in args.items():
            if aname == "$":
                continue
            if isinstance(a, nn.spec.Tensor):
                inputs.append({"name": aname, "shape": _shape_list(a.shape), "dtype": a.dtype})
            else:
                inputs.append({"name": aname, "shape": [], "dtype": "int64"})
        ret = mod[fname].ret_ty
        fields = ret.fields if hasattr(ret, "fields") else [ret]
        outputs = [{"name": n, "shape": _shape_list(f.shape), "dtype": str(f.dtype)}
                   for n, f in zip(outs[fname], fields)]
        functions[fname] = {"inputs": inputs, "outputs": outputs}
    return {
        "format": "sam3_nn-library",
        "sam3_nn_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target_name,
        "dtype": dtype,
        "rope_mode": rope_mode.name.lower(),
        "batch": batch,  # null: any batch size
        "parts": list(model.parts),
        "config": cfg.to_dict(),
        "functions": functions,
        "params": [{"name": n, "shape": _shape_list(p.shape), "dtype": str(p.dtype)} for n, p in params],
    }


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + base, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build(cfg: Sam3Config, target: str = "llvm", dtype: Optional[str] = None,
          rope_mode: Optional[str] = None, output: str = "dist",
          log: Callable[[str], None] = lambda s: None, parts=PARTS,
          arch: Optional[str] = None, batch: Optional[int] = None,
          cuda_graph: bool = True) -> Dict[str, str]:
    """Compile the model for ``target``; write ``sam3-<target>.<ext>`` and ``.json``.

    ``arch`` (cuda targets only): comma-separated SASS arches, e.g. ``sm_80,sm_90a``.
    ``batch``: compile for that batch size only (static shapes: memory planned ahead of
    time, CUDA graphs on CUDA targets); None: any batch size.
    ``cuda_graph`` (CUDA targets): replay each call's kernel launches as CUDA graphs.
    Nothing is left in ``output`` when a step fails."""
    preset = get_preset(target, arch)
    target = preset.name
    dtype = dtype or preset.default_dtype
    rope_mode = rope_mode or preset.default_rope_mode
    if dtype not in ("float32", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; expected float32 or float16")
    if rope_mode not in ROPE_MODES:
        raise ValueError(f"unknown rope mode {rope_mode!r}; expected one of {sorted(ROPE_MODES)}")
    preset.check_tools()
    mode = ROPE_MODES[rope_mode]
    t0 = time.time()
    log(f"[1/4] export: {target}, {dtype}, rope {rope_mode}, parts {', '.join(parts)}, "
        f"batch {batch or 'any'}")
    model, mod, params, spec = export(cfg, dtype, mode, parts, preset.tvm_target(), batch)
    manifest = manifest_for(cfg, model, mod, params, spec, dtype, target, mode, batch)
    t1 = time.time()
    log(f"[2/4] compile for {preset.description} ({len(params)} parameters) "
        f"[{t1 - t0:.1f} s]")
    # every function taking the packed weights gets its weight-only work lifted into a
    # transform that the runtime runs once, when weights are bound (sam3_nn.param_transform)
    lift = packed_functions(mod)
    ex = preset.compile(mod, log, cuda_graph=cuda_graph, lift=lift)
    t2 = time.time()
    kernels = device_kernels(ex.mod)
    lib_path = os.path.join(output, f"sam3-{target}.{preset.suffix}")
    json_path = os.path.join(output, f"sam3-{target}.json")
    log(f"[3/4] export {preset.library_format}: {lib_path} ({len(kernels)} device kernels) "
        f"[{t2 - t1:.1f} s]")
    _atomic_write(lib_path, lambda p: preset.export(ex, p, log, os.path.basename(lib_path)))
    t3 = time.time()
    log(f"[4/4] manifest {json_path} [{t3 - t2:.1f} s]")
    manifest.update({
        "library": os.path.basename(lib_path),
        "preset": preset.describe(),
        "tvm_ffi_version": _ffi_version(),
        "kernels": kernels,
        "param_transforms": {f: transform_name(f) for f in lift},
        "build_seconds": round(time.time() - t0, 1),
    })
    try:
        _atomic_write(json_path, lambda p: open(p, "w").write(json.dumps(manifest, indent=1)))
    except BaseException:
        os.unlink(lib_path)
        raise
    return {"library": lib_path, "manifest": json_path}


def _ffi_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("apache-tvm-ffi")
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def device_kernels(lib) -> List[str]:
    """Names of the device kernels (GPU) in a built module tree; empty for CPU targets."""
    import re

    names: List[str] = []
    seen = set()

    def walk(m):
        if id(m) in seen:
            return
        seen.add(id(m))
        if m.kind in ("metal", "cuda", "opencl", "rocm", "webgpu", "vulkan"):
            src = m.inspect_source("")
            pat = {"metal": r"kernel\s+void\s+(\w+)\s*\(",
                   "cuda": r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(",
                   "opencl": r"__kernel\s+void\s+(\w+)\s*\("}.get(m.kind)
            if pat:
                names.extend(re.findall(pat, src))
        for i in m.imports:
            walk(i)

    walk(lib)
    return sorted(set(names))
