"""Test session setup: TVM's CPU thread pool gets one thread per physical core, as the
runtime engine gives it when it opens a CPU device (the tests also call libraries directly)."""

from sam3_nn.runtime import threads

threads.configure()
