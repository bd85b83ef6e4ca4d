"""The NORMAL RoPE kernel on its own, against the complex-number formula of SAM 3."""

import numpy as np
import pytest
import torch
import tvm
from tvm.relax.frontend import nn

from sam3_nn.ops.rope import AxialRope, fused_qkv_rope


def complex_rope_reference(x: torch.Tensor, rope: AxialRope) -> torch.Tensor:
    """SAM 3's original formulation: freqs_cis = polar(1, pos * freq), x viewed as complex.

    x: [B, N, H, D] real -> rotated, same shape.
    """
    d = rope.head_dim
    freqs = 1.0 / (rope.theta ** (torch.arange(0, d, 4)[: d // 4].float() / d))
    t = torch.arange(rope.seq_len, dtype=torch.float32)
    t_x = (t % rope.grid_w) * rope.scale
    t_y = torch.div(t, rope.grid_w, rounding_mode="floor") * rope.scale
    fx = torch.outer(t_x, freqs)
    fy = torch.outer(t_y, freqs)
    freqs_cis = torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], -1)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = xc * freqs_cis[None, :, None, :]
    return torch.view_as_real(out).flatten(-2)


class _Rope(nn.Module):
    def __init__(self, heads, rope):
        self.heads, self.rope = heads, rope

    def forward(self, qkv):
        return fused_qkv_rope(qkv, self.heads, self.rope)


def run_kernel(qkv: np.ndarray, heads: int, rope: AxialRope):
    b, n, w = qkv.shape
    mod, _ = _Rope(heads, rope).export_tvm(
        spec={"forward": {"qkv": nn.spec.Tensor(["b", n, w], str(qkv.dtype)),
                          "$": {"param_mode": "none", "effect_mode": "none"}}})
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return [o.numpy() for o in vm["forward"](tvm.runtime.tensor(qkv))]


@pytest.mark.parametrize("grid,scale,heads,d,dtype,tol", [
    ((5, 5), 1.0, 2, 16, "float32", 1e-5),          # a window
    ((9, 9), 5.0 / 9.0, 2, 16, "float32", 1e-5),    # a global grid at scaled positions
    ((3, 7), 0.5, 1, 8, "float32", 1e-5),           # non-square grid
    ((72, 72), 24.0 / 72.0, 1, 64, "float32", 2e-5),  # the released global block
    ((24, 24), 1.0, 2, 64, "float16", 2e-3),        # released window, half precision
])
def test_rope_kernel_matches_complex_formula(grid, scale, heads, d, dtype, tol):
    rope = AxialRope(grid[0], grid[1], d, 10000.0, scale)
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, rope.seq_len, 3 * heads * d)).astype(dtype)
    q, k, v = run_kernel(qkv, heads, rope)
    t = torch.from_numpy(qkv.astype(np.float32)).reshape(2, rope.seq_len, 3, heads, d)
    for ours, ref in ((q, complex_rope_reference(t[:, :, 0], rope)),
                      (k, complex_rope_reference(t[:, :, 1], rope))):
        ref = ref.permute(0, 2, 1, 3).numpy()
        np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(v, t[:, :, 2].permute(0, 2, 1, 3).numpy().astype(dtype))


def test_rope_rotation_is_not_identity():
    """Guard: a kernel that copied q through unrotated would fail the parity above;
    make sure the test data would catch it (positions > 0 rotate)."""
    rope = AxialRope(4, 4, 8)
    qkv = np.random.default_rng(1).standard_normal((1, 16, 24)).astype("float32")
    q, _, _ = run_kernel(qkv, 1, rope)
    unrotated = qkv.reshape(1, 16, 3, 1, 8)[:, :, 0].transpose(0, 2, 1, 3)
    assert np.abs(q - unrotated).max() > 0.1
    np.testing.assert_allclose(q[:, :, 0], unrotated[:, :, 0], rtol=1e-6)  # token 0: angle 0


def test_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head_dim % 4"):
        AxialRope(4, 4, 6)
