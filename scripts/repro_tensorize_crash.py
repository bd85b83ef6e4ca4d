"""Minimal repro of the s_tir Tensorize segfault, and the check that it is gone.

    .venv/bin/python scripts/repro_tensorize_crash.py [step ...]

Each step runs in a child process (a segfault kills only it) and prints OK / CRASH.
With ``apache-tvm-ffi`` 0.1.15.x (what pip picks for apache-tvm 0.27.0.post1, which
only asks for ``>=0.1.14.post0``) steps 1 to 4 CRASH; with the pinned
``apache-tvm-ffi==0.1.14.post1`` all steps pass:

1. ``save_json`` of a 1-statement ``tirx.PrimFunc``
2. ``save_json`` of a ``tirx.Var``
3. ``save_json`` of the wmma load intrinsic's description
4. ``dlight.gpu.Matmul`` on a 512x1024x1024 fp16 matmul for cuda ``sm_90``
   (tensor-core path ``MatmulTensorization`` -> ``sch.tensorize``);
   gdb on the crash: SIGSEGV in ``tvm::ffi::ToJSONGraph`` (libtvm_ffi.so) called
   from ``tvm::s_tir::Tensorize``, which deep-copies the intrinsic through JSON.
5. the same for ``sm_90a``: never crashes, but prints ``tensor cores used: False``:
   ``Matmul`` reads the arch as digits (``"90a"`` -> -1) and takes the SIMT schedule.

Cause: libtvm_compiler.so of the 0.27.0.post1 wheel and libtvm_ffi.so of
apache-tvm-ffi 0.1.15.x disagree on the object layout ``ToJSONGraph`` walks; no
schedule or workload is at fault. See docs/kernels.md.
"""

import subprocess
import sys

STEPS = {
    "1": ("save_json(PrimFunc)", """
import tvm
from tvm import te
a = te.placeholder((16,), "float16", name="a")
c = te.compute((16,), lambda i: a[i], name="c")
tvm.ir.save_json(te.create_prim_func([a, c]))
"""),
    "2": ("save_json(tirx.Var)", """
import tvm
tvm.ir.save_json(tvm.tirx.Var("x", "int32"))
"""),
    "3": ("save_json(wmma_load_16x16x16_f16_a_shared desc)", """
import tvm
import tvm.s_tir.tensor_intrin.cuda as c
from tvm.s_tir import TensorIntrin
tvm.ir.save_json(TensorIntrin.get(c.WMMA_LOAD_16x16x16_F16_A_INTRIN).desc)
"""),
    "4": ("dlight gpu.Matmul, cuda sm_90", None),
    "5": ("dlight gpu.Matmul, cuda sm_90a", None),
}

MATMUL = """
import tvm
from tvm import te
from tvm.s_tir import dlight as dl
a = te.placeholder((512, 1024), "float16", name="a")
b = te.placeholder((1024, 1024), "float16", name="b")
r = te.reduce_axis((0, 1024), name="k")
c = te.compute((512, 1024), lambda i, j: te.sum(a[i, r].astype("float32") * b[j, r].astype("float32"), axis=r), name="c")
d = te.compute((512, 1024), lambda i, j: c[i, j].astype("float16"), name="d")
mod = tvm.IRModule({"main": te.create_prim_func([a, b, d])})
with tvm.target.Target({"kind": "cuda", "arch": "ARCH"}):
    mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
print("tensor cores used:", "mma" in mod.script() or "wmma" in mod.script())
"""


def main():
    from importlib.metadata import version

    print(f"apache-tvm {version('apache-tvm')}, apache-tvm-ffi {version('apache-tvm-ffi')}")
    steps = sys.argv[1:] or list(STEPS)
    for s in steps:
        title, code = STEPS[s]
        if code is None:
            code = MATMUL.replace("ARCH", "sm_90" if s == "4" else "sm_90a")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        status = "OK" if p.returncode == 0 else ("CRASH (signal %d)" % -p.returncode if p.returncode < 0
                                                 else "ERROR rc=%d" % p.returncode)
        extra = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
        print(f"{s}. {title}: {status} {' '.join(extra)}", flush=True)


if __name__ == "__main__":
    main()
