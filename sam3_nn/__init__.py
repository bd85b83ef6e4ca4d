"""SAM 3 (Segment Anything with Concepts) in TVM's relax.frontend.nn.

Subpackages: ``model`` (the network as ``nn.Module``s), ``ops`` (portable TIR/relax
operators), ``kernels`` (per-target kernels and the passes routing operators to them),
``compiler`` (target presets, pass pipelines, export), ``weights`` (checkpoint mappings),
``runtime`` (TVM-runtime-only engine, API, pre/post-processing) and ``cli``. Importing the
package does nothing else: no environment variable is read or written.
"""

__version__ = "0.1.0"
