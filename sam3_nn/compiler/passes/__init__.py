"""Relax passes of the pipeline that are not kernel routing: weight-transform lifting,
the arena memory planner, the CUDA-graph rewrite."""
