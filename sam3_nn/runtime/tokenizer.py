"""SAM 3's text tokenizer for the runtime: CLIP byte-level BPE, no PyTorch, no network.

``Sam3Tokenizer.from_pretrained(path)`` reads CLIP's ``bpe_simple_vocab_16e6.txt.gz``
(shipped with the package: ``CLIP_BPE``) or the tokenizer files of an HF SAM 3
snapshot: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (plus, when
present, ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special
tokens and ``config.json`` for the context length and vocabulary size). Calling it
on one prompt or a list gives ``input_ids`` and ``attention_mask`` (int32,
``[N, context]``), the inputs of the library's ``encode_text``.

What a prompt goes through (as the original SAM 3 tokenizer, ``tokenizer_ve.py``):

1. cleanup (the original's ``basic_clean``): ``ftfy.fix_text`` (mojibake repair,
   curly quotes straightened, ligatures and full-width forms folded, NFC), HTML
   entities unescaped twice, leading/trailing whitespace stripped;
2. normalisation: Unicode NFC, every whitespace run -> one space, lower case;
3. split into words, numbers (one digit each), punctuation runs and the
   ``'s 't 're 've 'm 'll 'd`` contractions; each piece byte-level encoded and BPE
   merged, the last symbol of a word carrying ``</w>``;
4. ``<|startoftext|>`` + tokens + ``<|endoftext|>``; prompts longer than the
   context keep their first ``context - 2`` tokens (the end token stays last) and
   are flagged ``truncated`` in the result; then padding to the context length
   (``attention_mask`` 0 there).

Steps 2-3 are the same as transformers' ``CLIPTokenizer`` (the HF ``Sam3Processor``'s);
step 1 is not in transformers at all, so text holding curly quotes (``dog’s``),
ligatures, full-width letters, mojibake or HTML entities tokenizes as the original
does and not as transformers does (docs/fidelity.md).

Why the ``tokenizers`` library rather than a hand-written BPE: it is the very
implementation transformers' ``CLIPTokenizer`` runs, so the ids match the
reference by construction rather than by re-implementing its details (the
byte-to-unicode table, the ``\\p{L}``/``\\p{N}`` split pattern Python's ``re``
cannot express, merge ranking, ``</w>`` handling, special-token matching); it is
a small native wheel without torch, and fast.

Bad input: a prompt that is not a ``str`` -> ``TypeError``; an empty prompt (or
only whitespace) -> ``ValueError``, since there is nothing to look for; an empty
list -> ``ValueError``.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_CONTEXT = 32  # SAM 3's text context (HF Sam3Processor: max_length=32)

# transformers' CLIPTokenizer split pattern
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
          r"""|[^\s\p{L}\p{N}]+""")


# CLIP's BPE vocabulary, shipped with the package (MIT licence: data/LICENSE-clip-bpe.txt)
CLIP_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
CLIP_MERGES = 49152 - 256 - 2  # CLIP reads merges[1:49152-256-2+1]


def _byte_symbols() -> List[str]:
    """GPT-2/CLIP ``bytes_to_unicode``'s symbols in CLIP's order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


class TokenizerError(ValueError):
    """Tokenizer files are missing or do not fit the model."""


@dataclass
class TokenizedPrompts:
    """``input_ids`` / ``attention_mask``: int32 ``[N, context]``. ``truncated[i]``: prompt
    ``i`` was longer than the context; ``dropped[i]`` tokens were cut from its end."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: List[bool] = field(default_factory=list)
    dropped: List[int] = field(default_factory=list)

    @property
    def any_truncated(self) -> bool:
        return any(self.truncated)


def clean(text: str) -> str:
    """Step 1 of the module docstring (normalisation is the tokenizer's)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _special(value, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
        value = value.get("content", default)
    if not isinstance(value, str):
        raise TokenizerError(f"special token {value!r} is not a string")
    return value


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


class Sam3Tokenizer:
    def __init__(self, tokenizer: Tokenizer, context_length: int = DEFAULT_CONTEXT,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, vocab_size: Optional[int] = None):
        if not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must be an int >= 3, got {context_length!r}")
        ids = {}
        for role, tok in (("start", bos_token), ("end", eos_token), ("padding", pad_token)):
            i = tokenizer.token_to_id(tok)
            if i is None:
                raise TokenizerError(f"the vocabulary has no {role} token {tok!r}")
            ids[role] = i
        self.bos_id, self.eos_id, self.pad_id = ids["start"], ids["end"], ids["padding"]
        self.context_length = context_length
        # SAM 3's (CLIP's) cleanup and splitting, whatever pipeline a tokenizer.json names;
        # the files give the vocabulary, the merges and the special tokens
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        if vocab_size is not None:
            top = max(tokenizer.get_vocab(with_added_tokens=True).values())
            if top >= vocab_size:
                raise TokenizerError(
                    f"tokenizer ids go up to {top}, but the model's vocabulary has {vocab_size} "
                    "entries: these tokenizer files do not belong to this model")

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json: str, merges_txt: str, **kw) -> "Sam3Tokenizer":
        for p in (vocab_json, merges_txt):
            if not os.path.isfile(p):
                raise TokenizerError(f"tokenizer file {p} does not exist")
        bos, eos = kw.get("bos_token", BOS_TOKEN), kw.get("eos_token", EOS_TOKEN)
        try:
            bpe = BPE.from_file(vocab_json, merges_txt, end_of_word_suffix="</w>",
                                continuing_subword_prefix="", unk_token=eos, fuse_unk=False)
        except Exception as e:
            raise TokenizerError(f"cannot read BPE files {vocab_json}, {merges_txt}: {e}") from e
        tok = Tokenizer(bpe)
        tok.add_special_tokens(sorted({bos, eos, kw.get("pad_token", EOS_TOKEN)}))
        return cls(tok, **kw)

    @classmethod
    def from_clip_bpe(cls, path: str, **kw) -> "Sam3Tokenizer":
        """From CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (shipped as :data:`CLIP_BPE`): a header
        line, then merges, of which CLIP uses the first 48894; the vocabulary is the 256 byte
        symbols, the same with ``</w>``, each merge's result and the two special tokens, in
        that order (as CLIP's and SAM 3's ``SimpleTokenizer`` build it)."""
        import gzip

        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a readable CLIP BPE .gz file ({e})") from e
        body = lines[1:CLIP_MERGES + 1]
        if body and body[-1] == "":
            body = body[:-1]
        merges = []
        for line in body:
            pair = line.split()
            if len(pair) != 2:
                raise TokenizerError(f"{path}: merge line {line!r} is not two tokens")
            merges.append((pair[0], pair[1]))
        symbols = _byte_symbols()
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}
        eos = kw.get("eos_token", EOS_TOKEN)
        bpe = BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=eos,
                  fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.add_special_tokens(sorted({kw.get("bos_token", BOS_TOKEN), eos, kw.get("pad_token", EOS_TOKEN)}))
        return cls(tok, **kw)

    @classmethod
    def from_pretrained(cls, path: str, context_length: Optional[int] = None) -> "Sam3Tokenizer":
        """From an HF snapshot directory (or a ``tokenizer.json`` file).

        ``context_length``: default ``config.json``'s ``text_config.max_position_embeddings``
        when there is one, else 32 (SAM 3).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"expected a path, got {type(path).__name__}")
        path = os.fspath(path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.exists(path):
            raise TokenizerError(f"{path} does not exist")
        if os.path.isfile(path) and path.endswith(".gz"):  # CLIP's vocabulary (sam3_nn/runtime/data/)
            return cls.from_clip_bpe(path, context_length=int(context_length or DEFAULT_CONTEXT))
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        smap = _read_json(os.path.join(folder, "special_tokens_map.json")) or {}
        model_cfg = _read_json(os.path.join(folder, "config.json")) or {}
        text_cfg = model_cfg.get("text_config") or {}
        kw = {name: _special(cfg.get(name, smap.get(name)), default)
              for name, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN),
                                    ("pad_token", EOS_TOKEN))}
        kw["context_length"] = int(context_length or text_cfg.get("max_position_embeddings")
                                   or DEFAULT_CONTEXT)
        kw["vocab_size"] = text_cfg.get("vocab_size")
        tj = path if path.endswith(".json") and os.path.isfile(path) else os.path.join(folder, "tokenizer.json")
        if os.path.isfile(tj):
            try:
                tok = Tokenizer.from_file(tj)
            except Exception as e:
                raise TokenizerError(f"{tj}: not a readable tokenizer.json ({e})") from e
            return cls(tok, **kw)
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return cls.from_files(vocab, merges, **kw)
        raise TokenizerError(
            f"{path}: no tokenizer.json, nor vocab.json + merges.txt; expected an HF SAM 3 snapshot")

    # ---- use --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, prompt: str) -> List[str]:
        """The BPE tokens of one prompt (no start/end tokens, no truncation)."""
        return self._tok.encode(clean(self._check(prompt, 0)), add_special_tokens=False).tokens

    def __call__(self, prompts: Union[str, Sequence[str]]) -> TokenizedPrompts:
        """One prompt (``str``) or a list of prompts -> ``TokenizedPrompts`` with one row each."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray)):
            raise TypeError("prompts must be str, not bytes: decode them first")
        elif not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given")
        texts = [clean(self._check(p, i)) for i, p in enumerate(prompts)]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        n, ctx = len(texts), self.context_length
        ids = np.full((n, ctx), self.pad_id, np.int32)
        mask = np.zeros((n, ctx), np.int32)
        out = TokenizedPrompts(ids, mask)
        for i, enc in enumerate(encs):
            body = list(enc.ids)
            if not body:
                raise ValueError(f"prompt {i} ({prompts[i]!r}) is empty: nothing to look for")
            keep = body[:ctx - 2]
            row = [self.bos_id] + keep + [self.eos_id]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
            out.truncated.append(len(keep) < len(body))
            out.dropped.append(len(body) - len(keep))
        return out

    @staticmethod
    def _check(prompt, index: int) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r}")
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty: nothing to look for")
        return prompt
