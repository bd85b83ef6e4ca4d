"""Helpers for the CUDA kernel tests: build a library through given passes, list its
exported symbols, find a GPU."""

import subprocess

import pytest
import tvm
from tvm import relax


def build_library(mod, passes, target, path):
    """Compile ``mod`` for ``target`` with ``passes`` before TVM's default pipeline and
    export it to ``path`` (the CUDA runtime linked statically); returns ``path``."""
    from sam3_nn.kernels.cuda import source as cuda_source

    seq = tvm.transform.Sequential(list(passes) + [relax.get_default_pipeline(target)])
    ex = tvm.compile(mod, target=target, relax_pipeline=seq)
    ex.export_library(str(path), fcompile=cuda_source.fcompile_with_cudart())
    return str(path)


def build_routed(kernel, mod, path, target=None):
    """``mod`` built for ``target`` (default cuda sm_90a) with ``kernel``'s rewrite and attach
    passes (``kernel``: a module such as ``sam3_nn.kernels.cuda.layer_norm``); skips the test
    where nvcc is missing."""
    from sam3_nn.kernels.cuda import source as cuda_source

    if not cuda_source.nvcc_available():
        pytest.skip("nvcc not found")
    target = tvm.target.Target(target or {"kind": "cuda", "arch": "sm_90a"})
    return build_library(mod, [kernel.rewrite_pass(), kernel.attach_pass(target)], target, path)


def exported_symbols(path) -> str:
    """``nm -D`` of a shared library."""
    return subprocess.run(["nm", "-D", str(path)], capture_output=True, text=True).stdout


def cuda_device():
    """``tvm.cuda(0)`` when this TVM has a CUDA runtime (loaded here) and a GPU is present,
    else None."""
    from sam3_nn.runtime.engine import load_device_runtime

    try:
        load_device_runtime("cuda")
        dev = tvm.cuda(0)
        return dev if dev.exist else None
    except Exception:  # noqa: BLE001 - no CUDA runtime in this TVM
        return None
