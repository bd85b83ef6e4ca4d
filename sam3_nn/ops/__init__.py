"""Portable operators as TIR/relax: 2D axial RoPE, attention, RoIAlign. Which kernel serves
an operator on a target is the compiler pipeline's choice (sam3_nn.kernels)."""
