"""llvm pipeline: fast-math (polynomial softmax / GELU) and the parallel, vectorized
schedules of the remaining operators, checked against PyTorch (float64) on values that
include masked (-1e9) scores and large activations."""

import numpy as np
import torch
import tvm
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sam3_nn.compiler.build import compile_module, resolve
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.compiler.pipeline import build_pipeline


class Block(nn.Module):
    def __init__(self):
        self.norm = nn.LayerNorm(96)

    def forward(self, scores, x, rows):
        return (op.softmax(scores, axis=-1), op.gelu(self.norm(x)), op.permute_dims(x, [1, 0]),
                op.softmax(rows, axis=-1))


def _compile():
    mod, _ = Block().export_tvm(spec={"forward": {"scores": nn.spec.Tensor((3, 50, 77), "float32"),
                                                  "x": nn.spec.Tensor((130, 96), "float32"),
                                                  "rows": nn.spec.Tensor(("b", 7, 96), "float32")}})
    preset, options = resolve(BuildOptions())
    lowered = build_pipeline(preset, options)(mod)
    return mod, lowered, compile_module(preset, options, mod)


def test_softmax_gelu_layernorm_match_torch_and_run_in_parallel():
    mod, lowered, ex = _compile()
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((3, 50, 77)) * 20).astype(np.float32)
    scores[:, :, 60:] = -1e9  # masked keys
    scores[1, 7, :] = -1e9  # a fully masked row: uniform, like torch
    x = (rng.standard_normal((130, 96)) * 4).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(96)).astype(np.float32)
    b = (0.1 * rng.standard_normal(96)).astype(np.float32)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    rows = (rng.standard_normal((3, 7, 96)) * 20).astype(np.float32)
    rows[:, :, 50:] = -1e9
    rows[2, 3, :] = -1e9
    out = vm["forward"](*(tvm.runtime.tensor(a) for a in (scores, x, rows, w, b)))
    sm, g, t, sr = (o.numpy() for o in out)
    np.testing.assert_allclose(sr, torch.softmax(torch.from_numpy(rows).double(), -1).numpy(), rtol=1e-5, atol=1e-7)
    ref_sm = torch.softmax(torch.from_numpy(scores).double(), -1).numpy()
    xn = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (96,), torch.from_numpy(w).double(),
                                        torch.from_numpy(b).double(), eps=1e-5)
    ref_g = torch.nn.functional.gelu(xn).numpy()
    np.testing.assert_allclose(sm, ref_sm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t, x.T)
    text = lowered.script()
    assert "fast_exp" in text or "T_fast_exp" in text  # softmax went to the polynomial exp
    assert "def sam3_softmax_rows_96(" in text  # rows of 96 (a multiple of 16): vectorized rows
    assert "erf(" not in text  # GELU's erf is the polynomial one, no libm call
    assert text.count("T.parallel") >= 3  # softmax, layer norm + gelu, transpose


def test_group_norm_matches_torch():
    """The pixel decoder's GroupNorm at full size (288x288x256, 8 groups: 2.6M values per
    group). The schedule must not put the statistics under the output's parallel loop,
    and the sums must stay accurate (a one-pass float32 E[x^2]-E[x]^2 was 8e-3 off)."""
    from sam3_nn.model.heads import GroupNormNHWC

    shape = (1, 288, 288, 256)
    mod, _ = GroupNormNHWC(8, 256).export_tvm(spec={"forward": {"x": nn.spec.Tensor(shape, "float32")}})
    ex = compile_module(*resolve(BuildOptions()), mod)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
    b = (0.1 * rng.standard_normal(256)).astype(np.float32)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    ours = vm["forward"](*(tvm.runtime.tensor(a) for a in (x, w, b))).numpy()
    xt = torch.from_numpy(x).double().permute(0, 3, 1, 2)
    ref = torch.nn.functional.group_norm(xt, 8, torch.from_numpy(w).double(), torch.from_numpy(b).double(), 1e-5)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
