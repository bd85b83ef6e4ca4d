"""SAM 3 (Segment Anything with Concepts) in TVM's relax.frontend.nn."""

from . import cpu_threads as _cpu_threads

__version__ = "0.1.0"

# before any TVM CPU work: one thread per physical core, not TVM's half of the hardware
# threads (sam3_nn/cpu_threads.py)
_cpu_threads.configure()
