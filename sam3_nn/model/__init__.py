"""SAM 3 as ``tvm.relax.frontend.nn`` modules: one file per part, shaped like the reference,
and the assembled model with the functions a library exports (``sam3``)."""
