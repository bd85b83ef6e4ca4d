"""TVM's runtime reached through ``tvm_ffi`` alone: the runtime never imports the ``tvm``
Python package.

``import tvm`` loads TVM's compiler library and ``tvm.relax`` (seconds, and pointless for
running a library); ``libtvm_runtime`` plus ``tvm_ffi`` is all a compiled library needs:
loading it, the relax VM, device tensors and copies are functions the runtime library
registers. The ``tvm`` package is only used to find that library (its ``lib/`` folder),
without importing it.

``tvm_ffi`` itself tries ``import torch`` when it is first imported (its ``__init__``, for
its optional PyTorch interop: DLPack fast paths, stream helpers; no environment variable
turns that off; ``TVM_FFI_DISABLE_TORCH_C_DLPACK`` only skips building a helper later).
That is most of the seconds importing the runtime took. So when neither torch nor tvm_ffi
is loaded yet, tvm_ffi is imported with ``torch`` marked unimportable for that moment
(``sys.modules["torch"] = None``), and the mark is removed at once: torch stays importable
and works as usual, only tvm_ffi's torch helpers are off in that process (torch tensors
passed to TVM functions still convert, through ``__dlpack__``). A program that wants them
imports torch before ``sam3_nn.runtime``. Nothing here reads or writes the environment.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict

import numpy as np

from sam3_nn.errors import UserError

_MASK_TORCH = "torch" not in sys.modules and "tvm_ffi" not in sys.modules
if _MASK_TORCH:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
try:
    import tvm_ffi
    from tvm_ffi import libinfo
finally:
    if _MASK_TORCH and "torch" in sys.modules and sys.modules["torch"] is None:
        del sys.modules["torch"]


class DeviceError(UserError):
    """A device name that is not one, or a device this machine does not have."""


# device names (and target kinds) -> tvm_ffi device type names
DEVICE_KINDS = {"cpu": "cpu", "llvm": "cpu", "cuda": "cuda", "metal": "metal", "rocm": "rocm",
                "opencl": "opencl", "vulkan": "vulkan", "webgpu": "webgpu"}
_DEVICE_ATTR_EXIST = 0  # TVM's DeviceAttrKind::kExist
_CUDA, _CUDA_HOST = 2, 3  # DLPack device types kDLCUDA, kDLCUDAHost
_loaded: Dict[str, ctypes.CDLL] = {}


def tvm_lib_dir() -> Path:
    """The folder holding TVM's shared libraries, found without importing ``tvm``."""
    mod = sys.modules.get("tvm")
    if mod is not None and getattr(mod, "__file__", None):
        return Path(mod.__file__).resolve().parent / "lib"
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("TVM is not installed (pip install apache-tvm)")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "lib"


def load_runtime() -> None:
    """``libtvm_runtime`` loaded (globally: compiled libraries link against its symbols)."""
    if "tvm_runtime" not in _loaded:
        _loaded["tvm_runtime"] = libinfo.load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL",
                                                         extra_lib_paths=[tvm_lib_dir()])


def device_kind(name: str) -> str:
    """A device or target name (``cpu``, ``llvm-x86_64``, ``cuda-sm90a``, ...) -> the device type."""
    kind = DEVICE_KINDS.get(str(name).split("-")[0].lower())
    if kind is None:
        raise DeviceError(f"unknown device {name!r}; expected one of "
                          f"{', '.join(k for k in DEVICE_KINDS if k != 'llvm')}")
    return kind


def load_device_runtime(kind: str) -> None:
    """TVM's runtime for ``kind`` (``cuda``) loaded: the wheel keeps the CUDA module loader in
    ``lib/libtvm_runtime_cuda.so``, which nothing loads by itself, and a CUDA library then
    fails to load. Raises ``DeviceError`` where it cannot load (no NVIDIA driver)."""
    load_runtime()
    if kind != "cuda" or "cuda" in _loaded:
        return
    lib = tvm_lib_dir() / "libtvm_runtime_cuda.so"
    if lib.exists():
        try:
            _loaded["cuda"] = ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise DeviceError(f"TVM's CUDA runtime cannot be loaded ({e}); is the NVIDIA driver "
                              "installed?") from None


def device_exists(dev) -> bool:
    try:
        return bool(tvm_ffi.get_global_func("runtime.GetDeviceAttr")(
            dev.dlpack_device_type(), dev.index, _DEVICE_ATTR_EXIST))
    except Exception:  # noqa: BLE001 - no runtime for this device type in this TVM
        return False


def open_device(name: str, index: int = 0):
    """The device ``name`` (``cpu``, ``cuda``...) number ``index``, its runtime loaded; raises
    ``DeviceError`` naming what is missing."""
    kind = device_kind(name)
    load_device_runtime(kind)
    dev = tvm_ffi.device(kind, index)
    if kind != "cpu" and not device_exists(dev):
        raise DeviceError(f"no {kind} device {index} on this machine (TVM's {kind} runtime finds "
                          f"{'none' if index == 0 else 'fewer'})")
    return dev


def sync(dev) -> None:
    """Wait for the work queued on ``dev``'s default stream (timing)."""
    tvm_ffi.get_global_func("runtime.Device_StreamSync")(dev, 0)


def load_module(path: str):
    load_runtime()
    return tvm_ffi.load_module(os.fspath(path))


def empty(shape, dtype: str, dev):
    return tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")(
        tvm_ffi.Shape(tuple(int(s) for s in shape)), tvm_ffi.dtype(dtype), dev, None)


def to_device(array: np.ndarray, dev):
    """A numpy array copied into a new tensor on ``dev`` (TVM-allocated: aligned as kernels
    expect)."""
    a = np.ascontiguousarray(array)
    out = empty(a.shape, str(a.dtype), dev)
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")(
        out, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return out


def copy_from_numpy(tensor, array: np.ndarray) -> None:
    """``array`` (same shape and dtype, C-contiguous) copied into ``tensor``."""
    a = np.ascontiguousarray(array, dtype=str(tensor.dtype))
    if tuple(a.shape) != tuple(int(d) for d in tensor.shape):
        raise ValueError(f"copy of a {a.shape} array into a {tuple(tensor.shape)} tensor")
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")(tensor, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)


def to_numpy(tensor) -> np.ndarray:
    """A tensor (any device) copied into a new numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor
    out = np.empty(tuple(tensor.shape), dtype=np.dtype(str(tensor.dtype)))
    if out.size:
        tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")(
            tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


def rows_to_numpy(tensor, lead: int, rows) -> np.ndarray:
    """Rows ``rows`` of ``tensor`` seen as ``[-1, *shape[lead:]]``, copied into a new numpy
    array ``[len(rows), *shape[lead:]]``: only those rows cross from the device (a batch's mask
    logits are tens of MB, the few kept queries' a fraction of one)."""
    inner = tuple(int(d) for d in tensor.shape[lead:])
    dtype = np.dtype(str(tensor.dtype))
    out = np.empty((len(rows),) + inner, dtype=dtype)
    row_bytes = out[0].nbytes if len(rows) else 0
    view = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")
    copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
    for start, end, first in row_runs(rows) if row_bytes else ():
        part = view(tensor, shape(end - start, *inner), tvm_ffi.dtype(str(tensor.dtype)), first * row_bytes)
        copy(part, out[start:end].ctypes.data_as(ctypes.c_void_p), (end - start) * row_bytes)
    return out


def row_runs(rows):
    """``rows`` (indices) as runs of consecutive ones: ``(start, end, first row)`` with
    ``rows[start:end] == range(first, first + end - start)``, one copy each."""
    rows = [int(r) for r in rows]
    out, start = [], 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and rows[end] == rows[end - 1] + 1:
            end += 1
        out.append((start, end, rows[start]))
        start = end
    return out


def host_buffer(nbytes: int, dev):
    """``(tensor, numpy uint8 view)`` of ``nbytes`` of host memory that ``dev`` copies into and
    out of without the host waiting: page-locked (``cuda_host``) for CUDA, whose copies to
    pageable memory block until all queued work is done; plain CPU memory elsewhere."""
    host = tvm_ffi.device(_CUDA_HOST, 0) if dev.dlpack_device_type() == _CUDA else tvm_ffi.device("cpu", 0)
    t = empty((max(int(nbytes), 1),), "uint8", host)
    arr = np.ctypeslib.as_array((ctypes.c_uint8 * max(int(nbytes), 1)).from_address(t.data_ptr()))
    return t, arr


def view(tensor, dims, byte_offset: int, dtype=None):
    """A tensor of shape ``dims`` (``dtype``, default ``tensor``'s) over ``tensor``'s memory
    from ``byte_offset``; it keeps ``tensor`` alive."""
    return tvm_ffi.get_global_func("runtime.TVMTensorCreateView")(
        tensor, shape(*dims), tvm_ffi.dtype(str(dtype or tensor.dtype)), int(byte_offset))


def copy(src, dst) -> None:
    """``src`` into ``dst`` (same shape and dtype). Queued on the device, the host not waiting,
    between device tensors and between a device tensor and ``host_buffer`` memory; a copy to
    or from pageable host memory waits for the device."""
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")(src, dst)


def shape(*dims: int):
    return tvm_ffi.Shape(tuple(int(d) for d in dims))


def array(items) -> "tvm_ffi.Array":
    return tvm_ffi.Array(list(items))


def is_tensor(x) -> bool:
    return isinstance(x, tvm_ffi.Tensor)


def vm_of(module, dev, allocator: int = 2):
    """The relax VM of a loaded library on ``dev`` (and the CPU, which the VM also needs):
    what ``tvm.runtime.vm.VirtualMachine`` does. ``allocator`` 2: TVM's pooled allocator."""
    vm = module["vm_load_executable"]()
    args = [dev.dlpack_device_type(), dev.index, allocator]
    if dev.dlpack_device_type() != tvm_ffi.device("cpu", 0).dlpack_device_type():
        args += [tvm_ffi.device("cpu", 0).dlpack_device_type(), 0, allocator]
    vm["vm_initialization"](*args)
    return vm


def first_line(e: BaseException, limit: int = 300) -> str:
    """A TVM error's message, shortened: its first line (TVM appends long backtraces and
    signatures)."""
    s = str(e).strip().splitlines()
    line = next((x.strip() for x in s if x.strip()), type(e).__name__)
    return line if len(line) <= limit else line[:limit] + "..."

