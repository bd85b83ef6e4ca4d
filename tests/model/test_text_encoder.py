"""Text encoder parity: transformers Sam3Model text path -> our loader -> llvm library.

Reference: ``Sam3Model.get_text_features(input_ids, attention_mask).pooler_output``
(CLIP text transformer's last hidden state through ``Sam3Model.text_projection``)
and ``attention_mask.bool()`` as the detector's text mask. Tiny config (width 32,
2 layers, 2 heads, context 16), random weights, prompts of several lengths, padded
and unpadded. Tolerance float32: rtol 1e-4, atol 1e-5 (features are O(1)).
"""

import numpy as np
import pytest
import torch

from tests.refs import (TINY_HF, assert_close, compile_library, expected_params, fixture_source,
                  randomize_, save_hf_snapshot, tiny_hf_config)
from sam3_nn.config import Sam3Config
from sam3_nn.weights import load_params, open_checkpoint, plan

RTOL, ATOL = 1e-4, 1e-5
TEXT = TINY_HF["text_config"]
CTX = TEXT["max_position_embeddings"]
BOS, EOS = TEXT["bos_token_id"], TEXT["eos_token_id"]

# (number of tokens between BOS and EOS, pad id): padded rows of several lengths, one
# row filling the whole context (no padding); pad ids differ (they must not matter
# for real tokens)
PROMPTS = [(1, EOS), (4, 0), (CTX - 2, EOS), (9, 7)]


def make_batch(prompts, seed=0):
    g = np.random.default_rng(seed)
    ids = np.zeros((len(prompts), CTX), np.int32)
    mask = np.zeros((len(prompts), CTX), np.int32)
    for r, (n, pad) in enumerate(prompts):
        row = [BOS] + list(g.integers(2, BOS, size=n)) + [EOS]
        ids[r] = row + [pad] * (CTX - len(row))
        mask[r, :len(row)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import Sam3Model as HFSam3Model

    # hidden_act "gelu" as released (a text_config dict without it defaults to quick_gelu)
    model = randomize_(HFSam3Model(tiny_hf_config(text_config=dict(hidden_act="gelu"))).eval(), seed=3)
    folder = save_hf_snapshot(model, str(tmp_path_factory.mktemp("hf_sam3")))
    ids, mask = make_batch(PROMPTS)
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long())
    return model, folder, ids, mask, out.pooler_output


@pytest.fixture(scope="module")
def library(reference, tmp_path_factory):
    cfg = Sam3Config.from_pretrained(reference[1])
    # a text-only library (compiles in a fraction of the whole model's time)
    return cfg, compile_library(cfg, str(tmp_path_factory.mktemp("lib")), parts=["text"])


@pytest.fixture(scope="module")
def hf_params(reference, library):
    cfg, lib = library
    params, report = load_params(cfg, open_checkpoint(reference[1]), expected_params(lib),
                                 lib.manifest["parts"])
    return params, report


def _encode(lib, params, ids, mask):
    lib.bind(params)
    return lib("encode_text", ids, mask)


def test_config_and_manifest(reference, library):
    model = reference[0]
    cfg, lib = library
    t = cfg.text
    hf = model.config.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings,
            t.vocab_size, t.hidden_act) == (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                                            hf.max_position_embeddings, hf.vocab_size, hf.hidden_act)
    assert t.hidden_act == "gelu"
    fn = lib.manifest["functions"]["encode_text"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in fn["inputs"]] == [
        ("input_ids", ["batch", CTX], "int32"), ("attention_mask", ["batch", CTX], "int32")]
    d = model.config.detr_encoder_config.hidden_size
    assert [(o["name"], o["shape"], o["dtype"]) for o in fn["outputs"]] == [
        ("text_features", ["batch", CTX, d], "float32"), ("text_mask", ["batch", CTX], "int32")]
    assert lib.manifest["parts"] == ["text"] and sorted(lib.manifest["functions"]) == ["encode_text", "release_outputs"]


def test_parity_hf_snapshot(reference, library, hf_params):
    _, _, ids, mask, ref = reference
    cfg, lib = library
    params, report = hf_params
    reasons = " | ".join(report.unused)
    assert "pooled-embedding projection" in reasons
    feats, text_mask = _encode(lib, params, ids, mask)
    assert_close(feats, ref, RTOL, ATOL, "text_features (all positions)")
    np.testing.assert_array_equal(text_mask, mask)


def test_real_tokens_ignore_padding_and_batch(reference, library, hf_params):
    """A prompt's real-token features depend neither on the pad ids, nor on the other
    prompts of the batch; a nonzero mask value counts as a real token."""
    _, _, ids, mask, ref = reference
    cfg, lib = library
    r, n = 1, int(mask[1].sum())
    one_ids = ids[r:r + 1].copy()
    one_ids[0, n:] = BOS - 1  # other pad id
    one_mask = mask[r:r + 1] * 5
    feats, text_mask = _encode(lib, hf_params[0], one_ids, one_mask)
    assert_close(feats[:, :n], ref[r:r + 1, :n], RTOL, ATOL, "single prompt, other padding")
    np.testing.assert_array_equal(text_mask, mask[r:r + 1])


def original_layout(model) -> dict:
    """The HF text weights rewritten in the original sam3.pt layout, written
    independently of our mapping (the inverse of what the released converter does)."""
    sd = model.state_dict()
    p = "detector.backbone.language_backbone."
    e, s0 = p + "encoder.", "text_encoder.text_model."
    out = {
        e + "token_embedding.weight": sd[s0 + "embeddings.token_embedding.weight"],
        e + "positional_embedding": sd[s0 + "embeddings.position_embedding.weight"],
        # CLIP's pooled projection, stored transposed ([width, projection_dim]); unused by SAM 3
        e + "text_projection": sd["text_encoder.text_projection.weight"].t().contiguous(),
    }
    for t in ("weight", "bias"):
        out[f"{e}ln_final.{t}"] = sd[f"{s0}final_layer_norm.{t}"]
        out[f"{p}resizer.{t}"] = sd[f"text_projection.{t}"]
    for i in range(model.config.text_config.num_hidden_layers):
        s, o = f"{s0}encoder.layers.{i}.", f"{e}transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = torch.cat([sd[f"{s}self_attn.{x}_proj.weight"] for x in "qkv"])
        out[o + "attn.in_proj_bias"] = torch.cat([sd[f"{s}self_attn.{x}_proj.bias"] for x in "qkv"])
        for t in ("weight", "bias"):
            out[f"{o}attn.out_proj.{t}"] = sd[f"{s}self_attn.out_proj.{t}"]
            out[f"{o}ln_1.{t}"] = sd[f"{s}layer_norm1.{t}"]
            out[f"{o}ln_2.{t}"] = sd[f"{s}layer_norm2.{t}"]
            out[f"{o}mlp.c_fc.{t}"] = sd[f"{s}mlp.fc1.{t}"]
            out[f"{o}mlp.c_proj.{t}"] = sd[f"{s}mlp.fc2.{t}"]
    out["tracker.no_mem_embed"] = torch.zeros(1, 1, 8)
    return out


def test_parity_sam3_pt(reference, library, hf_params, tmp_path):
    model, _, ids, mask, ref = reference
    cfg, lib = library
    path = str(tmp_path / "sam3.pt")
    torch.save({"model": original_layout(model)}, path)
    want = expected_params(lib)
    text_want = {k: v for k, v in want.items() if k.startswith(("text_encoder.", "text_projection."))}
    text, report = load_params(cfg, open_checkpoint(path), text_want, ["text"])
    reasons = " | ".join(report.unused)
    assert "pooled-embedding projection" in reasons and "video tracker" in reasons
    # any other part of the library takes its weights from the HF snapshot (the file holds only text)
    params = {**hf_params[0], **text}
    for k in text_want:
        np.testing.assert_array_equal(text[k], hf_params[0][k], err_msg=k)
    feats, _ = _encode(lib, params, ids, mask)
    assert_close(feats, ref, RTOL, ATOL, "text_features (sam3.pt)")


def test_released_layout_covers_language_backbone():
    """Every detector.backbone.language_backbone.* tensor of the released sam3.pt is
    mapped onto our full-size parameters (matching shapes) or ignored with a reason."""
    from sam3_nn.model.sam3 import Sam3Model

    cfg = Sam3Config()
    model = Sam3Model(cfg)
    want = {n: (tuple(int(s) for s in p.shape), "float32") for n, p in model.named_parameters()
            if n.startswith(("text_encoder.", "text_projection."))}
    src = fixture_source()
    lb = [n for n in src.meta if n.startswith("detector.backbone.language_backbone.")]
    assert len(lb) > 4 + 12 * cfg.text.num_hidden_layers
    m, report = plan(cfg, src, want, ["text"], strict=True)
    used = {n for names in report.mapped.values() for n in names}
    ignored = [n for n in lb if n not in used]
    assert ignored == ["detector.backbone.language_backbone.encoder.text_projection"]
    assert "pooled-embedding projection" in m.unused_reason(ignored[0])
    assert used == set(lb) - set(ignored)
    # shapes: each parameter's sources, once transformed, give the expected shape
    for ours, names in report.mapped.items():
        built = m.entries[ours].build([np.zeros(src.meta[n][0], np.float32) for n in names])
        assert built.shape == want[ours][0], ours
    assert want["text_projection.weight"][0] == (cfg.detr_encoder.hidden_size, cfg.text.hidden_size)


def test_bad_inputs(reference, library, hf_params):
    """Wrong shapes/dtypes are refused naming the input; out-of-range ids are clamped
    (documented, memory-safe); an all-padding mask gives finite features (finite MASK_VALUE)."""
    _, _, ids, mask, _ = reference
    cfg, lib = library
    lib.bind(hf_params[0])
    with pytest.raises(Exception, match=r"input_ids.*|shape"):
        lib("encode_text", ids[:, :-1], mask[:, :-1])  # not the context length
    with pytest.raises(Exception, match=r"int32"):
        lib("encode_text", ids.astype(np.int64), mask)  # wrong dtype
    vocab = cfg.text.vocab_size
    wild = ids.copy()
    wild[:, 1] = [vocab, vocab + 12345, -1, -7]
    clamped = np.clip(wild, 0, vocab - 1).astype(np.int32)
    got, _ = lib("encode_text", wild, mask)
    want, _ = lib("encode_text", clamped, mask)
    np.testing.assert_array_equal(got, want)
    empty, text_mask = lib("encode_text", ids, np.zeros_like(mask))
    assert np.isfinite(empty).all() and not text_mask.any()

def test_prompts_through_tokenizer(reference, library, hf_params, tmp_path):
    """Runtime path: strings -> our tokenizer (context and vocabulary size from the
    snapshot's config.json) -> encode_text, against transformers on the same ids."""
    import json
    import shutil

    from tests.runtime.test_tokenizer import write_vocab
    from sam3_nn.runtime.tokenizer import Sam3Tokenizer

    model, folder, *_ = reference
    cfg, lib = library
    vocab_dir, vocab = write_vocab(str(tmp_path))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = BOS, EOS  # the tiny model's ids
    with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    shutil.copy(f"{folder}/config.json", tmp_path / "config.json")
    tok = Sam3Tokenizer.from_pretrained(vocab_dir)
    assert tok.context_length == CTX and (tok.bos_id, tok.eos_id) == (BOS, EOS)
    batch = tok(["a red car", "The dog's toy, left of the cat"])
    feats, text_mask = _encode(lib, hf_params[0], batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(batch.input_ids).long(),
                                      attention_mask=torch.from_numpy(batch.attention_mask).long())
    assert_close(feats, ref.pooler_output, RTOL, ATOL, "text_features (tokenized prompts)")
    np.testing.assert_array_equal(text_mask, batch.attention_mask)
