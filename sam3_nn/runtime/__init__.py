"""The runtime side: load a compiled library, bind weights, segment images.

Needs only TVM's runtime, numpy, safetensors, Pillow and tokenizers (no torch, no TVM
compiler). ``Sam3`` is the API; ``engine`` runs a library's functions.
"""

from sam3_nn.runtime.api import ImageState, Sam3, channel_first
from sam3_nn.runtime.engine import CompiledModel, LibraryError

__all__ = ["Sam3", "ImageState", "CompiledModel", "LibraryError", "channel_first"]
