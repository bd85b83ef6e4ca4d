"""Video tracking end to end: ``VideoSession`` (compiled ``track_step`` / ``encode_memory``)
against ``transformers``' ``Sam3TrackerVideoModel`` driven as its processor drives it.

Tiny config, every parameter perturbed, float32, llvm; a synthetic 10-frame video (two
squares moving over a textured background, 120 x 100 px). Both sides get the same pixels
(our preprocessing) and the same prompt coordinates (our transform: ``x / w * S``, the
processor's to a float32 ulp), so the comparison is of the tracker. Cases: one object from
clicks on frame 0 propagated forward; two objects (a box on frame 0, clicks on frame 3);
a refinement click on a later frame followed by a new propagation; clicks on frame 7
propagated backward; a mask prompt.

Per frame: the low-resolution mask logits, the object score logits and the masks at the
video's size (the reference's bilinear resize and threshold, ``post_process_masks``).
Tolerances: logits atol 1e-2 + rtol 1e-3. The first frame agrees to float32 rounding; each
tracked frame then adds ~5e-4: the memory attention's scores are large (memory values reach
~20), where float32 itself is off by ~1e-3 (the reference's float32 memory attention against
its own float64 evaluation: tests/model/test_video_tracker.py), and every frame's memory
carries the last one's difference (measured over 10 frames: <= 4.5e-3, the same with the
bfloat16 rounding of the memory turned off on both sides). Masks: at most 0.2% of the
pixels differ, and only where the reference's logit is within 0.05 of the threshold.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sam3_nn.runtime import ffi
from sam3_nn.runtime.api import Sam3
from sam3_nn.runtime.interactive import to_model_coords
from sam3_nn.runtime.preprocess import normalize, resize_uint8
from sam3_nn.runtime.video import VideoSession, round_bfloat16

H, W, T = 100, 120, 10
ATOL, RTOL = 1e-2, 1e-3


def synthetic_video(frames: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """``[T, H, W, 3]`` uint8: a fixed texture with two squares moving across it."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
    out = np.repeat(base[None], frames, 0)
    for t in range(frames):
        x, y = 10 + 4 * t, 20 + 2 * t
        out[t, y:y + 30, x:x + 25] = (220, 60, 40)
        out[t, 60 - t:85 - t, 80 - 3 * t:100 - 3 * t] = (40, 200, 90)
    return out


def pixels(video: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([normalize(resize_uint8(f, size)) for f in video]))


class Reference:
    """``Sam3TrackerVideoModel`` with an inference session, prompts added as
    ``Sam3TrackerVideoProcessor.add_inputs_to_inference_session`` adds them."""

    def __init__(self, hf, video: np.ndarray, size: int):
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import \
            Sam3TrackerVideoInferenceSession

        self.hf, self.size = hf, size
        self.session = Sam3TrackerVideoInferenceSession(
            video=pixels(video, size), video_height=video.shape[1], video_width=video.shape[2],
            inference_device="cpu", video_storage_device="cpu", inference_state_device="cpu",
            dtype=torch.float32)

    def add(self, frame, obj_id, points=(), labels=(), box=None):
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        lab = np.asarray(labels, np.int32).reshape(-1)
        if box is not None:
            pts = np.concatenate([np.asarray(box, np.float32).reshape(2, 2), pts])
            lab = np.concatenate([np.array([2, 3], np.int32), lab])
        coords = to_model_coords(pts, (H, W), self.size)
        idx = self.session.obj_id_to_idx(obj_id)
        self.session.add_point_inputs(idx, frame, {"point_coords": torch.from_numpy(coords)[None, None],
                                                   "point_labels": torch.from_numpy(lab)[None, None]})
        self.session.remove_mask_inputs(idx, frame)
        self.session.obj_with_new_inputs = [obj_id]
        with torch.no_grad():
            return self.hf(self.session, frame_idx=frame)

    def add_mask(self, frame, obj_id, mask):
        idx = self.session.obj_id_to_idx(obj_id)
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        m = torch.nn.functional.interpolate(m, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False, antialias=True)
        self.session.add_mask_inputs(idx, frame, (m >= 0.5).float())
        self.session.remove_point_inputs(idx, frame)
        self.session.obj_with_new_inputs = [obj_id]
        with torch.no_grad():
            return self.hf(self.session, frame_idx=frame)

    def propagate(self, **kw):
        with torch.no_grad():
            return list(self.hf.propagate_in_video_iterator(self.session, **kw))


def check_frame(ours, ref, what: str):
    assert ours.object_ids == list(ref.object_ids), what
    low = ref.pred_masks[:, 0].float().numpy()
    np.testing.assert_allclose(ours.low_res_logits, low, rtol=RTOL, atol=ATOL, err_msg=f"{what}: mask logits")
    np.testing.assert_allclose(ours.object_scores, ref.object_score_logits.float().numpy().reshape(-1),
                               rtol=RTOL, atol=ATOL, err_msg=f"{what}: object scores")
    big = torch.nn.functional.interpolate(ref.pred_masks.float(), size=(H, W), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    differ = ours.masks != (big > 0)
    assert differ.mean() <= 0.002, f"{what}: {differ.mean():.4f} of the mask pixels differ"
    assert (np.abs(big[differ]) < 0.05).all(), f"{what}: masks differ away from the threshold"
    return float(np.abs(ours.low_res_logits - low).max())


@pytest.fixture(scope="module")
def video_env(tiny_video):
    model = Sam3(tiny_video["lib"])
    return model, tiny_video["hf"], synthetic_video()


def test_one_object_from_clicks(video_env):
    model, hf, video = video_env
    ref = Reference(hf, video, model.image_size)
    ours = VideoSession(model, video)
    worst = check_frame(ours.add_points(0, 1, [(20, 30), (60, 80)], [1, 0]),
                        ref.add(0, 1, [(20, 30), (60, 80)], [1, 0]), "frame 0")
    for a, b in zip(ours.propagate(), ref.propagate()):
        assert a.frame_index == b.frame_idx
        worst = max(worst, check_frame(a, b, f"frame {a.frame_index}"))
    assert a.frame_index == T - 1
    print(f"one object: max |logit diff| {worst:.2e}")


def test_two_objects_box_and_clicks(video_env):
    model, hf, video = video_env
    ref = Reference(hf, video, model.image_size)
    ours = VideoSession(model, video)
    check_frame(ours.add_box(0, 1, (8, 18, 38, 52)), ref.add(0, 1, box=(8, 18, 38, 52)), "box frame 0")
    check_frame(ours.add_points(3, 7, [(80, 65)], [1]), ref.add(3, 7, [(80, 65)], [1]), "clicks frame 3")
    worst = 0.0
    for a, b in zip(ours.propagate(), ref.propagate()):
        worst = max(worst, check_frame(a, b, f"frame {a.frame_index}"))
    assert a.frame_index == T - 1 and len(a.object_ids) == 2
    print(f"two objects: max |logit diff| {worst:.2e}")


def test_refinement_click_then_propagate(video_env):
    model, hf, video = video_env
    ref = Reference(hf, video, model.image_size)
    ours = VideoSession(model, video)
    ours.add_points(0, 1, [(20, 30)], [1])
    ref.add(0, 1, [(20, 30)], [1])
    for a, b in zip(ours.propagate(), ref.propagate()):
        check_frame(a, b, f"first pass frame {a.frame_index}")
    # a correction on a tracked frame: memory-conditioned decode with the clicks
    check_frame(ours.add_points(5, 1, [(42, 35), (70, 20)], [1, 0]),
                ref.add(5, 1, [(42, 35), (70, 20)], [1, 0]), "refined frame 5")
    worst = 0.0
    for a, b in zip(ours.propagate(start=5), ref.propagate(start_frame_idx=5)):
        worst = max(worst, check_frame(a, b, f"second pass frame {a.frame_index}"))
    print(f"refinement: max |logit diff| {worst:.2e}")


def test_backward_propagation(video_env):
    model, hf, video = video_env
    ref = Reference(hf, video, model.image_size)
    ours = VideoSession(model, video)
    check_frame(ours.add_points(7, 2, [(62, 38)], [1]), ref.add(7, 2, [(62, 38)], [1]), "frame 7")
    frames = []
    for a, b in zip(ours.propagate(reverse=True), ref.propagate(reverse=True)):
        check_frame(a, b, f"backward frame {a.frame_index}")
        frames.append(a.frame_index)
    assert frames == list(range(7, -1, -1))


def test_mask_prompt(video_env):
    model, hf, video = video_env
    ref = Reference(hf, video, model.image_size)
    ours = VideoSession(model, video)
    mask = np.zeros((H, W), bool)
    mask[22:50, 14:37] = True
    check_frame(ours.add_mask(1, 4, mask), ref.add_mask(1, 4, mask), "mask frame 1")
    for a, b in zip(ours.propagate(), ref.propagate()):
        check_frame(a, b, f"frame {a.frame_index}")


def test_memory_kept_on_device_is_rounded_as_on_the_host(video_env):
    """The library rounds each frame's memory to bfloat16 itself (its manifest says so) and
    the session keeps it on the device: the kept memories hold bfloat16 values, and a session
    rounding them on the host gives the same frames, bit for bit (which also needs two
    sessions over one array to give the same frames: the object pointers' temporal encoding
    once depended on whether the read-ahead thread had found the array's end)."""
    model, _, video = video_env
    frames, kept = [], []
    for on_device in (True, False):
        ours = VideoSession(model, video)
        assert ours.memory_on_device, "the library's manifest should mark its memory as bfloat16"
        ours.memory_on_device = on_device
        ours.add_box(0, 1, (8, 18, 38, 52))
        ours.add_points(2, 7, [(80, 65)], [1])
        frames.append([(f.low_res_logits.copy(), f.object_scores.copy()) for f in ours.propagate()])
        kept.append([ffi.to_numpy(out.memory) for obj in ours._objects.values()
                     for out in list(obj.cond.values()) + list(obj.non_cond.values())])
    assert len(frames[0]) == T and len(kept[0]) == len(kept[1]) > 2
    for memories in kept:
        for m in memories:
            assert np.abs(m).max() > 0
            np.testing.assert_array_equal(m, round_bfloat16(m))
    for (a, sa), (b, sb) in zip(*frames):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10
    x[:4] = [1.00390625, 1.01171875, -2.5, 0.0]  # ties to even both ways
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_bfloat16(x), want)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_memory_stays_flat_over_1000_frames(video_env):
    """1,000 streamed frames (an iterator: nothing but the current frame is held) with two
    objects: the resident set after frame 1,000 is within 16 MiB of the one after frame 100
    (the memory bank keeps the conditioning frames and the last 15 tracked ones only)."""
    model, _, _ = video_env
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)

    def frames():
        for t in range(1000):
            f = base.copy()
            x = 5 + (t % 40)
            f[10:30, x:x + 15] = (230, 40, 40)
            yield f

    session = VideoSession(model, frames())
    session.add_points(0, 1, [(12, 20)], [1])
    session.add_box(0, 2, (30, 5, 60, 40))
    peak = {}
    for res in session.propagate():
        i = res.frame_index + 1
        if i in (100, 1000):
            peak[i] = _rss_mib()
    assert set(peak) == {100, 1000}
    print(f"RSS after 100 frames {peak[100]:.1f} MiB, after 1000 {peak[1000]:.1f} MiB")
    assert peak[1000] - peak[100] < 16.0, peak
    assert all(len(o.non_cond) <= session.window + 1 for o in session._objects.values())


def test_session_bad_input_and_lifecycle(video_env):
    from sam3_nn.errors import InputError

    model, _, video = video_env
    ours = VideoSession(model, video)
    with pytest.raises(InputError, match="no objects to follow"):
        next(ours.propagate())
    with pytest.raises(InputError, match="outside the video"):
        ours.add_points(T, 1, [(5, 5)])
    with pytest.raises(InputError, match="lies outside"):
        ours.add_points(0, 1, [(500, 5)])
    with pytest.raises(InputError, match="at most 8"):
        ours.add_points(0, 1, [(5, 5)] * 9)
    with pytest.raises(InputError, match="object ids are integers"):
        ours.add_points(0, "car", [(5, 5)])
    assert ours.object_ids == []  # nothing half-added
    ours.add_points(0, 1, [(20, 30)])
    ours.add_box(2, 5, (60, 30, 110, 90))
    assert [r.object_ids for r in ours.propagate(max_frames=2)] == [[1, 5]] * 3
    ours.remove_object(5)
    assert next(ours.propagate()).object_ids == [1]
    with pytest.raises(InputError, match="no object 5"):
        ours.remove_object(5)
    ours.reset()
    with pytest.raises(InputError, match="no objects to follow"):
        next(ours.propagate())
    # an iterator cannot go back
    it = VideoSession(model, iter(list(video)))
    it.add_points(3, 1, [(20, 30)])
    with pytest.raises(InputError, match="cannot go back"):
        it.add_points(0, 1, [(20, 30)])


def test_bfloat16_rounding_of_float16_memory_is_exact():
    """The float16 shortcut of the memory's bfloat16 rounding equals the float32 way on every
    one of the 65,536 float16 bit patterns (NaNs stay NaNs)."""
    from sam3_nn.runtime.video import round_bfloat16, round_bfloat16_as

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    fast = round_bfloat16_as(every, "float16")
    with np.errstate(over="ignore"):
        slow = round_bfloat16(every.astype(np.float32)).astype(np.float16)
    same = (fast.view(np.uint16) == slow.view(np.uint16)) | (np.isnan(fast) & np.isnan(slow))
    assert same.all(), f"{int((~same).sum())} patterns differ"
    assert (fast.view(np.uint16) != every.view(np.uint16)).sum() > 10000  # rounding did happen
