#!/usr/bin/env python3
"""Compile SAM 3 into a native library for one target.

    python compile.py --target llvm [--model PATH] [--dtype float32|float16]
                      [--rope-mode inline|normal] [--output dist]

Writes ``DIR/sam3-<target>.<ext>`` and ``DIR/sam3-<target>.json`` (the manifest).
``--model`` only decides the architecture (HF snapshot directory, config.json,
sam3.pt or a hub id); without it the released SAM 3 architecture is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def resolve_config(model: str | None):
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
            raise SystemExit(
                f"error: cannot fetch config.json of {model!r} from the hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Download the snapshot and pass its directory."
            )
        return Sam3Config.from_pretrained(path)
    raise SystemExit(f"error: --model {model!r}: no such file or directory")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16"])
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rope-mode", default="normal", choices=["normal", "inline"])
    ap.add_argument("--output", default="dist")
    args = ap.parse_args(argv)

    from sam3_nn.compiler import build
    from sam3_nn.targets import TargetError, get_preset

    try:
        get_preset(args.target)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
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
    art = build(cfg, args.target, args.dtype, args.rope_mode, args.output,
                log=lambda s: print(s, flush=True))
    size = os.path.getsize(art["library"]) / 2**20
    print(f"built {art['library']} ({size:.1f} MiB) + {art['manifest']} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
