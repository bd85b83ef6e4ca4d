"""Copies between the host and the device that the host does not wait for.

TVM's copies to and from numpy memory wait for all the work queued on the device (they end
with a stream synchronisation), so a program that reads one call's outputs while later calls
are queued waits for those too, and the device idles while the host then works. ``HostRing``
keeps host buffers that the device copies into and out of on its own (page-locked memory on
CUDA), and flags: a queued copy of a device 1 into a host word, which is up once every copy
queued before it is done. Buffers belong to ring slots; a slot's buffers are reused only after
its flags were seen up. On the CPU every copy is done when it is queued.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np

from sam3_nn.runtime import ffi

POLL_SECONDS = 5e-5  # between looks at a flag: the device's work takes milliseconds


class HostRing:
    def __init__(self, dev, slots: int, flags: int = 2):
        self.dev, self.slots = dev, slots
        self._flags_t, raw = ffi.host_buffer(slots * flags * 4, dev)
        self.flags = raw.view(np.int32).reshape(slots, flags)
        self.flags[...] = 1
        self._one = ffi.to_device(np.ones(1, np.int32), dev)
        self._flag_views = [[ffi.view(self._flags_t, (1,), (k * flags + j) * 4, "int32") for j in range(flags)]
                            for k in range(slots)]
        self._buffers: Dict[Tuple, Tuple[object, np.ndarray]] = {}

    def buffer(self, key, nbytes: int) -> Tuple[object, np.ndarray]:
        """``(tensor, uint8 view)``: a host buffer of at least ``nbytes`` for ``key`` (grown,
        never shrunk)."""
        have = self._buffers.get(key)
        if have is None or have[1].nbytes < nbytes:
            have = self._buffers[key] = ffi.host_buffer(max(nbytes, 2 * have[1].nbytes if have else 0), self.dev)
        return have

    def download(self, tensor, key) -> np.ndarray:
        """Queue ``tensor``'s copy into ``key``'s buffer -> its numpy view (valid once a flag
        signalled after this is up)."""
        shape, dtype = tuple(int(d) for d in tensor.shape), np.dtype(str(tensor.dtype))
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buf, host = self.buffer(key, nbytes)
        ffi.copy(tensor, ffi.view(buf, shape, 0, dtype))
        return host[:nbytes].view(dtype).reshape(shape)

    def upload(self, array: np.ndarray, tensor, key) -> None:
        """``array`` into ``key``'s buffer, then its copy into ``tensor`` queued (same shape and
        dtype)."""
        a = np.asarray(array)
        buf, host = self.buffer(key, a.nbytes)
        host[:a.nbytes].view(a.dtype).reshape(a.shape)[...] = a
        ffi.copy(ffi.view(buf, tuple(int(d) for d in tensor.shape), 0, str(tensor.dtype)), tensor)

    def signal(self, slot: int, which: int = 0) -> None:
        """Queue flag ``which`` of ``slot`` (down now, up when the work queued so far is done)."""
        self.flags[slot, which] = 0
        ffi.copy(self._one, self._flag_views[slot][which])

    def wait(self, slot: int, which: int = 0) -> None:
        while self.flags[slot, which] != 1:
            time.sleep(POLL_SECONDS)
