"""Shared pieces of the benchmarks: timing, output comparison, model configs, weights.

Nothing here needs the TVM compiler (the device runs a runtime-only TVM); torch and
transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class GpuSampler:
    """``nvidia-smi`` every 50 ms in a thread, from construction until :meth:`close`: SM
    clock (MHz), board power (W) and clock-limit reasons (bit mask), each sample stamped with
    ``time.perf_counter()`` as it arrives. ``device_id`` is the CUDA index; where
    CUDA_VISIBLE_DEVICES narrows the GPUs, nvidia-smi is asked for the first visible one."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"

    def __init__(self, device_id: int = 0):
        import subprocess
        import threading

        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or str(device_id)
        self.samples: List[Tuple[float, float, float, int]] = []  # (stamp, MHz, W, reasons)
        self.error: Optional[str] = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", gpu, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                 "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            self.proc, self.error = None, str(e)
            return
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for ln in self.proc.stdout:
            try:
                mhz, watts, reasons = (f.strip() for f in ln.split(","))
                self.samples.append((time.perf_counter(), float(mhz), float(watts), int(reasons, 16)))
            except ValueError:
                continue

    def between(self, t0: float, t1: float) -> Tuple[float, float]:
        """median W and MHz of the samples stamped in [t0, t1] (nan without samples)"""
        sel = [(w, m) for t, m, w, _ in list(self.samples) if t0 <= t <= t1]
        if not sel:
            return float("nan"), float("nan")
        return float(np.median([w for w, _ in sel])), float(np.median([m for _, m in sel]))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self._reader.join(timeout=2.0)


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
def timed(fn: Callable[[], object], runs: int, warmup: int = 1,
          sync: Optional[Callable[[], None]] = None) -> Tuple[float, List[float], object]:
    """Median wall time of ``fn`` over ``runs`` calls after ``warmup`` calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock is started and
    before it is read, so asynchronous device work is inside the measured interval.
    Returns (median seconds, all times, the last call's result)."""
    sync = sync or (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def spread(times: Sequence[float]) -> float:
    """(max - min) / median of a set of timings: how far apart repeated runs are."""
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else 0.0


# ----------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------
def to_numpy(x) -> np.ndarray:
    """A torch tensor, TVM tensor or array -> float32 (floats) numpy array."""
    from sam3_nn.runtime import ffi

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    elif ffi.is_tensor(x):
        x = ffi.to_numpy(x)
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16" else x


def rel_diff(ours, ref) -> float:
    """``max |ours - ref| / max |ref|`` (NaN or a shape mismatch gives inf)."""
    a, b = to_numpy(ours).astype(np.float64), to_numpy(ref).astype(np.float64)
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


# ----------------------------------------------------------------------------
# model configs: ours (sam3_nn.config) <-> transformers' Sam3Config
# ----------------------------------------------------------------------------
def model_config(preset: str = "full", image_size: Optional[int] = None, layers: Optional[int] = None):
    """Our ``Sam3Config``: ``full`` (released sizes) or ``tiny`` (the tests' config), with
    the ViT input size and block count optionally changed (global blocks: the released
    indexes below ``layers``, else the last block)."""
    from sam3_nn.config import Sam3Config

    if preset == "full":
        cfg = Sam3Config()
    elif preset == "tiny":
        from sam3_nn.config import TINY_HF

        cfg = Sam3Config.from_hf(copy.deepcopy(TINY_HF))
    else:
        raise ValueError(f"unknown model config {preset!r}; expected full or tiny")
    bb = cfg.vision.backbone
    if image_size:
        bb.image_size = image_size
    if layers is not None:
        keep = [i for i in bb.global_attn_indexes if i < layers]
        bb.num_hidden_layers = layers
        bb.global_attn_indexes = keep or [layers - 1]
    return cfg.validate()


def hf_config_dict(cfg) -> Dict:
    """Our config -> the ``transformers`` ``Sam3Config`` keyword arguments."""
    from sam3_nn.config import _HF_SECTIONS  # HF section -> ours

    d = cfg.to_dict()
    bb = dict(d["vision"]["backbone"])
    bb["model_type"] = "sam3_vit_model"
    bb["rope_parameters"] = {"rope_theta": bb.pop("rope_theta"), "rope_type": "axial"}
    vision = {k: v for k, v in d["vision"].items() if k != "backbone"}
    out = {"vision_config": {**vision, "backbone_config": bb},
           "text_config": {**d["text"], "model_type": "clip_text_model"}}
    for hf_name, ours in _HF_SECTIONS.items():
        if ours != "text":
            out[hf_name] = dict(d[ours])
    return out


def hf_config(cfg, attn_implementation: Optional[str] = "sdpa"):
    """``transformers.Sam3Config`` for our config; checked to map back to the same config."""
    from transformers import Sam3Config as HFSam3Config

    from sam3_nn.config import Sam3Config

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = HFSam3Config(**hf_config_dict(cfg), **kw)
    back = Sam3Config.from_hf(hf.to_dict()).to_dict()
    if back != cfg.to_dict():
        diff = [k for k in back if back[k] != cfg.to_dict()[k]]
        raise ValueError(f"transformers' Sam3Config does not reproduce our config (sections {diff})")
    return hf


def reference_model(cfg, seed: int = 0, attn_implementation: Optional[str] = "sdpa"):
    """``transformers`` ``Sam3Model`` with its own random initialisation (seeded), fp32, eval."""
    import torch
    from transformers import Sam3Model as HFSam3Model

    torch.manual_seed(seed)
    return HFSam3Model(hf_config(cfg, attn_implementation)).eval()


def state_dict_source(state_dict, name: str = "<torch state dict>"):
    """A ``sam3_nn.weights`` tensor source over an in-memory ``transformers`` state dict, so
    our declarative loader maps it exactly as it maps an HF snapshot (no files written)."""
    from sam3_nn.weights import TensorSource

    meta = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}

    def read(k: str) -> np.ndarray:
        return state_dict[k].detach().float().cpu().numpy()

    return TensorSource(name, "hf", meta, read)


def our_params(cfg, state_dict, manifest) -> Dict[str, np.ndarray]:
    """Our library's parameters (its dtype) from a ``Sam3Model`` state dict, through the loader."""
    from sam3_nn.weights import load_params

    expected = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in manifest["params"]}
    params, _ = load_params(cfg, state_dict_source(state_dict), expected, manifest["parts"])
    return params


def text_inputs(cfg, batch: int, seed: int = 0, words: int = 6) -> Tuple[np.ndarray, np.ndarray]:
    """Random prompts of ``words`` tokens between BOS and EOS, padded to the text context:
    ``(input_ids, attention_mask)`` int64 ``[batch, L]``."""
    t = cfg.text
    L = t.max_position_embeddings
    rng = np.random.default_rng(seed)
    n = min(words, L - 2)
    ids = np.full((batch, L), t.pad_token_id, np.int64)
    mask = np.zeros((batch, L), np.int64)
    ids[:, 0] = t.bos_token_id
    ids[:, 1:1 + n] = rng.integers(2, min(t.bos_token_id, t.vocab_size) - 1, (batch, n))
    ids[:, 1 + n] = t.eos_token_id
    mask[:, :2 + n] = 1
    return ids, mask


def finish_run(results: dict, ok_all: bool, result_dir: Optional[str], name: str) -> dict:
    """A kernel bench's ``run`` ending: the verdict line, and ``results`` written to
    ``result_dir/name`` when a folder is given."""
    results["all_ok"] = ok_all
    print("checks:", "all ok" if ok_all else "FAILURES")
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
        with open(os.path.join(result_dir, name), "w") as f:
            json.dump(results, f, indent=1)
    return results


def build_or_run_main(doc: str, build: Callable[[str], object],
                      run: Callable[[str, Optional[str]], object]) -> None:
    """``script build DIR`` / ``script run DIR [--out RESULTS_DIR]`` (the kernel benches
    that compile here and run on the accelerator machine)."""
    argv = sys.argv
    if len(argv) < 3 or argv[1] not in ("build", "run"):
        sys.exit(doc)
    if argv[1] == "build":
        build(argv[2])
    else:
        run(argv[2], argv[argv.index("--out") + 1] if "--out" in argv else None)
