"""Build a library + manifest for one target from a config and the build options.

``build(cfg, options, output)`` is what the ``compile`` command and the tests call. Weights
are never baked in: parameters are the trailing (packed) argument of every exported function.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional

import tvm
from tvm import relax
from tvm.relax.frontend import nn

from sam3_nn import __version__
from sam3_nn.compiler.export import cuda_compile_callback, export_library
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.compiler.passes.param_transform import packed_functions, transform_name
from sam3_nn.compiler.pipeline import build_pipeline
from sam3_nn.compiler.presets import TargetPreset, get_preset
from sam3_nn.config import Sam3Config
from sam3_nn.files import atomic_write_path, file_sha256, write_text
from sam3_nn.kernels.cuda.gemm import cutlass_route
from sam3_nn.kernels.cuda.source import cutlass_include
from sam3_nn.model.sam3 import DEFAULT_PARTS, PARTS, Sam3Model


def _shape_list(shape):
    return [int(s) if isinstance(s, (int, tvm.tirx.IntImm)) else str(s) for s in shape]


def export(cfg: Sam3Config, dtype: str, parts=DEFAULT_PARTS, batch: Optional[int] = None,
           max_boxes: int = 8, max_points: int = 16):
    """Trace the model to Relax (target-independent: operators are routed to kernels by the
    pipeline). ``batch``: the one batch size the functions take, or None for any (see
    ``Sam3Model.export_spec``)."""
    model = Sam3Model(cfg, parts, max_boxes=max_boxes, max_points=max_points)
    model.to(dtype)
    spec = model.export_spec(dtype, batch)
    mod, params = model.export_tvm(spec=spec)
    return model, mod, params, spec


def manifest_for(cfg, model, mod, params, spec, options: BuildOptions) -> Dict:
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
        notes = model.output_notes().get(fname, {})
        outputs = [{"name": n, "shape": _shape_list(f.shape), "dtype": str(f.dtype), **notes.get(n, {})}
                   for n, f in zip(outs[fname], fields)]
        functions[fname] = {"inputs": inputs, "outputs": outputs}
    return {
        "format": "sam3_nn-library",
        "sam3_nn_version": __version__,
        "tvm_version": tvm.__version__,
        "target": options.target,
        "dtype": options.dtype,
        "rope_mode": options.kernels.rope_mode,
        "batch": options.batch or None,  # null: any batch size
        "parts": list(model.parts),
        "options": options.record(),
        "config": manifest_config(cfg, model.parts),
        "functions": functions,
        "params": [{"name": n, "shape": _shape_list(p.shape), "dtype": str(p.dtype)} for n, p in params],
    }


def manifest_config(cfg: Sam3Config, parts) -> Dict:
    """The config a manifest records: without the tracker section when the interactive part
    is not built, so a detector library's config (and the weights fingerprint made from it)
    is what it was before that part existed."""
    d = cfg.to_dict()
    if "interactive" not in parts:
        d.pop("tracker")
    if "video" not in parts:
        d.pop("video")
    return d


def check_tools(preset: TargetPreset, options: BuildOptions) -> None:
    """Raise ``TargetError`` naming a missing build tool before any work is done: the
    preset's linkers and compilers, and CUTLASS's headers for a Hopper-only CUDA library."""
    preset.check_tools()
    if preset.cuda_arches and options.kernels.cutlass and cutlass_route(preset.cuda_arches):
        cutlass_include(options.toolchain)  # raises with the install hint


def resolve(options: BuildOptions) -> tuple:
    """``(preset, options)`` with the target's defaults filled in (dtype, batch, RoPE mode)
    and the options checked; raises ``TargetError`` / ``ValueError`` with the reason."""
    preset = get_preset(options.target, options.arch)
    dtype = options.dtype or preset.default_dtype
    if dtype not in ("float32", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; expected float32 or float16")
    batch = preset.default_batch if options.batch is None else options.batch
    if batch is not None and (not isinstance(batch, int) or batch < 0):
        raise ValueError(f"batch must be a positive integer or 0 (any), got {batch!r}")
    unknown = sorted(set(options.parts) - set(PARTS))
    if unknown or not options.parts:
        raise ValueError(f"unknown model parts {unknown or '(none)'}; known: {list(PARTS)}")
    if options.max_boxes < 1:
        raise ValueError(f"max_boxes must be at least 1, got {options.max_boxes}")
    if options.max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {options.max_points}")
    if "interactive" in options.parts and "vision" not in options.parts:
        raise ValueError("the interactive part needs the vision part (parts vision,interactive)")
    if "video" in options.parts and "interactive" not in options.parts:
        raise ValueError("the video part needs the interactive part (parts vision,interactive,video)")
    rope_mode = options.kernels.rope_mode or ("inline" if preset.gpu else "normal")
    parts = tuple(p for p in PARTS if p in options.parts)
    return preset, options.with_(target=preset.name, dtype=dtype, batch=batch or 0, parts=parts,
                                 rope_mode=rope_mode)


def compile_module(preset: TargetPreset, options: BuildOptions, mod: tvm.IRModule,
                   log: Callable[[str], None] = lambda s: None, lift=()):
    """``relax.build`` of ``mod`` through the target's pipeline. With ``options.cuda_graph``
    on a CUDA target, TVM's RewriteCUDAGraph lifts the statically planned buffers into one
    allocation and each run of kernel launches on them into a CUDA graph, captured at the
    first call and replayed after; it needs static shapes (a fixed batch) and leaves
    dynamic-shape code as it is. ``lift``: functions whose weight-only work moves into a
    transform run once at bind time (sam3_nn.compiler.passes.param_transform)."""
    kw = {"system_lib": True} if preset.system_lib else {}
    cuda = preset.target["kind"] == "cuda"
    config = {"relax.backend.use_cuda_graph": bool(options.cuda_graph and cuda)}
    nvcc = (cuda_compile_callback(preset.cuda_arches, preset.cuda_ptx) if preset.cuda_arches
            else contextlib.nullcontext())
    with tvm.transform.PassContext(config=config), nvcc:
        return relax.build(mod, target=preset.tvm_target(),
                           relax_pipeline=build_pipeline(preset, options, log, lift), **kw)


def build(cfg: Sam3Config, options: BuildOptions = BuildOptions(), output: str = "dist",
          log: Callable[[str], None] = lambda s: None) -> Dict[str, str]:
    """Compile the model for ``options.target``; write ``sam3-<target>.<ext>`` and ``.json``
    (the manifest records the options with the target's defaults filled in). Nothing is
    left in ``output`` when a step fails."""
    preset, options = resolve(options)
    check_tools(preset, options)
    t0 = time.time()
    log(f"[1/4] export: {preset.name}, {options.dtype}, rope {options.kernels.rope_mode}, "
        f"parts {', '.join(options.parts)}, batch {options.batch or 'any'}")
    model, mod, params, spec = export(cfg, options.dtype, options.parts, options.batch or None,
                                      options.max_boxes, options.max_points)
    manifest = manifest_for(cfg, model, mod, params, spec, options)
    t1 = time.time()
    log(f"[2/4] compile for {preset.description} ({len(params)} parameters) "
        f"[{t1 - t0:.1f} s]")
    # every function taking the packed weights gets its weight-only work lifted into a
    # transform that the runtime runs once, when weights are bound (param_transform)
    lift = packed_functions(mod)
    ex = compile_module(preset, options, mod, log, lift)
    t2 = time.time()
    kernels = device_kernels(ex.mod)
    lib_path = os.path.join(output, f"sam3-{preset.name}.{preset.suffix}")
    json_path = os.path.join(output, f"sam3-{preset.name}.json")
    log(f"[3/4] export {preset.library_format}: {lib_path} ({len(kernels)} device kernels) "
        f"[{t2 - t1:.1f} s]")
    # the linker writes the library: it needs a path (a hidden partial file until complete)
    atomic_write_path(lib_path, lambda p: export_library(preset, ex, p, log, os.path.basename(lib_path),
                                                         options.toolchain))
    t3 = time.time()
    log(f"[4/4] manifest {json_path} [{t3 - t2:.1f} s]")
    manifest.update({
        "library": os.path.basename(lib_path),
        "preset": preset.describe(),
        "tvm_ffi_version": _ffi_version(),
        "kernels": kernels,
        "param_transforms": {f: transform_name(f) for f in lift},
        # the runtime checks it: a manifest from another build is refused, not run
        "library_sha256": file_sha256(lib_path),
        "build_seconds": round(time.time() - t0, 1),
    })
    try:
        write_text(json_path, json.dumps(manifest, indent=1))
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
