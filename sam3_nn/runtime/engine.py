"""Run a compiled library: load it with its manifest, bind weights, call functions.

Needs only the TVM runtime and numpy (works with a runtime-only TVM).
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Dict, List

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime.vm import VirtualMachine

from sam3_nn.interface import RELEASE
from sam3_nn.runtime import threads



class LibraryError(ValueError):
    """A library, its manifest or the weights given to it do not fit together."""


def read_manifest(library: str) -> Dict:
    path = os.path.splitext(library)[0] + ".json"
    if not os.path.isfile(path):
        raise LibraryError(f"{library}: manifest {path} not found (written by compile.py beside the library)")
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except ValueError as e:
            raise LibraryError(f"{path}: not a valid manifest: {e}") from e
    if manifest.get("format") != "sam3_nn-library":
        raise LibraryError(f"{path}: not a sam3_nn library manifest")
    return manifest


def load_device_runtime(kind: str) -> None:
    """Make TVM's runtime for ``kind`` ("cuda") available. The wheel keeps the CUDA module
    loader in ``tvm/lib/libtvm_runtime_cuda.so``; a runtime-only TVM (no compiler library)
    does not load it by itself, and a CUDA library then fails to load."""
    if kind != "cuda":
        return
    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(lib):
        ctypes.CDLL(lib, ctypes.RTLD_GLOBAL)


def open_device(name: str):
    """The TVM device for a target or device name (``llvm``, ``cpu``, ``cuda``, ...), its
    runtime loaded; a CPU device gets one thread per physical core first (``threads``)."""
    kind = {"llvm": "cpu", "cpu": "cpu", "metal": "metal", "cuda": "cuda", "rocm": "rocm",
            "opencl": "opencl", "vulkan": "vulkan", "webgpu": "webgpu"}.get(name.split("-")[0], name)
    load_device_runtime(kind)
    if kind == "cpu":
        threads.configure()  # before TVM's thread pool exists: one thread per physical core
    return tvm.device(kind, 0)


class CompiledModel:
    def __init__(self, library: str, device: str | None = None):
        if not os.path.isfile(library):
            raise LibraryError(f"library {library} does not exist")
        self.manifest = read_manifest(library)
        self.device = open_device(device or self.manifest["target"])
        self.module = tvm.runtime.load_module(library)
        self.vm = VirtualMachine(self.module, self.device)
        self._params = tvm_ffi.Array([])
        self._function_params: Dict[str, object] = {}
        self._bound = False
        self._token = None  # release_outputs' argument, made on first use

    @property
    def params(self):
        """The bound weights, in the manifest's order: one FFI array, built once, which every
        call passes as the packed parameters (a Python list would be converted per call);
        empty once the library's weight transforms have run (see the setter)."""
        return self._params

    @params.setter
    def params(self, tensors) -> None:
        """Bind the weights (device tensors in the manifest's order) and run the library's
        weight transforms once (``param_transforms``: the work on weights alone, lifted out
        of each function by ``sam3_nn.compiler.passes.param_transform``): each function is then called with
        its own transformed tuple, and the bound weights no transform passes through are freed
        (a library without transforms passes the bound weights to every function)."""
        raw = tensors if isinstance(tensors, tvm_ffi.Array) else tvm_ffi.Array(list(tensors))
        transforms = self.manifest.get("param_transforms", {}) if len(raw) else {}
        # a transform's one argument is a tuple holding the weight tuple (BundleModelParams
        # packs the lifted function's tuple parameter once more)
        held = tvm_ffi.Array([raw])
        self._function_params = {fn: self.vm[tf](held) for fn, tf in transforms.items()}
        self._bound = len(raw) > 0
        self._params = tvm_ffi.Array([]) if self._function_params else raw

    def params_for(self, function: str):
        """The packed weights ``function`` takes: its transform's output, else the bound ones."""
        return self._function_params.get(function, self._params)

    def reset(self) -> None:
        """A fresh virtual machine over the same library and weights: what the old one
        held (its CUDA graphs and their buffers) is released with it."""
        self.vm = VirtualMachine(self.module, self.device)

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def bind(self, params: Dict[str, np.ndarray]) -> None:
        """Bind weights by name; checks names, shapes and dtypes against the manifest."""
        want = self.manifest["params"]
        names = {p["name"] for p in want}
        missing = [p["name"] for p in want if p["name"] not in params]
        extra = sorted(set(params) - names)
        bad = [f"{p['name']}: expected {p['shape']} {p['dtype']}, got "
               f"{list(params[p['name']].shape)} {params[p['name']].dtype}"
               for p in want if p["name"] in params
               and (list(params[p["name"]].shape) != p["shape"] or str(params[p["name"]].dtype) != p["dtype"])]
        if missing or extra or bad:
            msg = ["weights do not fit this library:"]
            if missing:
                msg.append(f"missing {len(missing)}: {', '.join(missing[:8])}")
            if extra:
                msg.append(f"extra {len(extra)}: {', '.join(extra[:8])}")
            if bad:
                msg.append("wrong shape/dtype: " + "; ".join(bad[:8]))
            raise LibraryError("\n  ".join(msg))
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(params[p["name"]]), self.device)
                       for p in want]

    def __call__(self, function: str, *args) -> List[np.ndarray]:
        return [o.numpy() for o in self.call_device(function, *args)]

    def _check_batch(self, function: str, args) -> None:
        """A library compiled for one batch size (``compile.py --batch N``) takes exactly
        that many: say so, rather than TVM's shape-match error from inside the call."""
        batch = self.manifest.get("batch")
        if batch is None:
            return
        for spec, a in zip(self.manifest["functions"][function]["inputs"], args):
            shape = getattr(a, "shape", None)
            if spec["shape"] and shape is not None and len(shape) and int(shape[0]) != batch:
                raise LibraryError(
                    f"{function}: input {spec['name']} has batch {int(shape[0])}, but this library "
                    f"was compiled for batch {batch} only (compile.py --batch {int(shape[0])}, or "
                    f"--batch any for every size)")

    def call_device(self, function: str, *args) -> List:
        if function not in self.manifest["functions"]:
            raise LibraryError(f"library has no function {function!r}; it has "
                               f"{', '.join(self.manifest['functions'])}")
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                conv.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.device))
            elif isinstance(a, (int, np.integer)):
                conv.append(tvm.runtime.ShapeTuple([int(a)]))
            else:
                conv.append(a)
        if function == RELEASE:  # takes no weights, no batch
            return [self.vm[function](*conv)]
        if not self._bound and self.manifest["params"]:
            raise LibraryError("no weights bound: call bind() first")
        self._check_batch(function, args)
        out = self.vm[function](*conv, self.params_for(function))
        self._release()
        return list(out) if not hasattr(out, "numpy") else [out]

    def _release(self) -> None:
        """Make the VM drop its reference to the outputs it just returned (see RELEASE);
        libraries built before it existed lack the function and keep them."""
        if RELEASE not in self.manifest["functions"]:
            return
        if self._token is None:
            self._token = tvm.runtime.tensor(np.zeros(1, np.int32), self.device)
        self.vm[RELEASE](self._token)
