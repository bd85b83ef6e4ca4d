#!/usr/bin/env python3
"""SAM 3 end to end: our compiled library vs PyTorch (``transformers`` ``Sam3Model``), one run.

Same machine, same random weights (``Sam3Model``'s own initialisation, seeded, mapped onto
our parameters by our loader ``sam3_nn.weights`` from the in-memory state dict), same
inputs. Parts timed, each for every ``--batch`` size:

* ``vision``   -- ``encode_image`` vs ``Sam3Model.vision_encoder`` (ViT + FPN neck);
* ``text``     -- ``encode_text`` vs ``Sam3Model.get_text_features`` (CLIP text + resizer);
* ``detect``   -- ``detect`` vs ``Sam3Model(vision_embeds=..., text_embeds=...)``: DETR
  encoder/decoder + scoring + mask heads, given the (fp32 reference's) image and text
  features, text prompt only (plus one padded box slot, so that the reference runs the
  geometry encoder on no box as the original SAM 3 does, docs/fidelity.md);
* ``pipeline`` -- image + text prompt: the three in sequence (our functions chained on the
  device; PyTorch: ``vision_encoder`` -> ``get_text_features`` -> the detector call, the same
  work as ``Sam3Model(pixel_values, input_ids)``; with ``torch.compile``, its three compiled
  parts). Pre/post-processing is not included on either side.

GPU (``--device cuda``): ours float16 (the library's dtype) vs PyTorch float16 and bfloat16
(SDPA attention), eager and ``torch.compile`` (default mode, static shapes; compile time is
reported, not timed). CPU (``--device cpu``): ours float32 (llvm) vs PyTorch float32 eager.

Method. Times are medians of ``--runs`` calls after ``--warmup`` calls, measured with host
clocks and a device synchronisation before starting and before reading the clock (GPU:
``torch.cuda.synchronize``, which waits for TVM's work too). Defaults: GPU 20 runs after 3;
CPU 1 run after 1 (a full-size PyTorch vision encoder takes ~33 s on the 2-core machine,
so CPU figures are single runs). TFLOP/s are effective: the analytic FLOP count of the
reference's work (``bench/flops.py``; vision ~5.6 TFLOP per 1008 px image, 5.4 of it the
ViT trunk) over the time, the same count for both sides. Peak memory (GPU only) is the
weights plus the extra device memory one call needs: PyTorch,
``torch.cuda.max_memory_allocated`` over the call minus what was allocated before it; ours,
the drop in free device memory (``cudaMemGetInfo``) over two calls of a fresh VM after TVM's
pooled allocator was emptied (``vm.builtin.memory_manager.clear``): the planned buffers a
CUDA graph keeps, the pool's growth and CUTLASS's workspace, so at least the call's peak.
Accuracy: every side's outputs of its last timed call against the float32 reference (GPU: ``Sam3Model`` fp32, TF32 off; CPU: the PyTorch side), as
``max |x - ref| / max |ref|`` per output; PyTorch's own fp16/bf16 rows show what the
precision alone costs.

Run here (CPU, full TVM; compiles the llvm library first, ``make bench`` does this):

    .venv/bin/python bench/pipeline.py --device cpu                       # 1008 px, batch 1
    .venv/bin/python bench/pipeline.py --device cpu --config tiny --runs 3  # quick (~1 min)
    .venv/bin/python bench/pipeline.py --device cpu --parts vision,text --library dist/sam3-llvm.so

GPU: compile here, run on the accelerator machine with the runtime-only TVM bundle. One
``--batch`` size with ``--build`` compiles a library for that size only (static shapes:
memory planned ahead of time, CUDA graphs), as ``compile.py`` does by default; rows of
other batch sizes are skipped for such a library:

    .venv/bin/python bench/pipeline.py --device cuda --build build/bench/b1 --target cuda-sm90a --batch 1
    bash ../shared/device/bundle.sh                      # -> .devbundle/ (27 MB)
    # device `run`, carry [".devbundle", "build/bench/b1"]:
    export PYTHONPATH=$PWD/.devbundle/site:$PWD PYTHONUNBUFFERED=1; \\
    python3 bench/pipeline.py --device cuda --library build/bench/b1/sam3-cuda-sm90a.so \\
        --batch 1 --out $OUT/b1.json
    # the same with --batch 4 (build/bench/b4) --out $OUT/b4.json; then here:
    .venv/bin/python bench/pipeline.py --merge b1.json b4.json

The model config comes from the library's manifest when ``--library``/``--manifest`` is
given, else from ``--config full|tiny`` with ``--image-size``/``--layers``. torch.compile of
the vision encoder takes about a minute per dtype and batch size: a full GPU run at both
batch sizes does not fit one 10-minute device call; split it by ``--batch`` (or use
``--dtypes``/``--skip-compile-torch``) and ``--merge`` the result files.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
from sam3_nn.runtime.api import channel_first  # noqa: E402
import flops  # noqa: E402

PARTS = ("vision", "text", "detect", "pipeline")
LIB_PARTS = {"vision": ("vision",), "text": ("text",), "detect": ("detector",),
             "pipeline": ("vision", "text", "detector")}
FUNCTIONS = {"vision": ("encode_image",), "text": ("encode_text",), "detect": ("detect",),
             "pipeline": ("encode_image", "encode_text", "detect")}
DETECT_OUT = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")
DTYPE_ORDER = ["float32", "float16", "bfloat16"]
TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
                "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def output_names(part: str, cfg) -> List[str]:
    if part == "vision":
        return [f"fpn_hidden_states.{i}" for i in range(len(cfg.vision.scale_factors))]
    if part == "text":
        return ["text_features"]
    return list(DETECT_OUT)


# ----------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"], default="full",
                    help="model size when no library is given (tiny: the tests' config)")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default: the config's, 1008)")
    ap.add_argument("--layers", type=int, default=None, help="fewer ViT blocks (default: all)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default: cuda 1,4; cpu 1)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per row (default: cuda 20, cpu 1)")
    ap.add_argument("--warmup", type=int, default=None, help="calls before timing (default: cuda 3, cpu 1)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--dtypes", default=None,
                    help="PyTorch dtypes (default: cuda float16,bfloat16; cpu float32)")
    ap.add_argument("--library", default=None, help="a prebuilt library (its .json manifest beside it)")
    ap.add_argument("--manifest", default=None, help="a prebuilt library's manifest (the library beside it)")
    ap.add_argument("--skip-compile-torch", action="store_true", help="GPU: no torch.compile rows")
    ap.add_argument("--skip-ours", action="store_true", help="PyTorch rows only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (both sides)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write all results (JSON) here")
    ap.add_argument("--build", metavar="DIR", default=None,
                    help="only compile the library for --device's target into DIR (needs full TVM)")
    ap.add_argument("--target", default=None, help="with --build or a CPU run: target preset "
                    "(default: cuda for --device cuda, llvm for cpu)")
    ap.add_argument("--arch", default=None, help="with --build: CUDA SASS arches, e.g. sm_90a")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="print one table from result files of earlier runs, and exit")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.batch = args.batch or ("1,4" if gpu else "1")
    try:
        args.batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if not args.batches or min(args.batches) < 1:
        ap.error("--batch needs positive batch sizes")
    args.runs = args.runs if args.runs is not None else (20 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    args.part_list = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(args.part_list) - set(PARTS))
    if bad or not args.part_list:
        ap.error(f"unknown --parts {bad}; choose from {', '.join(PARTS)}")
    args.part_list = [p for p in PARTS if p in args.part_list]
    dtypes = args.dtypes or ("float16,bfloat16" if gpu else "float32")
    try:
        args.dtype_list = [TORCH_DTYPES[d.strip()] for d in dtypes.split(",") if d.strip()]
    except KeyError as e:
        ap.error(f"unknown dtype {e}; choose from {', '.join(TORCH_DTYPES)}")
    if not gpu and args.dtype_list != ["float32"]:
        ap.error("the CPU comparison is float32 only")
    if args.library and args.manifest:
        ap.error("give --library or --manifest, not both")
    if (args.library or args.manifest) and (args.layers is not None or args.image_size
                                            or args.config != "full"):
        ap.error("--config/--image-size/--layers describe a model to build; a prebuilt "
                 "library's manifest already fixes them")
    args.target = args.target or ("cuda" if gpu else "llvm")
    return args


def library_path(args) -> Optional[str]:
    if args.manifest:
        with open(args.manifest) as f:
            m = json.load(f)
        return os.path.join(os.path.dirname(os.path.abspath(args.manifest)), m["library"])
    return args.library


# ----------------------------------------------------------------------------
# TVM runtime
# ----------------------------------------------------------------------------
def load_tvm_cuda_runtime() -> None:
    """A runtime-only TVM needs its CUDA loader loaded by hand (see platform notes)."""
    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")


class Ours:
    """Our compiled library with the reference's weights bound."""

    label = "sam3_nn"

    def __init__(self, library: str, cfg, state_dict, gpu: bool, log):
        if gpu:
            load_tvm_cuda_runtime()
        import tvm

        from sam3_nn.runtime.engine import CompiledModel

        self.tvm, self.gpu = tvm, gpu
        self.lib = CompiledModel(library)
        self.manifest = self.lib.manifest
        self.dtype = self.lib.dtype
        self.mode = self.manifest["target"]
        self.functions = set(self.manifest["functions"])
        t = time.perf_counter()
        params = common.our_params(cfg, state_dict, self.manifest)
        self.weight_bytes = sum(int(a.nbytes) for a in params.values())
        self._bind_streaming(params)
        log(f"  ours: {library} ({self.manifest['target']}, {self.dtype}, parts "
            f"{','.join(self.manifest['parts'])}); {self.weight_bytes / 2**20:.0f} MiB of weights "
            f"bound in {time.perf_counter() - t:.1f} s")
        self.n_slots = 0
        if "detect" in self.functions:
            spec = {i["name"]: i for i in self.manifest["functions"]["detect"]["inputs"]}
            self.n_slots = int(spec["boxes"]["shape"][1])
            self.detect_inputs = spec
        import tvm_ffi

        self._clear = tvm_ffi.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)

    def _bind_streaming(self, params: Dict[str, np.ndarray]) -> None:
        """``CompiledModel.bind``'s checks, but each host array is dropped once it is on the
        device: the full-size float32 CPU run then never holds the weights twice (plus the
        reference model) in host memory."""
        want = self.manifest["params"]
        bad = [p["name"] for p in want if p["name"] not in params
               or list(params[p["name"]].shape) != p["shape"] or str(params[p["name"]].dtype) != p["dtype"]]
        extra = sorted(set(params) - {p["name"] for p in want})
        if bad or extra:
            raise ValueError(f"weights do not fit the library: missing or mis-shaped {bad[:8]}, extra {extra[:8]}")
        tensors = []
        for p in want:
            tensors.append(self.tvm.runtime.tensor(np.ascontiguousarray(params.pop(p["name"])), self.lib.device))
        self.lib.params = tensors

    def supports(self, part: str) -> bool:
        return all(f in self.functions for f in FUNCTIONS[part])

    def tensor(self, a: np.ndarray, dtype: Optional[str] = None):
        return self.tvm.runtime.tensor(np.ascontiguousarray(a.astype(dtype or a.dtype)), self.lib.device)

    def prepare(self, inputs: Dict, refs) -> Dict:
        b = inputs["pixels"].shape[0]
        d = {"pixels": self.tensor(inputs["pixels"], self.dtype),
             "ids": self.tensor(inputs["ids"], "int32"), "mask": self.tensor(inputs["mask"], "int32")}
        if self.n_slots:
            d["boxes"] = self.tensor(np.zeros((b, self.n_slots, 4), np.float32))
            d["box_labels"] = self.tensor(np.zeros((b, self.n_slots), np.int32))
            d["box_mask"] = self.tensor(np.zeros((b, self.n_slots), np.int32))
        return d

    def prepare_detect(self, d: Dict, refs) -> None:
        maps = refs.get("vision")  # the reference's maps, channel first; ours are channel last
        d["maps"] = [self.tensor(np.transpose(m, (0, 2, 3, 1)), self.dtype) for m in maps[:3]]
        d["text"] = self.tensor(refs.get("text")[0], self.dtype)

    def fn(self, part: str, d: Dict):
        call = self.lib.call_device

        def detect(maps, text, tmask):
            return call("detect", maps[0], maps[1], maps[2], text, tmask,
                        d["boxes"], d["box_labels"], d["box_mask"])

        if part == "vision":
            return lambda: call("encode_image", d["pixels"])
        if part == "text":
            return lambda: call("encode_text", d["ids"], d["mask"])
        if part == "detect":
            return lambda: detect(d["maps"], d["text"], d["mask"])

        def pipeline():
            maps = call("encode_image", d["pixels"])
            text, tmask = call("encode_text", d["ids"], d["mask"])
            return detect(maps, text, tmask)

        return pipeline

    def outputs(self, part: str, out) -> List[np.ndarray]:
        out = [common.to_numpy(o) for o in out]
        if part == "text":
            out = out[:1]
        if part == "vision":  # encode_image's maps are channel last, the reference's first
            out = channel_first(out)
        return out

    def supports_batch(self, batch: int) -> bool:
        fixed = self.manifest.get("batch")
        return fixed is None or fixed == batch

    def peak_bytes(self, fn, sync) -> Optional[int]:
        """Weights + what a fresh VM holds after two calls (GPU); None on the CPU.

        A fresh VM starts with no CUDA graph and no planned buffer; TVM's pool is emptied
        first, so the drop of free device memory over the two calls is everything the
        calls keep or need: the statically planned buffers (kept with the CUDA graphs),
        the pool's growth and CUTLASS's workspace."""
        if not self.gpu or self._clear is None:
            return None
        import torch

        self.lib.reset()
        gc.collect()
        sync()
        self._clear()
        sync()
        free0 = torch.cuda.mem_get_info()[0]
        out = fn()
        del out
        out = fn()
        sync()
        used = free0 - torch.cuda.mem_get_info()[0]
        del out
        return self.weight_bytes + max(used, 0)


class TorchSide:
    """``transformers`` ``Sam3Model`` in one dtype, eager or ``torch.compile``d."""

    def __init__(self, model, dtype: str, compiled: bool, device: str):
        self.model, self.dtype, self.compiled, self.device = model, dtype, compiled, device
        self.mode = "compile" if compiled else "eager"
        self.label = "torch"
        self.compile_s: Dict[str, float] = {}
        import torch

        self.torch = torch
        self.tdtype = getattr(torch, dtype)
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in list(model.parameters()) + list(model.buffers()))
        self._fns = {}

    def supports(self, part: str) -> bool:
        return True

    def supports_batch(self, batch: int) -> bool:
        return True

    def _part_fns(self):
        if self._fns:
            return self._fns
        torch = self.torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        m = self.model

        def vision(px):
            o = m.vision_encoder(px)
            return tuple(o.fpn_hidden_states) + tuple(o.fpn_position_encoding)

        def text(ids, mask):
            return m.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

        from transformers.models.sam3 import modeling_sam3

        if getattr(modeling_sam3, "torchvision", None) is None:  # CPU machines: no torchvision
            import types

            import torch_roi_align

            modeling_sam3.torchvision = types.SimpleNamespace(
                ops=types.SimpleNamespace(roi_align=torch_roi_align.roi_align))

        def detect(levels, text_features, mask):
            n = len(levels) // 2
            vo = Sam3VisionEncoderOutput(fpn_hidden_states=tuple(levels[:n]),
                                         fpn_position_encoding=tuple(levels[n:]))
            # one padded box slot (label -10): the geometry encoder runs on no box, as the
            # original runs it for a text prompt (its CLS token joins the prompt: docs/fidelity.md)
            b = text_features.shape[0]
            boxes = text_features.new_zeros(b, 1, 4)
            labels = torch.full((b, 1), -10, dtype=torch.long, device=text_features.device)
            o = m(vision_embeds=vo, text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
                  attention_mask=mask, input_boxes=boxes, input_boxes_labels=labels)
            return (o.pred_logits, o.pred_boxes, o.pred_masks, o.presence_logits, o.semantic_seg)

        fns = {"vision": vision, "text": text, "detect": detect}
        if self.compiled:
            fns = {k: torch.compile(f, dynamic=False) for k, f in fns.items()}
        self._fns = fns
        return fns

    def prepare(self, inputs: Dict, refs) -> Dict:
        torch = self.torch
        return {"pixels": torch.from_numpy(inputs["pixels"]).to(self.device, self.tdtype),
                "ids": torch.from_numpy(inputs["ids"]).to(self.device),
                "mask": torch.from_numpy(inputs["mask"]).to(self.device)}

    def prepare_detect(self, d: Dict, refs) -> None:
        torch = self.torch
        d["levels"] = tuple(torch.from_numpy(a).to(self.device, self.tdtype)
                            for a in refs.get("vision_all"))
        d["text"] = torch.from_numpy(refs.get("text")[0]).to(self.device, self.tdtype)

    def fn(self, part: str, d: Dict):
        f = self._part_fns()
        torch = self.torch

        def wrap(g):
            def run():
                with torch.no_grad():
                    return g()
            return run

        if part == "vision":
            return wrap(lambda: f["vision"](d["pixels"]))
        if part == "text":
            return wrap(lambda: f["text"](d["ids"], d["mask"]))
        if part == "detect":
            return wrap(lambda: f["detect"](d["levels"], d["text"], d["mask"]))
        return wrap(lambda: f["detect"](f["vision"](d["pixels"]), f["text"](d["ids"], d["mask"]), d["mask"]))

    def outputs(self, part: str, out) -> List[np.ndarray]:
        if part == "vision":
            out = out[:len(out) // 2]
        elif part == "text":
            out = [out]
        return [common.to_numpy(o) for o in out]

    def peak_bytes(self, fn, sync) -> Optional[int]:
        torch = self.torch
        if self.device != "cuda":
            return None
        gc.collect()
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        sync()
        extra = torch.cuda.max_memory_allocated() - before
        del out
        return self.weight_bytes + max(extra, 0)


class References:
    """fp32 reference outputs per part for one batch of inputs, computed on demand."""

    def __init__(self, side: "TorchSide", inputs: Dict):
        self.side, self.inputs = side, inputs
        self.cache: Dict[str, List[np.ndarray]] = {}
        self._dev = None

    def put(self, part: str, out) -> None:
        """Outputs of the reference side's own timed call (CPU: the PyTorch side is the reference)."""
        if part == "vision":
            self.cache["vision_all"] = [common.to_numpy(o) for o in out]
        if part not in self.cache:
            self.cache[part] = self.side.outputs(part, out)

    def get(self, part: str) -> List[np.ndarray]:
        if part in self.cache:
            return self.cache[part]
        s = self.side
        if self._dev is None:
            self._dev = s.prepare(self.inputs, self)
        if part in ("vision", "vision_all"):
            self.put("vision", s.fn("vision", self._dev)())
        elif part == "text":
            self.put("text", s.fn("text", self._dev)())
        elif part in ("detect", "pipeline"):
            if "detect" not in self.cache:
                s.prepare_detect(self._dev, self)
                self.put("detect", s.fn("detect", self._dev)())
            return self.cache["detect"]  # the pipeline's reference is the same computation
        return self.cache[part]


# ----------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------
def make_inputs(cfg, batch: int, seed: int) -> Dict:
    rng = np.random.default_rng(seed + 1000 * batch)
    s = cfg.image_size
    ids, mask = common.text_inputs(cfg, batch, seed + batch)
    return {"pixels": rng.standard_normal((batch, 3, s, s)).astype(np.float32), "ids": ids, "mask": mask}


def build_library(args, cfg, parts, out_dir, log) -> str:
    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions

    dtype = "float16" if args.device == "cuda" else "float32"
    # CUDA with one --batch size: a library for that size only (static shapes, CUDA graphs);
    # elsewhere any batch size (0)
    batch = args.batches[0] if len(args.batches) == 1 and args.device == "cuda" else 0
    options = BuildOptions(target=args.target, arch=args.arch, dtype=dtype, batch=batch,
                           parts=tuple(parts))
    art = build(cfg, options, out_dir, log=lambda s: log("  " + s))
    return art["library"]


def run(args) -> Dict:
    log = lambda s: print(s, flush=True)  # noqa: E731
    gpu = args.device == "cuda"
    # --threads is both sides' thread count: set it over sam3_nn's default (one thread per
    # physical core, sam3_nn/cpu_threads.py) before TVM's CPU thread pool starts
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    from sam3_nn.config import Sam3Config

    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dyn = torch._dynamo.config
        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(dyn, key):
                setattr(dyn, key, 64)
        if hasattr(dyn, "accumulated_cache_size_limit"):
            dyn.accumulated_cache_size_limit = 512
        # transformers' detector passes spatial shapes as tensors: dynamo breaks the graph
        # there (counted in the results) and would print a long warning for each break
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    else:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    device = "cuda" if gpu else "cpu"

    lib_path = library_path(args)
    manifest = None
    if lib_path:
        from sam3_nn.runtime.engine import read_manifest

        manifest = read_manifest(lib_path)
        cfg = Sam3Config.from_dict(manifest["config"])
    else:
        cfg = common.model_config(args.config, args.image_size, args.layers)

    log(f"SAM 3 pipeline benchmark: {args.device}, {cfg.image_size} px, "
        f"{cfg.vision.backbone.num_hidden_layers} ViT blocks, batch {args.batch}, parts "
        f"{','.join(args.part_list)}; median of {args.runs} after {args.warmup} warm-up")
    t = time.perf_counter()
    with torch.device(device):
        ref = common.reference_model(cfg, args.seed)
    log(f"  reference Sam3Model (transformers {_version('transformers')}, torch {torch.__version__}, "
        f"{ref.config._attn_implementation} attention) initialised on {device} in "
        f"{time.perf_counter() - t:.1f} s")

    ours = None
    if not args.skip_ours:
        if lib_path is None:
            if gpu:
                raise SystemExit("--device cuda needs a prebuilt --library (compile here with --build)")
            need = sorted({p for part in args.part_list for p in LIB_PARTS[part]},
                          key=["vision", "text", "detector"].index)
            work = tempfile.mkdtemp(prefix="sam3-bench-")
            t = time.perf_counter()
            log(f"  compiling our {args.target} float32 library ({','.join(need)}) into {work}")
            lib_path = build_library(args, cfg, need, work, log)
            log(f"  compiled in {time.perf_counter() - t:.1f} s")
        ours = Ours(lib_path, cfg, ref.state_dict(), gpu, log)

    # PyTorch sides: fp32 reference (GPU: untimed, TF32 off; CPU: the timed side itself)
    sides: List = []
    if ours is not None:
        sides.append(ours)
    ref_side = TorchSide(ref, "float32", False, device)
    if gpu:
        for dt in args.dtype_list:
            m = ref if dt == "float32" else copy.deepcopy(ref).to(getattr(torch, dt))
            sides.append(TorchSide(m, dt, False, device))
            if not args.skip_compile_torch:
                sides.append(TorchSide(m, dt, True, device))
    else:
        sides.append(ref_side)
    sides.sort(key=lambda s: (s.label != "sam3_nn", getattr(s, "compiled", False)))

    rows = []
    for batch in args.batches:
        inputs = make_inputs(cfg, batch, args.seed)
        refs = References(ref_side, inputs)
        fl = flops.part_flops(cfg, batch)
        prepared = {}
        for part in args.part_list:
            names = output_names(part, cfg)
            order = sides if gpu else sorted(sides, key=lambda s: s is not ref_side)
            for side in order:
                name = side_name(side)
                row = {"part": part, "batch": batch, "impl": side.label, "dtype": side.dtype,
                       "mode": side.mode, "flops": fl[part], "runs": args.runs, "warmup": args.warmup}
                if not side.supports(part):
                    row["skipped"] = "library lacks " + ",".join(FUNCTIONS[part])
                elif not side.supports_batch(batch):
                    row["skipped"] = f"library compiled for batch {side.manifest['batch']}"
                if "skipped" in row:
                    rows.append(row)
                    log(f"  {part:8s} b{batch} {name:24s} skipped: {row['skipped']}")
                    continue
                try:
                    d = prepared.get(id(side))
                    if d is None:
                        d = prepared[id(side)] = side.prepare(inputs, refs)
                    if part == "detect" and not d.get("detect_ready"):
                        side.prepare_detect(d, refs)
                        d["detect_ready"] = True
                    fn = side.fn(part, d)
                    if getattr(side, "compiled", False):
                        t = time.perf_counter()
                        fn()
                        sync()
                        row["compile_s"] = round(time.perf_counter() - t, 1)
                    med, times, out = common.timed(fn, args.runs, args.warmup, sync)
                    outs = side.outputs(part, out)
                    if side is ref_side:
                        refs.put(part, out)
                    del out
                    row.update(ms=med * 1e3, times_ms=[x * 1e3 for x in times],
                               spread=common.spread(times), tflops=fl[part] / med / 1e12)
                    peak = side.peak_bytes(fn, sync)
                    if peak is not None:
                        row["peak_mib"] = peak / 2**20
                    want = refs.get(part)
                    row["rel_diff"] = {n: common.rel_diff(o, r) for n, o, r in zip(names, outs, want)}
                    del outs
                except Exception as e:  # keep the other rows: one failing variant is a finding
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    log(f"  {part:8s} b{batch} {name:24s} FAILED: {row['error']}")
                    rows.append(row)
                    continue
                rows.append(row)
                log(f"  {part:8s} b{batch} {name:24s} {row['ms']:10.2f} ms  {row['tflops']:7.2f} TFLOP/s"
                    + (f"  compile {row['compile_s']:.0f} s" if "compile_s" in row else "")
                    + (f"  peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else "")
                    + f"  max rel diff {max(row['rel_diff'].values()):.1e}")
        del refs, prepared
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    info = meta(args, cfg, manifest or (ours.manifest if ours else None), torch)
    if gpu and not args.skip_compile_torch:
        from torch._dynamo.utils import counters

        info["torch_compile_graph_breaks"] = sum(counters["graph_break"].values())
    return {"meta": info, "rows": rows}


def side_name(side) -> str:
    if side.label == "sam3_nn":
        return f"sam3_nn {side.dtype} ({side.mode})"
    return f"torch {side.dtype} {side.mode}"


def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def _tvm_version() -> str:
    try:
        import tvm

        return str(tvm.__version__)
    except Exception:  # noqa: BLE001 - informative only
        return _version("apache-tvm")


def meta(args, cfg, manifest, torch) -> Dict:
    m = {"device": args.device, "host": platform.node(), "python": platform.python_version(),
         "torch": torch.__version__, "transformers": _version("transformers"),
         "tvm": _tvm_version(), "threads": args.threads if args.device == "cpu" else None,
         "image_size": cfg.image_size, "vit_layers": cfg.vision.backbone.num_hidden_layers,
         "config": cfg.to_dict(), "runs": args.runs, "warmup": args.warmup, "seed": args.seed,
         "timing": "median of runs; host clock with a device sync before start and before read",
         "peak_memory": ("torch: weights + max_memory_allocated over one call minus allocated before; "
                         "ours: weights + drop of cudaMemGetInfo free memory over two calls of a fresh "
                         "VM after emptying TVM's memory pool"),
         "accuracy": "max|x-ref|/max|ref| per output vs Sam3Model float32 (TF32 off)",
         "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
    else:
        m["cpu"] = platform.processor() or platform.machine()
    if manifest:
        m["library"] = {k: manifest.get(k) for k in ("target", "dtype", "rope_mode", "parts",
                                                     "sam3_nn_version", "tvm_version", "build_seconds")}
    return m


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------
def _signature(meta: Dict) -> tuple:
    lib = meta.get("library") or {}
    return (meta["device"], meta.get("gpu") or meta.get("cpu"), meta["image_size"], meta["vit_layers"],
            json.dumps(meta.get("config"), sort_keys=True), lib.get("target"), lib.get("dtype"))


def table(results: List[Dict]) -> str:
    """The report: one table per model/device/library over the given result sets (e.g. the
    ``--batch 1`` and ``--batch 4`` runs of one configuration, merged)."""
    groups: Dict[tuple, List[Dict]] = {}
    for res in results:
        groups.setdefault(_signature(res["meta"]), []).append(res)
    return "\n\n".join(_table(g) for g in groups.values())


def _table(results: List[Dict]) -> str:
    lines = []
    for res in results:
        mt = res["meta"]
        where = mt.get("gpu") or f"{mt.get('cpu')} ({mt.get('threads')} threads)"
        lib = mt.get("library") or {}
        batches = sorted({r["batch"] for r in res["rows"]})
        lines.append(f"# {mt['device']}: {where}; torch {mt['torch']}, transformers {mt['transformers']}; "
                     f"ours {lib.get('target', '-')} {lib.get('dtype', '')} (tvm {mt.get('tvm')}); "
                     f"{mt['image_size']} px, {mt['vit_layers']} ViT blocks; batch "
                     f"{','.join(map(str, batches))}: median of {mt['runs']} after {mt['warmup']} warm-up"
                     + (f"; torch.compile graph breaks {mt['torch_compile_graph_breaks']}"
                        if mt.get("torch_compile_graph_breaks") else ""))
    lines.append("# ours/this: our time over this row's time (> 1: ours slower). FLOP/s: analytic "
                 "FLOPs (bench/flops.py) over time.")
    lines.append("# spread: (max - min) / median of the timed runs. peak: weights + extra device memory "
                 "of one call (GPU).")
    lines.append("# diff: max over outputs of max|x-ref|/max|ref| vs float32 PyTorch (the CPU's PyTorch "
                 "row is the reference itself).")
    gflops = all(res["meta"]["device"] == "cpu" for res in results)
    unit, scale = ("GFLOP/s", 1e3) if gflops else ("TFLOP/s", 1.0)
    hdr = (f"{'part':9s}{'batch':>5s}  {'implementation':26s}{'ms':>10s}{unit:>9s}"
           f"{'spread':>7s}{'ours/this':>10s}{'peak MiB':>10s}{'diff':>9s}{'compile s':>10s}")
    lines += [hdr, "-" * len(hdr)]
    rows = sorted((r for res in results for r in res["rows"]),
                  key=lambda r: (PARTS.index(r["part"]), r["batch"], r["impl"] != "sam3_nn",
                                 DTYPE_ORDER.index(r["dtype"]) if r["dtype"] in DTYPE_ORDER else 9,
                                 r["mode"] == "compile"))
    ours = {(r["part"], r["batch"]): r["ms"] for r in rows if r["impl"] == "sam3_nn" and "ms" in r}
    for r in rows:
        name = (f"sam3_nn {r['dtype']} ({r['mode']})" if r["impl"] == "sam3_nn"
                else f"torch {r['dtype']} {r['mode']}")
        head = f"{r['part']:9s}{r['batch']:5d}  {name:26s}"
        if "ms" not in r:
            lines.append(head + ("skipped: " + r["skipped"] if "skipped" in r else "FAILED: " + r.get("error", "")))
            continue
        o = ours.get((r["part"], r["batch"]))
        ratio = f"{o / r['ms']:10.2f}" if o else f"{'-':>10s}"
        peak = f"{r['peak_mib']:10.0f}" if "peak_mib" in r else f"{'-':>10s}"
        diff = max(r["rel_diff"].values()) if r.get("rel_diff") else None
        diff = f"{diff:9.1e}" if diff is not None else f"{'-':>9s}"
        comp = f"{r['compile_s']:10.0f}" if "compile_s" in r else f"{'':>10s}"
        spr = f"{100 * r['spread']:6.0f}%" if "spread" in r else f"{'-':>7s}"
        lines.append(f"{head}{r['ms']:10.2f}{r['tflops'] * scale:9.2f}{spr}{ratio}{peak}{diff}{comp}")
    worst = [(r["part"], r["batch"], n, v) for r in rows if r["impl"] == "sam3_nn"
             for n, v in (r.get("rel_diff") or {}).items()]
    if worst:
        lines.append("ours vs float32 PyTorch, per output (max|x-ref|/max|ref|):")
        for part in PARTS:
            for b in sorted({b for p, b, _, _ in worst if p == part}):
                items = [(n, v) for p, bb, n, v in worst if p == part and bb == b]
                lines.append(f"  {part:9s} b{b}: " + ", ".join(f"{n} {v:.1e}" for n, v in items))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results.append(json.load(f))
        print(table(results))
        return 0
    if args.build:
        cfg = common.model_config(args.config, args.image_size, args.layers)
        need = sorted({p for part in args.part_list for p in LIB_PARTS[part]},
                      key=["vision", "text", "detector"].index)
        path = build_library(args, cfg, need, args.build, print)
        print(f"built {path}: run with --library {path}")
        return 0
    results = run(args)
    text = table([results])
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")
    failed = [r for r in results["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
