"""Names shared by the model that exports a library's functions and the runtime that calls
them (the runtime cannot import the model: it needs the TVM compiler)."""

# Exported by every library: returns its argument. TVM's VM keeps the value its last call
# returned until its next call; calling this after each call makes it let go of those
# outputs, so they are freed (returned to TVM's pool) as soon as the caller drops them.
RELEASE = "release_outputs"


def builds_detector_neck(parts) -> bool:
    """Whether a model of these parts has the detector's FPN neck: unless its only prompt
    path is the interactive one (``vision`` + ``interactive``: the tracker's neck alone).
    The model builds it, the weight mapping loads it, by this one rule."""
    return "detector" in parts or "interactive" not in parts
