"""Target presets: every build writes a loadable library + manifest, or fails cleanly.

* llvm: built through ``compile.py`` from an HF snapshot, loaded, matches transformers.
* metal: a Mach-O arm64 dylib (linked on Linux by ld64.lld) whose embedded Metal source
  holds every kernel of the module, without 64-bit float or complex types.
* cuda: the library carries a fatbin, no CUDA source to compile at load.
* errors: unknown / unsupported target, missing linker, failing link, bad --model:
  a clear message and no file left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct

import numpy as np
import pytest
import torch

from tests.refs import TINY_HF, assert_close, channel_first, randomize_, save_hf_snapshot
from sam3_nn.compiler import build as build_mod
from sam3_nn.compiler import export as export_mod
from sam3_nn.compiler import pipeline as pipeline_mod
from sam3_nn.compiler import presets as targets
from sam3_nn.compiler import tools
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.config import Sam3Config
from sam3_nn.runtime.engine import LibraryError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("vision",)


def compile_cli(*args):
    """``compile.py`` (the thin wrapper of ``sam3-nn compile``) in-process -> (exit status,
    stdout, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_cli", os.path.join(ROOT, "compile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = mod.main(["compile", *[str(a) for a in args]])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def files_in(folder) -> list:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def tiny_cfg() -> Sam3Config:
    from tests.refs import tiny_hf_config

    return Sam3Config.from_hf(tiny_hf_config().to_dict())


# ----------------------------------------------------------------------------------------
# llvm: compile.py from an HF snapshot, load, parity with transformers
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    from transformers import Sam3VisionConfig, Sam3VisionModel

    model = randomize_(Sam3VisionModel(Sam3VisionConfig(**TINY_HF["vision_config"])).eval(), seed=4)
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_vision")))
    return model, folder


def test_default_batch_is_static_on_cuda_only():
    assert targets.get_preset("cuda-sm90a").default_batch == 1
    assert targets.get_preset("cuda").default_batch == 1
    assert targets.get_preset("llvm").default_batch is None
    assert targets.get_preset("metal").default_batch is None


def test_llvm_compile_cli_loads_and_matches(hf_vision, tmp_path):
    from sam3_nn.runtime.engine import CompiledModel
    from sam3_nn.weights import load_params, open_checkpoint

    model, folder = hf_vision
    out = tmp_path / "dist"
    code, stdout, stderr = compile_cli("--target", "llvm", "--model", folder, "--parts", "vision",
                                       "--batch", "1", "--output", out)
    assert code == 0, stderr
    assert files_in(out) == ["sam3-llvm.json", "sam3-llvm.so"]
    # one progress line per stage and a one-line summary with size and time
    for stage in ("[1/4] export", "[2/4] compile", "[3/4] export", "[4/4] manifest"):
        assert stage in stdout
    assert re.search(r"built .*sam3-llvm\.so \(\d+\.\d MiB\) .* in \d+\.\d s", stdout), stdout

    manifest = json.loads((out / "sam3-llvm.json").read_text())
    for key in ("config", "dtype", "target", "functions", "params", "tvm_version",
                "tvm_ffi_version", "preset", "library", "build_seconds"):
        assert key in manifest, key
    assert manifest["dtype"] == "float32" and manifest["library"] == "sam3-llvm.so"
    # --batch 1: that batch size only (static shapes)
    assert manifest["batch"] == 1
    assert manifest["functions"]["encode_image"]["inputs"][0]["shape"] == [1, 3, 168, 168]

    lib = CompiledModel(str(out / "sam3-llvm.so"))
    cfg = Sam3Config.from_pretrained(folder)
    want = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in lib.manifest["params"]}
    params, _ = load_params(cfg, open_checkpoint(folder), want, ["vision"])
    lib.bind(params)
    torch.manual_seed(5)
    pixels = torch.randn(1, 3, 168, 168)
    with torch.no_grad():
        ref = model(pixels)
    ours = channel_first(lib("encode_image", pixels.numpy()))
    for i, (o, r) in enumerate(zip(ours, ref.fpn_hidden_states)):
        assert_close(o, r, 1e-4, 1e-5, f"fpn level {i}")
    with pytest.raises(LibraryError, match="compiled for batch 1 only"):
        lib("encode_image", np.zeros((2, 3, 168, 168), np.float32))


# ----------------------------------------------------------------------------------------
# metal: Mach-O arm64 dylib with the Metal source of every kernel
# ----------------------------------------------------------------------------------------
MH_MAGIC_64, CPU_TYPE_ARM64 = 0xFEEDFACF, 0x0100000C
_BUILT = {}


def _recording_build(name, folder, arch=None):
    """``build`` for ``name`` that also keeps the compiled executable (for the link test)."""
    orig = build_mod.compile_module

    def compile_and_keep(*args, **kw):
        ex = orig(*args, **kw)
        _BUILT[name] = ex
        return ex

    build_mod.compile_module = compile_and_keep
    try:
        return build_mod.build(tiny_cfg(), BuildOptions(target=name, arch=arch, parts=PARTS), folder)
    finally:
        build_mod.compile_module = orig


needs_ld64 = pytest.mark.skipif(tools.find_tool(tools.LD64) is None,
                                reason="ld64.lld not installed (make deps-metal: apt-get install lld-19)")


@pytest.fixture(scope="module")
def metal_build(tmp_path_factory):
    return _recording_build("metal", str(tmp_path_factory.mktemp("metal")))


@needs_ld64
def test_metal_dylib_is_macho_arm64_with_all_kernels(metal_build):
    path = metal_build["library"]
    assert path.endswith("sam3-metal.dylib")
    data = open(path, "rb").read()
    magic, cputype = struct.unpack_from("<II", data)
    assert magic == MH_MAGIC_64, hex(magic)
    assert cputype == CPU_TYPE_ARM64, hex(cputype)
    filetype = struct.unpack_from("<I", data, 12)[0]
    assert filetype == 6, f"MH_DYLIB expected, got filetype {filetype}"

    manifest = json.load(open(metal_build["manifest"]))
    assert manifest["dtype"] == "float16" and manifest["target"] == "metal"
    kernels = manifest["kernels"]
    assert len(kernels) > 10
    text = data.decode("latin-1")
    in_dylib = re.findall(r"kernel\s+void\s+(\w+)\s*\(", text)
    assert sorted(set(in_dylib)) == kernels
    assert "#include <metal_stdlib>" in text
    for bad in ("double", "complex", "float64_t", "cfloat"):
        assert not re.search(rf"\b{bad}\b", text), f"Metal source uses {bad}"
    # fast matmuls: the simdgroup schedule is in (tensorize works with the pinned tvm-ffi)
    if pipeline_mod.tensorize_works():
        assert "simdgroup_multiply_accumulate" in text
        # every GEMM / conv kernel takes the simdgroup schedule except the few GEMV-shaped
        # ones (output width 1 or 2: presence / scoring heads), which dlight gives GEMV rules
        bodies = re.split(r"(?=kernel\s+void\s)", text)[1:]
        gemms = {}
        for body in bodies:
            name = re.match(r"kernel\s+void\s+(\w+)", body).group(1)
            if "matmul" in name or "conv2d" in name:
                gemms[name] = "simdgroup_multiply_accumulate" in body
        plain = sorted(n for n, simd in gemms.items() if not simd)
        assert len(gemms) > 10 and len(plain) <= 0.15 * len(gemms), plain


@needs_ld64
def test_failed_link_leaves_nothing(metal_build, tmp_path, monkeypatch):
    assert "metal" in _BUILT
    monkeypatch.setattr(build_mod, "compile_module", lambda *a, **kw: _BUILT["metal"])
    monkeypatch.setattr(export_mod, "find_tool", lambda names: "/bin/false")
    out = tmp_path / "out"
    with pytest.raises(targets.TargetError, match="ld64.lld link failed"):
        build_mod.build(tiny_cfg(), BuildOptions(target="metal", parts=PARTS), str(out))
    assert files_in(out) == []


@needs_ld64
def test_metal_builds_the_interactive_part(tmp_path):
    """The interactive part (tracker neck, prompt encoder, SAM mask decoder) compiles and links
    for Metal: its kernels are in the dylib's Metal source."""
    from tests.refs import tiny_config

    art = build_mod.build(tiny_config(), BuildOptions(target="metal", parts=("vision", "interactive")),
                          str(tmp_path))
    manifest = json.load(open(art["manifest"]))
    assert set(manifest["functions"]) == {"encode_image", "predict_masks", "release_outputs"}
    text = open(art["library"], "rb").read().decode("latin-1")
    in_dylib = sorted(set(re.findall(r"kernel\s+void\s+(\w+)\s*\(", text)))
    assert in_dylib == manifest["kernels"] and any("attention" in k for k in in_dylib)


def test_missing_linker_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "find_tool", lambda names: None)
    out = tmp_path / "out"
    code, _, stderr = compile_cli("--target", "metal", "--output", out, "--image-size", "168",
                                  "--model", os.path.join(ROOT, "no-such-model"))
    assert code == 2 and "ld64.lld" in stderr and "lld-19" in stderr, stderr
    assert files_in(out) == []


# ----------------------------------------------------------------------------------------
# cuda: compiled kernels in the library (fatbin), no source compiled at load
# ----------------------------------------------------------------------------------------
FATBIN_MAGIC = 0xBA55ED50
needs_nvcc = pytest.mark.skipif(tools.find_tool(tools.NVCC) is None, reason="nvcc not installed")


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    return _recording_build("cuda", str(tmp_path_factory.mktemp("cuda")), arch="sm_80")


def cuda_modules(path):
    """(fmt, code) of every CUDA module serialized in a library."""
    data = open(path, "rb").read()
    key = struct.pack("<Q", 4) + b"cuda"
    found, pos = [], data.find(key)
    while pos >= 0:
        start = pos + len(key) + 8  # skip the module's byte count
        fmt, _, code = export_mod.device_module_parts(
            data[start:start + struct.unpack_from("<Q", data, pos + len(key))[0]])
        found.append((fmt, code))
        pos = data.find(key, pos + 1)
    return data, found


@needs_nvcc
def test_cuda_library_carries_fatbin_not_source(cuda_build):
    path = cuda_build["library"]
    assert path.endswith("sam3-cuda-sm80.so")
    data, mods = cuda_modules(path)
    assert len(mods) == 1
    fmt, code = mods[0]
    assert fmt == "fatbin"
    assert struct.unpack_from("<I", code)[0] == FATBIN_MAGIC
    # no CUDA source (the statically linked CUDA runtime has "__global__" in an error string)
    assert b"extern \"C\" __global__" not in data and b"#include <cuda" not in data
    manifest = json.load(open(cuda_build["manifest"]))
    assert manifest["preset"]["cuda_arches"] == ["sm_80"]
    assert manifest["kernels"]
    for k in manifest["kernels"]:  # SASS symbol names
        assert k.encode() in code, k


def test_compile_callback_override_is_restored():
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    with export_mod.cuda_compile_callback(("sm_80",), None):
        inside = tvm_ffi.get_global_func(name)
        assert before is None or not inside.same_as(before)
    after = tvm_ffi.get_global_func(name, allow_missing=True)
    assert (after is None) if before is None else after.same_as(before)


def test_cuda_arch_presets():
    p = targets.get_preset("cuda")
    assert p.cuda_arches == ("sm_80", "sm_90") and p.target["arch"] == "sm_80"
    p = targets.get_preset("cuda", "sm_90a")
    # dlight reads the arch as digits: "sm_90a" would silently turn tensor cores off
    assert p.name == "cuda-sm90a" and p.target["arch"] == "sm_90" and p.cuda_ptx is None
    with pytest.raises(targets.TargetError, match="bad CUDA arch"):
        targets.get_preset("cuda", "compute_90")
    with pytest.raises(targets.TargetError, match="cuda targets only"):
        targets.get_preset("metal", "sm_90")


@pytest.mark.gpu
def test_cuda_library_runs_without_compile_callback(cuda_build):
    """On a GPU machine: the library loads and runs with no compile callback."""
    from tests.cuda_lib import cuda_device

    if cuda_device() is None:
        pytest.skip("no CUDA GPU here")
    import tvm_ffi

    from sam3_nn.runtime.engine import CompiledModel

    saved = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def refuse(*_):
        raise AssertionError("the library asked to compile CUDA source at load")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
    try:
        lib = CompiledModel(cuda_build["library"])
        rng = np.random.default_rng(0)
        lib.bind({p["name"]: (0.02 * rng.standard_normal(p["shape"])).astype(p["dtype"])
                  for p in lib.manifest["params"]})
        outs = lib("encode_image", rng.standard_normal((1, 3, 168, 168)).astype("float16"))
        assert all(np.isfinite(o).all() for o in outs)
    finally:
        if saved is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", saved, override=True)


# ----------------------------------------------------------------------------------------
# errors: clear message, nothing written
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, message", [
    ("no-such-target", "unknown target 'no-such-target'; known targets: cuda"),
    ("vulkan", "not supported by this TVM build: this TVM build has no SPIR-V"),
    ("webgpu", "not supported by this TVM build"),
    ("rocm", "not supported by this TVM build"),
])
def test_unknown_or_unsupported_target(target, message, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = compile_cli("--target", target, "--output", out)
    assert code == 2 and message in stderr, stderr
    assert files_in(out) == []


def test_bad_model_path(tmp_path):
    out = tmp_path / "out"
    code, _, stderr = compile_cli("--target", "llvm", "--model", tmp_path / "missing", "--output", out)
    assert code not in (0, None) and "no such file or directory" in stderr, stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = compile_cli("--target", "llvm", "--model", empty, "--output", out)
    assert code == 2 and "without config.json" in stderr, stderr
    assert files_in(out) == []


def test_list_targets_and_presets_in_one_place():
    code, stdout, _ = compile_cli("--list-targets")
    assert code == 0
    for name in ("llvm", "llvm-aarch64", "llvm-macos", "metal", "metal-ios", "cuda", "opencl"):
        assert re.search(rf"^{re.escape(name)}\s", stdout, re.M), name
        p = targets.get_preset(name)
        assert p.suffix in ("so", "dylib", "tar") and p.default_dtype in ("float16", "float32")
    assert targets.get_preset("metal").default_dtype == "float16"
