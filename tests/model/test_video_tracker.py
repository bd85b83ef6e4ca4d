"""Video tracker parts against ``transformers``' ``Sam3TrackerVideoModel`` modules (tiny config,
every parameter perturbed, float32, llvm): the memory attention (self-attention with 2D RoPE,
cross-attention to the memory with RoPE repeated over its frames and none on the
object-pointer tokens; empty memory and pointer slots masked out, where the reference is
given the present ones only) and the memory encoder. The compiled ``track_step`` /
``encode_memory`` / ``mask_prompt`` are compared frame by frame, end to end, in
tests/runtime/test_video_runtime.py.

Tolerances (fp32): memory attention with unit-scale memory rtol 1e-4 / atol 1e-4 (measured
~3e-6); with the memory's real scale (~20) float32 is ill-conditioned there (the reference's
own float32 result is ~6e-4 from its float64 one): ours within 4x the reference's distance
to float64 (measured ~2x); memory encoder rtol 1e-4 / atol 5e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvm.relax.frontend import nn

from sam3_nn.config import Sam3Config
from sam3_nn.model.memory_attention import MemoryAttention
from sam3_nn.model.memory_encoder import MemoryEncoder
from sam3_nn.model.video_tracker import _round_bfloat16
from sam3_nn.ops.attention import key_padding_bias
from sam3_nn.runtime.video import round_bfloat16_as
from tests.refs import assert_close, compile_module, randomize_, tiny_video_hf_config

G = 12  # the tiny grid
C, MEM = 128, 64


@pytest.fixture(scope="module")
def hf_video():
    from transformers import Sam3TrackerVideoModel

    cfg = tiny_video_hf_config()
    return randomize_(Sam3TrackerVideoModel(cfg).eval(), seed=11), Sam3Config.from_hf(cfg.to_dict())


class _MemoryAttentionWithMask(nn.Module):
    def __init__(self, cfg: Sam3Config, frames: int):
        v = cfg.video
        self.frames = frames
        self.memory_attention = MemoryAttention(C, v.memory_attention_num_layers, v.memory_attention_num_heads,
                                                v.memory_attention_feed_forward_size, v.mem_dim, G, v.rope_theta)

    def forward(self, features, position, memory, memory_pos, key_mask):
        return self.memory_attention(features, position, memory, memory_pos, self.frames * G * G,
                                     key_padding_bias(key_mask))


def _weights(module: torch.nn.Module, prefix: str):
    return {prefix + k: v.detach().float().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("scale,shared", [(1.0, False), (20.0, False), (1.0, True)])
def test_memory_attention_matches_reference(hf_video, scale, shared):
    """``scale``: the memory's magnitude (the memory encoder's outputs reach ~20): at 1 our
    float32 result equals the reference's (atol 1e-4); at 20 the attention's scores are large
    enough that float32 itself is off by ~1e-3 (the reference's float32 result against its own
    float64 evaluation): ours must be as close to the float64 result as the reference's
    float32 one, within a factor 4. ``shared``: one frame's features for both objects (batch
    1, as ``track_step`` passes them: the first self-attention runs once)."""
    import copy

    hf, cfg = hf_video
    rng = np.random.default_rng(0)
    b, frames, pointers = 2, 3, 6  # slots: 3 memory frames, 6 pointer tokens; some empty
    hw = G * G
    feats = rng.standard_normal((1 if shared else b, hw, C)).astype(np.float32)
    pos = rng.standard_normal((1, hw, C)).astype(np.float32)
    memory = (rng.standard_normal((b, frames * hw + pointers, MEM)) * scale).astype(np.float32)
    memory_pos = rng.standard_normal((b, frames * hw + pointers, MEM)).astype(np.float32)
    valid_frames = [[1, 1, 0], [1, 0, 1]]
    valid_ptrs = [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    key_mask = np.array([sum([[f] * hw for f in vf], []) + vp for vf, vp in zip(valid_frames, valid_ptrs)],
                        np.int32)
    spec = {"features": nn.spec.Tensor([len(feats), hw, C], "float32"),
            "position": nn.spec.Tensor([1, hw, C], "float32"),
            "memory": nn.spec.Tensor([b, frames * hw + pointers, MEM], "float32"),
            "memory_pos": nn.spec.Tensor([b, frames * hw + pointers, MEM], "float32"),
            "key_mask": nn.spec.Tensor([b, frames * hw + pointers], "int32")}
    run, expected = compile_module(_MemoryAttentionWithMask(cfg, frames), spec)
    weights = _weights(hf.memory_attention, "memory_attention.")
    assert set(expected) == set(weights)
    (ours,) = run(weights, feats, pos, memory, memory_pos, key_mask)
    m64 = copy.deepcopy(hf.memory_attention).double()
    for i in range(b):
        keep = key_mask[i] == 1
        n_ptr = int(sum(valid_ptrs[i]))
        f = 0 if shared else i
        inputs = dict(current_vision_features=torch.from_numpy(feats[f:f + 1]).transpose(0, 1),
                      memory=torch.from_numpy(memory[i:i + 1, keep]).transpose(0, 1),
                      current_vision_position_embeddings=torch.from_numpy(pos).transpose(0, 1),
                      memory_posision_embeddings=torch.from_numpy(memory_pos[i:i + 1, keep]).transpose(0, 1),
                      num_object_pointer_tokens=n_ptr)
        with torch.no_grad():
            # the reference returns [HW, 1, 1, C] (its unsqueezed point batch)
            ref = hf.memory_attention(**inputs).reshape(hw, C).numpy()
            ref64 = m64(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()})
            ref64 = ref64.reshape(hw, C).numpy()
        ours_err, ref_err = np.abs(ours[i] - ref64).max(), np.abs(ref - ref64).max()
        print(f"scale {scale}: |ours - ref| {np.abs(ours[i] - ref).max():.2e}, |ours - f64| {ours_err:.2e}, "
              f"|ref - f64| {ref_err:.2e}")
        if scale == 1.0:
            assert_close(ours[i], ref, rtol=1e-4, atol=1e-4, what=f"memory attention object {i}")
        else:
            assert ours_err <= 4 * ref_err, (ours_err, ref_err)


class _Encoder(nn.Module):
    def __init__(self, cfg: Sam3Config):
        self.memory_encoder = MemoryEncoder(C, cfg.video)

    def forward(self, features, masks):
        return self.memory_encoder(features, masks)


def test_memory_encoder_matches_reference(hf_video):
    hf, cfg = hf_video
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((1, G, G, C)).astype(np.float32)
    masks = (rng.standard_normal((2, 1, 16 * G, 16 * G)) * 8).astype(np.float32)
    spec = {"features": nn.spec.Tensor([1, G, G, C], "float32"),
            "masks": nn.spec.Tensor([2, 1, 16 * G, 16 * G], "float32")}
    run, expected = compile_module(_Encoder(cfg), spec)
    weights = _weights(hf.memory_encoder, "memory_encoder.")
    assert set(expected) == set(weights)
    (ours,) = run(weights, feats, masks)
    with torch.no_grad():
        ref, ref_pos = hf.memory_encoder(torch.from_numpy(feats).permute(0, 3, 1, 2).expand(2, -1, -1, -1),
                                         torch.from_numpy(masks))
    assert_close(ours, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=5e-5, what="memory encoder")


class _Round(nn.Module):
    def forward(self, x):
        return _round_bfloat16(x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_rounding_matches_host(dtype):
    """``encode_memory``'s bfloat16 rounding on the device gives the host's bits (ties to even,
    values whose rounding carries into the exponent, overflow to inf, subnormals, zeros)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-12, 12, 4096))).astype(np.float32)
    edge = np.array([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 - 2 ** -10, 65504.0, -65504.0,
                     3e-5, 6e-8, 1.5 * 2 ** -14, 255.9, 1e30], np.float32)
    with np.errstate(over="ignore"):
        x = np.concatenate([x, edge, -edge]).astype(dtype)
    run, _ = compile_module(_Round(), {"x": nn.spec.Tensor([len(x)], dtype)})
    (ours,) = run({}, x)
    expected = round_bfloat16_as(x, dtype)
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours.view(np.uint32 if dtype == "float32" else np.uint16),
                                  expected.view(np.uint32 if dtype == "float32" else np.uint16))
