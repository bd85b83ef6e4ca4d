#!/usr/bin/env python3
"""Compile SAM 3 into a native library for one target.

    python compile.py --target T [--arch sm_80,sm_90] [--model PATH]
                      [--dtype float32|float16] [--image-size N] [--parts vision,text,detector]
                      [--rope-mode inline|normal] [--batch 1|N|any] [--no-cuda-graph]
                      [--output dist]
    python compile.py --list-targets

Targets (sam3_nn/targets.py, docs/targets.md): llvm, llvm-aarch64, llvm-macos, metal,
metal-ios, cuda (sm_80 + sm_90 fatbin; --arch for others), cuda-sm90a, opencl.

Writes ``DIR/sam3-<target>.<ext>`` and ``DIR/sam3-<target>.json`` (the manifest).
``--batch`` fixes the batch size the functions take; static shapes let TVM plan every
intermediate buffer ahead of time and, on CUDA, replay each call as CUDA graphs (default:
1 on CUDA targets; ``any``, one library for every batch size, elsewhere).
``--model`` only decides the architecture (HF snapshot directory, config.json,
sam3.pt or a hub id); without it the released SAM 3 architecture is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def resolve_config(model: str | None):
    """Architecture from --model; raises ValueError / FileNotFoundError with the reason."""
    from sam3_nn.config import Sam3Config

    if model is None:
        return Sam3Config()
    if os.path.exists(model):
        return Sam3Config.from_pretrained(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        except Exception as e:  # offline, gated, unknown id
            raise ValueError(
                f"cannot fetch config.json of {model!r} from the hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Download the snapshot and pass its directory."
            )
        return Sam3Config.from_pretrained(path)
    raise FileNotFoundError(f"--model {model!r}: no such file or directory")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--arch", default=None, help="cuda targets: SASS arches, e.g. sm_80,sm_90a")
    ap.add_argument("--parts", default=None, help="comma-separated model parts (default: all)")
    ap.add_argument("--list-targets", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16"])
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rope-mode", default=None, choices=["normal", "inline"],
                    help="ViT attention path (default: the target's, inline on GPUs)")
    ap.add_argument("--batch", default=None,
                    help="the batch size the library takes: an integer (static shapes: memory "
                         "planned ahead of time, CUDA graphs on CUDA) or 'any' (default: 1 on "
                         "CUDA targets, any elsewhere)")
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="CUDA targets: launch kernels one by one instead of replaying CUDA graphs")
    ap.add_argument("--output", default="dist")
    args = ap.parse_args(argv)

    from sam3_nn.compiler import build
    from sam3_nn.model import PARTS
    from sam3_nn.targets import PRESETS, UNSUPPORTED, TargetError, get_preset

    if args.list_targets:
        for name, p in PRESETS.items():
            print(f"{name:14s} {p.default_dtype:8s} .{p.suffix:6s} {p.description}")
        for name, why in UNSUPPORTED.items():
            print(f"{name:14s} (not supported: {why})")
        return 0
    try:
        preset = get_preset(args.target, args.arch)
        preset.check_tools()
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        batch = (preset.default_batch if args.batch is None
                 else None if args.batch == "any" else int(args.batch))
        if batch is not None and batch < 1:
            raise ValueError
    except ValueError:
        print(f"error: --batch must be a positive integer or 'any', got {args.batch!r}", file=sys.stderr)
        return 2
    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else PARTS
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        print(f"error: unknown --parts {bad}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(args.model)
        if args.image_size:
            cfg.vision.backbone.image_size = args.image_size
            cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        art = build(cfg, args.target, args.dtype, args.rope_mode, args.output,
                    log=lambda s: print(s, flush=True), parts=parts, arch=args.arch,
                    batch=batch, cuda_graph=not args.no_cuda_graph)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = os.path.getsize(art["library"]) / 2**20
    print(f"built {art['library']} ({size:.1f} MiB) + {art['manifest']} "
          f"[{preset.name}, {args.dtype or preset.default_dtype}] in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
