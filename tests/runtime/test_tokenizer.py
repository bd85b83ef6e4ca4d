"""Tokenizer parity with transformers' CLIPTokenizer (the HF Sam3Processor's tokenizer)
on a small byte-level BPE vocabulary this test writes itself, read from
``vocab.json`` + ``merges.txt`` and from a ``tokenizer.json``; bad input. The reference
gets the text after ``ftfy.fix_text``, the original SAM 3 tokenizer's first step that
transformers leaves out (test_fidelity.py compares with the original tokenizer itself)."""

import json
import os

import numpy as np
import pytest

from sam3_nn.runtime.tokenizer import Sam3Tokenizer, TokenizerError

CTX = 16

# merges in rank order; every merged symbol joins the vocabulary
MERGES = ["c a", "ca t</w>", "t h", "th e</w>", "d o", "do g</w>", "r e", "re d</w>", "ca r</w>",
          "a n", "an d</w>", "' s</w>", "e r</w>", "p e", "p p", "pe pp", "pepp er</w>", "s a", "sa l",
          "sal t</w>", "o n</w>", "th e", "i n", "in g</w>",
          "Ã ©</w>"]  # UTF-8 é (bytes C3 A9) ending a word

PHRASES = [
    "cat",
    "The RED Car",
    "a red car, parked!",
    "the dog's toy",
    "salt & pepper",
    "x-ray (left) #2 -- 30%",
    "  the\tdog \n  cat  ",
    "Café Crème",
    "cafe\u0301 au lait",  # combining accent: NFC composes it
    "naïve FAÇADE",
    "日本の猫",
    "🐶 running dog",
    "ＦＵＬＬ width",
    "I'm sure they'll go, won't they?",
]
LONG = "the red car and the dog and the cat and pepper and salt on the ring"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_vocab(folder):
    symbols = bytes_to_unicode()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    for m in MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder, vocab


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder, vocab = write_vocab(str(tmp_path_factory.mktemp("bpe")))
    ref = CLIPTokenizer.from_pretrained(folder)
    saved = str(tmp_path_factory.mktemp("tokjson"))
    ref.save_pretrained(saved)
    assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
    os.remove(os.path.join(saved, "vocab.json")) if os.path.exists(os.path.join(saved, "vocab.json")) else None
    return folder, saved, vocab, ref


@pytest.fixture(scope="module", params=["vocab+merges", "tokenizer.json"])
def ours(files, request):
    folder, saved, _, _ = files
    return Sam3Tokenizer.from_pretrained(folder if request.param == "vocab+merges" else saved,
                                         context_length=CTX)


def reference(ref, texts):
    enc = ref(texts, padding="max_length", max_length=CTX, truncation=True)
    return np.array(enc["input_ids"]), np.array(enc["attention_mask"])


def test_vocab_really_merges(files, ours):
    """The test vocabulary exercises merges (else parity would be trivial)."""
    _, _, vocab, _ = files
    assert ours.tokenize("The cat's RED pepper") == ["the</w>", "cat</w>", "'s</w>", "red</w>", "pepper</w>"]
    assert ours.tokenize("carts") == ["ca", "r", "t", "s</w>"]  # "ca r</w>" only ends a word


def test_parity_with_clip_tokenizer(files, ours):
    import ftfy

    ref = files[3]
    ids_ref, mask_ref = reference(ref, [ftfy.fix_text(p) for p in PHRASES])
    out = ours(PHRASES)
    for i, p in enumerate(PHRASES):
        np.testing.assert_array_equal(out.input_ids[i], ids_ref[i], err_msg=repr(p))
        np.testing.assert_array_equal(out.attention_mask[i], mask_ref[i], err_msg=repr(p))
    assert out.input_ids.dtype == np.int32 and out.attention_mask.dtype == np.int32
    assert out.input_ids.shape == (len(PHRASES), CTX)
    # byte-level pieces of the non-Latin phrases overflow this small context
    lengths = [len(ours.tokenize(p)) for p in PHRASES]
    assert out.dropped == [max(0, n - (CTX - 2)) for n in lengths]
    assert out.truncated == [n > CTX - 2 for n in lengths] and 0 < sum(out.truncated) < len(PHRASES)
    # one prompt alone = the same row
    single = ours(PHRASES[2])
    np.testing.assert_array_equal(single.input_ids[0], out.input_ids[2])


def test_truncation(files, ours):
    ref = files[3]
    n_tokens = len(ours.tokenize(LONG))
    assert n_tokens > CTX - 2
    ids_ref, mask_ref = reference(ref, [LONG, "cat"])
    out = ours([LONG, "cat"])
    np.testing.assert_array_equal(out.input_ids, ids_ref)
    np.testing.assert_array_equal(out.attention_mask, mask_ref)
    assert out.truncated == [True, False] and out.any_truncated
    assert out.dropped == [n_tokens - (CTX - 2), 0]
    assert out.input_ids[0, -1] == ours.eos_id and out.attention_mask[0].all()


def test_special_tokens_and_padding(files, ours):
    vocab = files[2]
    out = ours("red car")
    row, m = out.input_ids[0], out.attention_mask[0]
    n = int(m.sum())
    assert row[0] == vocab["<|startoftext|>"] and row[n - 1] == vocab["<|endoftext|>"]
    assert list(row[1:n - 1]) == [vocab["red</w>"], vocab["car</w>"]]
    assert (row[n:] == ours.pad_id).all() and not m[n:].any()


def test_html_entities_unescaped(ours):
    """Documented difference from transformers (as the original tokenizer): entities unescaped."""
    a, b = ours("salt &amp;amp; pepper"), ours("salt & pepper")
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("bad,err", [("", ValueError), ("   \n\t", ValueError), ("&nbsp;", ValueError),
                                     ([], ValueError), (["cat", ""], ValueError),
                                     (None, TypeError), (42, TypeError), (b"cat", TypeError),
                                     (["cat", 3], TypeError), ({"cat"}, TypeError)])
def test_bad_prompts(ours, bad, err):
    with pytest.raises(err, match="prompt|str"):
        ours(bad)


def test_bad_files(files, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Sam3Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="does not exist"):
        Sam3Tokenizer.from_pretrained(str(tmp_path / "missing"))
    folder, _, vocab, _ = files
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "sam3", "text_config": {"vocab_size": 100, "max_position_embeddings": 8}}, f)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as src, open(tmp_path / name, "w", encoding="utf-8") as dst:
            dst.write(src.read())
    with pytest.raises(TokenizerError, match="do not belong to this model"):
        Sam3Tokenizer.from_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "sam3", "text_config": {"vocab_size": len(vocab), "max_position_embeddings": 8}}, f)
    tok = Sam3Tokenizer.from_pretrained(str(tmp_path))
    assert tok.context_length == 8 and tok("cat").input_ids.shape == (1, 8)


# ----------------------------------------------------------------------------
# CLIP's vocabulary shipped with the package (what the released SAM 3 tokenizes with)
# ----------------------------------------------------------------------------
def clip_files_from_gz(gz: str, folder: str) -> str:
    """vocab.json + merges.txt built from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` as CLIP's
    ``SimpleTokenizer`` builds its vocabulary: the 256 byte symbols, the same with ``</w>``,
    merges 1..48894 of the file joined, then the start and end tokens."""
    import gzip

    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def test_shipped_clip_vocabulary_matches_clip_tokenizer(tmp_path):
    """``from_pretrained`` on the shipped .gz tokenizes as transformers' CLIPTokenizer built
    from the same vocabulary; CLIP's well-known ids anchor both."""
    import hashlib

    import ftfy
    from transformers import CLIPTokenizer

    from sam3_nn.runtime.tokenizer import CLIP_BPE

    # the file is the open_clip_torch 3.3.0 wheel's, unchanged (data/LICENSE-clip-bpe.txt)
    with open(CLIP_BPE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert os.path.isfile(os.path.join(os.path.dirname(CLIP_BPE), "LICENSE-clip-bpe.txt"))
    ours = Sam3Tokenizer.from_pretrained(CLIP_BPE, context_length=32)
    assert ours.vocab_size == 49408
    ref = CLIPTokenizer.from_pretrained(clip_files_from_gz(CLIP_BPE, str(tmp_path / "clip")))
    phrases = PHRASES + [LONG, "a photo of a cat", "yellow school bus", "hard-hat worker's vest"]
    enc = ref([ftfy.fix_text(p) for p in phrases], padding="max_length", max_length=32, truncation=True)
    out = ours(phrases)
    np.testing.assert_array_equal(out.input_ids, np.array(enc["input_ids"]))
    np.testing.assert_array_equal(out.attention_mask, np.array(enc["attention_mask"]))
    # CLIP's ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert list(ours("a photo of a cat").input_ids[0, :7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
