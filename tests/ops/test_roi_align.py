"""RoIAlign: the pure-torch reference against hand-derived values, then our TIR
kernel (sam3_nn.ops.roi_align) against that reference.

Hand-derived cases use maps where the answer is analytic:
* bilinear interpolation reproduces a linear map ``f(y, x) = a y + b x + c``
  exactly inside ``[0, H-1] x [0, W-1]``, and the mean of a regular sample grid of
  a bin is then ``f`` at the bin centre, whatever the number of samples;
* a one-pixel delta at ``(y0, x0)`` weighs a sample by ``hat(y - y0) hat(x - x0)``
  with ``hat(t) = max(0, 1 - |t|)``: this separates the sample counts
  (adaptive vs fixed ``sampling_ratio``);
* a constant map shows the out-of-range rule (samples beyond -1 count as 0).
"""

import numpy as np
import pytest
import torch

from tests.torch_roi_align import roi_align as ref_roi_align

import tvm
from tvm import relax
from tvm.relax.frontend import nn
from sam3_nn.ops.roi_align import roi_align


def linear_map(h, w, a=0.7, b=-0.3, c=0.2):
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    return a * y + b * x + c


def run_ref(feat_hw, box, size, **kw):
    """One-channel map, one box -> ``[R_h, R_w]``."""
    return ref_roi_align(feat_hw[None, None], [torch.tensor([box], dtype=torch.float32)], size, **kw)[0, 0]


# ---------------------------------------------------------------- reference, by hand
def test_ref_linear_map_is_bin_centres():
    f = linear_map(9, 11)
    x1, y1, x2, y2 = 1.25, 0.5, 8.75, 7.5
    for ratio in (-1, 1, 3):
        out = run_ref(f, [x1, y1, x2, y2], (3, 4), sampling_ratio=ratio)
        bh, bw = (y2 - y1) / 3, (x2 - x1) / 4
        for ph in range(3):
            for pw in range(4):
                yc, xc = y1 + (ph + 0.5) * bh, x1 + (pw + 0.5) * bw
                assert out[ph, pw].item() == pytest.approx(0.7 * yc - 0.3 * xc + 0.2, abs=1e-5)


def test_ref_delta_counts_samples():
    d = torch.zeros(10, 10)
    d[3, 3] = 1.0
    box = [0.0, 0.0, 8.0, 8.0]
    # adaptive: ceil(8 / 1) = 8 samples per axis at 0.5, 1.5, ..., 7.5; hat weights of
    # the delta at 3 sum to 1 per axis -> 1 / 64
    assert run_ref(d, box, 1).item() == pytest.approx(1 / 64)
    # one sample at (4, 4): hat(1) = 0
    assert run_ref(d, box, 1, sampling_ratio=1).item() == 0.0
    d2 = torch.zeros(10, 10)
    d2[2, 2] = 1.0
    # 2x2 samples at 2 and 6 per axis: one hits the delta exactly -> 1 / 4
    assert run_ref(d2, box, 1, sampling_ratio=2).item() == pytest.approx(0.25)


def test_ref_out_of_range_samples():
    ones = torch.ones(4, 4)
    # x samples (ratio 2, 1x2 bins of width 4) at -3, -1 | 1, 3; -3 < -1 is out, -1 is in
    out = run_ref(ones, [-4.0, 0.0, 4.0, 4.0], (1, 2), sampling_ratio=2)
    assert out.tolist() == [[0.5, 1.0]]
    # beyond the far edge: y > H is out, y in (H-1, H] is clamped to the last row
    f = linear_map(4, 4)
    assert run_ref(f, [0.0, 3.0, 1.0, 4.0], 1, sampling_ratio=1).item() == pytest.approx(0.7 * 3 - 0.3 * 0.5 + 0.2)
    assert run_ref(f, [0.0, 4.5, 1.0, 5.5], 1, sampling_ratio=1).item() == 0.0


def test_ref_aligned_scale_and_min_size():
    f = linear_map(6, 6)
    fv = lambda y, x: 0.7 * y - 0.3 * x + 0.2  # noqa: E731
    box = [0.5, 0.5, 1.5, 1.5]
    assert run_ref(f, box, 1, sampling_ratio=1).item() == pytest.approx(fv(1.0, 1.0))
    assert run_ref(f, box, 1, sampling_ratio=1, aligned=True).item() == pytest.approx(fv(0.5, 0.5))
    # spatial_scale maps image coordinates to feature pixels
    assert run_ref(f, [0.0, 0.0, 4.0, 4.0], 1, spatial_scale=0.5).item() == pytest.approx(fv(1.0, 1.0))
    # not aligned: a zero-size box becomes 1x1 -> one sample at its corner + 0.5
    assert run_ref(f, [2.0, 2.0, 2.0, 2.0], 1).item() == pytest.approx(fv(2.5, 2.5))
    # aligned: a zero-size box has zero samples -> 0
    assert run_ref(f, [2.0, 2.0, 2.0, 2.0], 1, aligned=True).item() == 0.0


def test_ref_batch_index_and_tensor_form():
    feats = torch.stack([linear_map(5, 5), linear_map(5, 5, 0.1, 0.2, 0.3)])[:, None]
    boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]])]
    out = ref_roi_align(feats, boxes, 1)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.7 - 0.3 + 0.2)
    assert out[1, 0, 0, 0].item() == pytest.approx(0.1 + 0.2 + 0.3)
    rois = torch.tensor([[1.0, 0.0, 0.0, 2.0, 2.0]])
    assert torch.equal(ref_roi_align(feats, rois, 1)[0], out[1])


# ---------------------------------------------------------------- our kernel vs reference
H, W, C = 9, 12, 5


class RoiModule(nn.Module):
    def __init__(self, size, **kw):
        self.size, self.kw = size, kw

    def forward(self, feats: nn.Tensor, boxes: nn.Tensor):
        return roi_align(feats, boxes, self.size, **self.kw)


VARIANTS = {
    "sam3": dict(size=7),  # what the geometry encoder uses: adaptive, not aligned, scale 1
    "aligned_ratio2_scale": dict(size=(2, 3), sampling_ratio=2, aligned=True, spatial_scale=0.5),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def kernel(request):
    kw = dict(VARIANTS[request.param])
    size = kw.pop("size")
    mod, _ = RoiModule(size, **kw).export_tvm(spec={"forward": {
        "feats": nn.spec.Tensor(["b", H, W, C], "float32"),
        "boxes": nn.spec.Tensor(["b", "n", 4], "float32"),
        "$": {"param_mode": "none", "effect_mode": "none"}}})
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

    def run(feats_nhwc, boxes):
        return vm["forward"](tvm.runtime.tensor(feats_nhwc), tvm.runtime.tensor(boxes)).numpy()

    return run, size, kw


def random_boxes(g, b, n, scale):
    """Boxes inside, straddling and outside the map, tiny, degenerate and inverted ones."""
    xy = torch.rand(b, n, 2, generator=g) * torch.tensor([W, H]) * 1.4 / scale - 2.0
    wh = torch.rand(b, n, 2, generator=g) * torch.tensor([W, H]) * 1.2 / scale
    boxes = torch.cat([xy, xy + wh], dim=-1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, W / scale, H / scale])  # the whole map
    boxes[0, 1] = torch.tensor([3.0, 2.0, 3.0, 2.0])  # zero size
    boxes[1, 0] = torch.tensor([5.0, 4.0, 4.0, 3.0])  # inverted
    boxes[1, 1] = torch.tensor([-30.0, -30.0, -20.0, -25.0])  # entirely outside
    boxes[1, 2] = torch.tensor([-1.5, -1.5, 5.5, 5.5])  # first samples exactly at -1 (in range)
    return boxes


def test_kernel_matches_reference(kernel):
    run, size, kw = kernel
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, C, H, W, generator=g)
    boxes = random_boxes(g, 2, 6, kw.get("spatial_scale", 1.0))
    ours = run(feats.permute(0, 2, 3, 1).contiguous().numpy(), boxes.numpy())
    ref = ref_roi_align(feats, list(boxes), size, **kw).permute(0, 2, 3, 1)
    ref = ref.reshape(2, 6, *ref.shape[1:]).numpy()
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_kernel_box_count_is_dynamic(kernel):
    run, size, kw = kernel
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, C, H, W, generator=g)
    boxes = random_boxes(g, 2, 3, kw.get("spatial_scale", 1.0))[1:]
    ours = run(feats.permute(0, 2, 3, 1).contiguous().numpy(), boxes.numpy())
    ref = ref_roi_align(feats, list(boxes), size, **kw).permute(0, 2, 3, 1)[None].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    class Bad(nn.Module):
        def forward(self, feats, boxes):
            return roi_align(feats, boxes, 7)

    with pytest.raises(ValueError, match="boxes must be"):
        Bad().export_tvm(spec={"forward": {"feats": nn.spec.Tensor([1, H, W, C], "float32"),
                                           "boxes": nn.spec.Tensor([1, 3, 5], "float32"),
                                           "$": {"param_mode": "none", "effect_mode": "none"}}})
    with pytest.raises(ValueError, match="features must be"):
        Bad().export_tvm(spec={"forward": {"feats": nn.spec.Tensor([H, W, C], "float32"),
                                           "boxes": nn.spec.Tensor([1, 3, 4], "float32"),
                                           "$": {"param_mode": "none", "effect_mode": "none"}}})
