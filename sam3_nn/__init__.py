"""SAM 3 (Segment Anything with Concepts) in TVM's relax.frontend.nn."""

__version__ = "0.1.0"
