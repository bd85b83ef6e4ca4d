"""Run a compiled library: load it with its manifest, bind weights, call functions.

Needs only TVM's runtime library and numpy, reached through ``tvm_ffi``
(``sam3_nn.runtime.ffi``): importing this imports neither the ``tvm`` package (its
compiler, ``tvm.relax``) nor torch, and works with a runtime-only TVM.

Threads: a ``CompiledModel`` may be shared; its calls (and binding weights) are serialised
by a lock of its own, since TVM's virtual machine keeps each call's state in itself.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Dict, List

import numpy as np

from sam3_nn.errors import UserError
from sam3_nn.files import file_sha256
from sam3_nn.interface import RELEASE
from sam3_nn.runtime import ffi, threads
from sam3_nn.runtime.ffi import DeviceError, device_kind, load_device_runtime  # noqa: F401


class LibraryError(UserError):
    """A library, its manifest or the weights given to it do not fit together."""


def read_manifest(library: str) -> Dict:
    """The manifest beside ``library`` (``X.so`` -> ``X.json``; ``X.json`` itself), checked to be one."""
    path = os.path.splitext(library)[0] + ".json"
    if not os.path.isfile(path):
        raise LibraryError(f"{library}: manifest {path} not found (written by compile.py beside the library)")
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except ValueError as e:
            raise LibraryError(f"{path}: not a valid manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "sam3_nn-library":
        raise LibraryError(f"{path}: not a sam3_nn library manifest")
    missing = [k for k in ("target", "dtype", "config", "functions", "params", "parts")
               if k not in manifest]
    if missing:
        raise LibraryError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def check_library_file(library: str, manifest: Dict) -> None:
    """The library is the one its manifest was written for (``library_sha256``, recorded by
    builds since it exists): a manifest from another build would otherwise show up as an
    error deep inside TVM, or wrong results."""
    want = manifest.get("library_sha256")
    if want and file_sha256(library) != want:
        raise LibraryError(
            f"library {library} is not the one its manifest {os.path.splitext(library)[0]}.json "
            f"describes (another build's manifest? the library's sha256 differs from the recorded "
            f"one); compile again, or put the library's own manifest beside it")


def device_for(manifest: Dict, device: str | None) -> str:
    """The device kind to run the library on: ``device`` (checked to suit the library's
    target) or the target's. Raises ``DeviceError``."""
    target_kind = device_kind(manifest["target"])
    if device is None:
        return target_kind
    kind = device_kind(device)
    if kind != target_kind:
        raise DeviceError(f"the library is compiled for {manifest['target']}, which runs on "
                          f"{target_kind}, not {device}")
    return kind


def open_device(name: str):
    """The TVM device for a target or device name (``llvm``, ``cpu``, ``cuda``, ...), its
    runtime loaded; a CPU device gets one thread per physical core first (``threads``)."""
    kind = device_kind(name)
    if kind == "cpu":
        threads.configure()  # before TVM's thread pool exists: one thread per physical core
    return ffi.open_device(kind)


class CompiledModel:
    """A compiled library on one device: ``bind`` weights, then call its functions."""

    def __init__(self, library: str, device: str | None = None):
        if not os.path.isfile(library):
            raise LibraryError(f"library {library} does not exist")
        self.library = library
        self.manifest = read_manifest(library)
        check_library_file(library, self.manifest)
        self.device = open_device(device_for(self.manifest, device))
        try:
            self.module = ffi.load_module(library)
        except Exception as e:  # noqa: BLE001 - TVM reports a bad file in several ways
            raise LibraryError(f"library {library} cannot be loaded: {ffi.first_line(e)} (is it a "
                               f"library compiled by sam3_nn for this machine?)") from None
        self.lock = threading.RLock()
        self.vm = self._new_vm()
        self._params = ffi.array([])
        self._function_params: Dict[str, object] = {}
        self._bound = False
        self._token = None  # release_outputs' argument, made on first use

    def _new_vm(self):
        try:
            vm = ffi.vm_of(self.module, self.device)
        except Exception as e:  # noqa: BLE001
            raise LibraryError(f"library {self.library} holds no sam3_nn program: "
                               f"{ffi.first_line(e)}") from None
        lacking = []
        for name, spec in self.manifest["functions"].items():
            try:
                arity = vm["get_function_arity"](name)
            except Exception:  # noqa: BLE001 - no such function
                lacking.append(name)
                continue
            # every function but release_outputs takes the packed weights last
            if arity != len(spec["inputs"]) + (name != RELEASE):
                lacking.append(f"{name} (takes {arity} arguments)")
        if lacking:
            raise LibraryError(f"library {self.library} does not match its manifest (another build's "
                               f"manifest?): {', '.join(lacking)}")
        return vm

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
        raw = ffi.array(tensors)
        transforms = self.manifest.get("param_transforms", {}) if len(raw) else {}
        # a transform's one argument is a tuple holding the weight tuple (BundleModelParams
        # packs the lifted function's tuple parameter once more)
        held = ffi.array([raw])
        with self.lock:
            try:
                self._function_params = {fn: self.vm[tf](held) for fn, tf in transforms.items()}
            except Exception as e:  # noqa: BLE001 - TVM's message names every mismatch at length
                raise LibraryError(f"library {self.library}: binding the weights failed (a manifest "
                                   f"from another build?): {ffi.first_line(e)}") from None
            self._bound = len(raw) > 0
            self._params = ffi.array([]) if self._function_params else raw

    def params_for(self, function: str):
        """The packed weights ``function`` takes: its transform's output, else the bound ones."""
        return self._function_params.get(function, self._params)

    def reset(self) -> None:
        """A fresh virtual machine over the same library and weights: what the old one
        held (its CUDA graphs and their buffers) is released with it."""
        with self.lock:
            self.vm = self._new_vm()

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
        self.params = [ffi.to_device(params[p["name"]], self.device) for p in want]

    def __call__(self, function: str, *args) -> List[np.ndarray]:
        """``call_device``, outputs copied into numpy arrays (under the lock too: no later call
        can touch them before they are copied)."""
        with self.lock:
            return [ffi.to_numpy(o) for o in self.call_device(function, *args)]

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
        """Call ``function`` with ``args`` (numpy arrays are copied to the device, ints become
        shapes); -> its outputs as device tensors. One call at a time per model (``lock``)."""
        if function not in self.manifest["functions"]:
            raise LibraryError(f"library has no function {function!r}; it has "
                               f"{', '.join(self.manifest['functions'])}")
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                conv.append(ffi.to_device(a, self.device))
            elif isinstance(a, (int, np.integer)):
                conv.append(ffi.shape(int(a)))
            else:
                conv.append(a)
        with self.lock:
            if function == RELEASE:  # takes no weights, no batch
                return [self.vm[function](*conv)]
            if not self._bound and self.manifest["params"]:
                raise LibraryError("no weights bound: call bind() first")
            self._check_batch(function, args)
            try:
                out = self.vm[function](*conv, self.params_for(function))
            except Exception as e:  # noqa: BLE001 - inputs were checked: the library does not fit
                raise LibraryError(f"library function {function} failed: {ffi.first_line(e)}") from None
            self._release()
        return [out] if ffi.is_tensor(out) else list(out)

    def _release(self) -> None:
        """Make the VM drop its reference to the outputs it just returned (see RELEASE);
        libraries built before it existed lack the function and keep them."""
        if RELEASE not in self.manifest["functions"]:
            return
        if self._token is None:
            self._token = ffi.to_device(np.zeros(1, np.int32), self.device)
        self.vm[RELEASE](self._token)
