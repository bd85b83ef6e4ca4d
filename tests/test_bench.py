"""The benchmark's non-timing logic: FLOP counts, configs, weights bridge, arguments, table."""


import numpy as np
import pytest
import torch

import common  # bench/ is on pytest's pythonpath (pyproject.toml)
import flops
import pipeline


@pytest.fixture(scope="module")
def tiny():
    cfg = common.model_config("tiny")
    return cfg, common.reference_model(cfg, seed=0, attn_implementation="eager")


def test_flops_match_torch_flop_counter(tiny):
    """Analytic counts vs FlopCounterMode on Sam3Model (eager attention: every product is an
    aten matmul). The reference runs its box head twice (once more on all layers outside the
    decoder) and CLIP's pooled projection: both left out of ours, hence the small tolerance."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, m = tiny
    b = 2
    inputs = pipeline.make_inputs(cfg, b, 0)
    px = torch.from_numpy(inputs["pixels"])
    ids, mask = torch.from_numpy(inputs["ids"]), torch.from_numpy(inputs["mask"])

    def count(fn):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            out = fn()
        return fc.get_total_flops(), out

    fv, vo = count(lambda: m.vision_encoder(px))
    ft, to = count(lambda: m.get_text_features(input_ids=ids, attention_mask=mask))
    fd, _ = count(lambda: m(vision_embeds=vo, text_embeds=to, attention_mask=mask))
    ours = flops.part_flops(cfg, b)
    assert ours["vision"] == fv  # windowed blocks with padding (12x12 grid, window 5) included
    assert abs(ours["text"] / ft - 1) < 5e-3
    assert abs(ours["detect"] / fd - 1) < 5e-3
    assert ours["pipeline"] == ours["vision"] + ours["text"] + ours["detect"]


def test_full_size_flops():
    cfg = common.model_config("full")
    assert flops.vit_trunk_flops(cfg) == pytest.approx(5.3986e12, rel=1e-4)  # the ~5.4 TFLOP
    assert flops.vision_flops(cfg) == pytest.approx(5.6135e12, rel=1e-4)
    assert flops.vision_flops(cfg, 4) == 4 * flops.vision_flops(cfg)
    d = flops.detect_flops(cfg)
    assert d["total"] == sum(v for k, v in d.items() if k != "total")
    assert 0.3e12 < d["total"] < 0.6e12


@pytest.mark.parametrize("args", [("full", None, None), ("tiny", None, None), ("full", 336, 2),
                                  ("tiny", 224, 2)])
def test_hf_config_round_trip(args):
    cfg = common.model_config(*args)
    hf = common.hf_config(cfg)
    assert hf.vision_config.backbone_config.num_hidden_layers == cfg.vision.backbone.num_hidden_layers
    if args[2] == 2:
        assert cfg.vision.backbone.global_attn_indexes == [1]
    assert hf._attn_implementation == "sdpa"


def test_state_dict_through_our_loader(tiny):
    """The in-memory state dict goes through the declarative loader: every parameter of
    the model built, fused q/k/v equal to the concatenated reference projections."""
    from sam3_nn.compiler.build import export

    cfg, m = tiny
    model, _, params, _ = export(cfg, "float16")
    manifest = {"parts": list(model.parts),
                "params": [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)}
                           for n, p in params]}
    ours = common.our_params(cfg, m.state_dict(), manifest)
    assert list(ours) == [p["name"] for p in manifest["params"]]
    assert all(a.dtype == np.float16 for a in ours.values())
    sd = m.state_dict()
    qkv = [k for k in ours if k.endswith("layers.0.attention.qkv.weight")][0]
    src = qkv.replace("qkv", "{}")
    want = torch.cat([sd[src.format(p)] for p in ("q_proj", "k_proj", "v_proj")]).half().numpy()
    np.testing.assert_array_equal(ours[qkv], want)


def test_text_inputs():
    cfg = common.model_config("tiny")
    ids, mask = common.text_inputs(cfg, 3, words=4)
    assert ids.shape == mask.shape == (3, cfg.text.max_position_embeddings)
    assert (ids[:, 0] == cfg.text.bos_token_id).all() and (ids[:, 5] == cfg.text.eos_token_id).all()
    assert (mask.sum(1) == 6).all() and (ids[mask == 0] == cfg.text.pad_token_id).all()
    assert ids.max() < cfg.text.vocab_size


def test_args_defaults_and_errors():
    a = pipeline.parse_args(["--device", "cuda", "--library", "x.so"])
    assert a.batches == [1, 4] and a.runs == 20 and a.warmup == 3
    assert a.dtype_list == ["float16", "bfloat16"] and a.part_list == list(pipeline.PARTS)
    c = pipeline.parse_args(["--parts", "pipeline,vision", "--batch", "2"])
    assert c.device == "cpu" and c.batches == [2] and c.runs == 1 and c.dtype_list == ["float32"]
    assert c.part_list == ["vision", "pipeline"] and c.target == "llvm"
    for bad in (["--parts", "vision,nope"], ["--dtypes", "float16"], ["--batch", "0"],
                ["--library", "a.so", "--layers", "2"], ["--library", "a.so", "--manifest", "a.json"],
                ["--runs", "0"]):
        with pytest.raises(SystemExit):
            pipeline.parse_args(bad)


def test_table():
    def row(impl, dtype, mode, ms, part="vision", **kw):
        return {"part": part, "batch": 1, "impl": impl, "dtype": dtype, "mode": mode, "ms": ms,
                "tflops": 1.0, "rel_diff": {"a": 1e-3}, **kw}

    meta = {"device": "cuda", "gpu": "H100", "torch": "2", "transformers": "5", "tvm": "0.27",
            "image_size": 1008, "vit_layers": 32, "runs": 20, "warmup": 3,
            "library": {"target": "cuda", "dtype": "float16"}}
    res = {"meta": meta, "rows": [
        row("torch", "float16", "eager", 50.0),
        row("sam3_nn", "float16", "cuda", 100.0, peak_mib=2000.0),
        row("torch", "float16", "compile", 20.0, compile_s=61.0),
        {"part": "text", "batch": 1, "impl": "sam3_nn", "dtype": "float16", "mode": "cuda",
         "skipped": "library lacks encode_text"},
        {"part": "text", "batch": 1, "impl": "torch", "dtype": "float16", "mode": "compile",
         "error": "RuntimeError: boom"}]}
    lines = pipeline.table([res]).splitlines()
    body = [ln for ln in lines if ln.startswith(("vision", "text"))]
    assert "sam3_nn" in body[0] and "1.00" in body[0] and "2000" in body[0]
    assert "eager" in body[1] and "2.00" in body[1]
    assert "compile" in body[2] and "5.00" in body[2] and body[2].rstrip().endswith("61")
    assert "skipped" in body[3] and "FAILED: RuntimeError: boom" in body[4]


@pytest.mark.parametrize("preset", ["full", "tiny"])
def test_interactive_bench_config_and_prompts(preset):
    """bench/interactive.py: ``Sam3TrackerConfig`` for our config maps back to it; the
    prompts fill the slots as ``predict_masks`` takes them (box corners first)."""
    import interactive

    cfg = common.model_config(preset, None, 1)
    hf = interactive.tracker_config(cfg)
    assert hf.prompt_encoder_config.image_size == cfg.image_size
    assert hf.vision_config.backbone_feature_sizes[-1] == [cfg.vision.backbone.grid_size] * 2
    ps = interactive.prompts(cfg, np.random.default_rng(0))
    pts, lab, pm, mi, mv = interactive.slots(ps["box + 2 clicks + mask"], 16, 4 * cfg.vision.backbone.grid_size)
    assert lab[0, :4].tolist() == [2, 3, 1, 0] and pm.sum() == 4 and mv[0] == 1
    np.testing.assert_array_equal(pts[0, 1], np.float32(ps["box + 2 clicks + mask"]["box"][2:]))
    assert ps["1 click"]["multimask"] and not ps["box + 2 clicks + mask"]["multimask"]


def test_label_bench_photo_set(tmp_path):
    """bench/label.py's image set: n distinct JPEGs made from the scikit-image photos present."""
    import hashlib

    from PIL import Image

    import label

    src = tmp_path / "data"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("astronaut.png", "camera.png", "chessboard_GRAY.png"):  # the last is no photo
        Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(src / name)
    info = label.make_photo_set(str(src), str(tmp_path / "out"), 7)
    files = sorted((tmp_path / "out").iterdir())
    assert info["files"] == 7 and info["photos"] == 2 and len(files) == 7
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 7
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and 320 <= max(im.size) <= 1280
