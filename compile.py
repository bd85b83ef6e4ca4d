#!/usr/bin/env python3
"""Compile SAM 3 into a native library for one target: ``sam3-nn compile`` (sam3_nn.cli).

    python compile.py --target T [--arch sm_80,sm_90] [--model PATH] [--dtype float32|float16]
                      [--image-size N] [--parts vision,text,detector] [--rope-mode inline|normal]
                      [--batch 1|N|any] [--max-boxes N] [--no-cuda-graph] [--output dist]
    python compile.py --list-targets
"""

import sys

from sam3_nn.cli import main

if __name__ == "__main__":
    sys.exit(main(["compile", *sys.argv[1:]]))
