"""The runtime side: load a compiled library, bind weights, segment images.

Needs only TVM's runtime library (reached through ``tvm_ffi``: ``ffi``), numpy, safetensors,
Pillow, tokenizers and ftfy: importing it imports neither torch nor the ``tvm`` package (its
compiler, ``tvm.relax``). ``Sam3`` is the API (a model may be shared by threads: see its
docstring); ``engine`` runs a library's functions; ``io`` holds what commands share.
"""

from sam3_nn.errors import InputError, UserError
from sam3_nn.runtime.api import ImageState, PromptTruncatedWarning, Sam3, channel_first
from sam3_nn.runtime.engine import CompiledModel, LibraryError
from sam3_nn.runtime.ffi import DeviceError

__all__ = ["Sam3", "ImageState", "CompiledModel", "LibraryError", "InputError", "DeviceError",
           "UserError", "PromptTruncatedWarning", "channel_first"]
