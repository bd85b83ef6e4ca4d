"""Per-target kernels and the passes routing the model's operators to them: ``cpu``, ``cuda``,
``portable`` (the TIR attention routes any target can take), ``rewrite`` (the shared
rewrite helpers: GEMM matching, operator routing)."""
