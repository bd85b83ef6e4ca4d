"""Test session setup: TVM's CPU thread pool gets one thread per physical core, as the
runtime engine gives it when it opens a CPU device (the tests also call libraries directly).
torch is imported first, so tvm_ffi keeps its torch interop in the test process (the runtime
imports tvm_ffi without torch when torch is not loaded yet: sam3_nn/runtime/ffi.py)."""

import torch  # noqa: F401

from sam3_nn.runtime import threads

threads.configure()
