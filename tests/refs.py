"""Shared test helpers: tiny random-weight references and our compiled counterparts."""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
import torch

from sam3_nn.config import Sam3Config
from sam3_nn.runtime import channel_first  # noqa: F401  (tests compare encode_image's maps in the reference's layout)

# A tiny SAM 3: 12x12 token grid with window 5 (not a multiple: padding is exercised),
# one global block, every part 32 wide with 2 heads. The ViT's LayerNorm eps is the
# original's 1e-5 (transformers' default 1e-6 is the port's, not SAM 3's: docs/fidelity.md).
TINY_HF = dict(
    vision_config=dict(
        backbone_config=dict(model_type="sam3_vit_model", hidden_size=64, intermediate_size=128,
                             num_hidden_layers=3, num_attention_heads=4, image_size=168,
                             patch_size=14, window_size=5, global_attn_indexes=[1],
                             pretrain_image_size=70, layer_norm_eps=1e-5),
        fpn_hidden_size=32),
    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                     bos_token_id=998, eos_token_id=999, pad_token_id=1),
    geometry_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2,
                                 intermediate_size=64),
    detr_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2,
                             intermediate_size=64),
    detr_decoder_config=dict(hidden_size=32, num_layers=2, num_queries=10,
                             num_attention_heads=2, intermediate_size=64),
    mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
)


def tiny_hf_config(**overrides):
    from transformers import Sam3Config as HFSam3Config

    d = json.loads(json.dumps(TINY_HF))
    for k, v in overrides.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return HFSam3Config(**d)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values (LayerNorm weights near 1), so that no
    parameter is left at a default that would hide a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


def save_hf_snapshot(model, folder: str) -> str:
    """Write ``config.json`` + ``model.safetensors`` as an HF snapshot does."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f)
    return folder


def compile_library(cfg: Sam3Config, folder: str, dtype: str = "float32",
                    rope_mode: str = "normal", target: str = "llvm", parts=None):
    """Compile ``cfg`` (all parts, or ``parts``) for ``target`` into ``folder`` and load it (CPU)."""
    from sam3_nn.compiler import build
    from sam3_nn.engine import CompiledModel
    from sam3_nn.model import PARTS

    art = build(cfg, target, dtype, rope_mode, folder, parts=parts or PARTS)
    return CompiledModel(art["library"])


def expected_params(compiled) -> Dict:
    return {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in compiled.manifest["params"]}


def assert_close(ours: np.ndarray, ref, rtol: float, atol: float, what: str = ""):
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=rtol, atol=atol, err_msg=what)


# the released sam3.pt layout (names, shapes, dtypes; no weights): a copy of
# shared/fixtures/sam3_pt_layout.json kept with the tests so a bare clone can run them
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "sam3_pt_layout.json")


def fixture_source():
    """A ``TensorSource`` with the released ``sam3.pt`` layout (names, shapes, dtypes from
    ``shared/fixtures/sam3_pt_layout.json``); reading a tensor gives zeros of its shape."""
    from sam3_nn.weights.loader import TensorSource

    path = os.environ.get("SAM3_PT_LAYOUT", FIXTURE)
    with open(path) as f:
        tensors = json.load(f)["tensors"]
    meta = {k: (tuple(s), t.replace("torch.", "")) for k, (s, t) in tensors.items()}

    def read(name):
        shape, dtype = meta[name]
        if dtype.startswith("complex"):
            raise AssertionError(f"complex tensor {name} must never be read")
        return np.zeros(shape, np.float32)

    return TensorSource(path, "pt", meta, read)
