"""How many threads TVM's CPU runtime uses for our llvm libraries.

TVM's thread pool takes ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else half the
hardware threads on x86 (it assumes two per core). On a machine whose CPUs are all
cores (a 2-vCPU VM without SMT, like the machine our CPU benches ran on) that is one thread:
the full-size CPU vision encoder took 84.8 s there, 44.2 s with two threads. The pool
reads the variable once, when it is first used, so :func:`configure`, which the engine
calls when it opens a CPU device (before the pool exists), sets ``TVM_NUM_THREADS`` to the
physical cores this process may run on, unless either variable is already set (the user's
choice wins). Importing ``sam3_nn`` sets nothing.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional


def physical_cores(cpus: Optional[Iterable[int]] = None,
                   sysfs: str = "/sys/devices/system/cpu") -> Optional[int]:
    """Cores (not SMT threads) among ``cpus`` (default: the CPUs this process may run on),
    read from Linux sysfs (CPUs sharing a core list the same ``thread_siblings_list``);
    None where that cannot be read."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            with open(os.path.join(sysfs, f"cpu{cpu}", "topology", "thread_siblings_list")) as f:
                cores.add(f.read().strip())
        except OSError:
            return None
    return len(cores) or None


def configure() -> None:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless ``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` is set (or the cores cannot be read: TVM's default then stays)."""
    if "TVM_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    n = physical_cores()
    if n:
        os.environ["TVM_NUM_THREADS"] = str(n)
