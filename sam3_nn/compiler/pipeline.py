"""The pass pipeline of each target kind, in order (as MLC-LLM's ``compiler_pass/pipeline.py``).

1. routing: the model's operators and GEMM-shaped ops to the target's kernels
   (``sam3_nn.kernels.cpu``, ``sam3_nn.kernels.cuda``, ``sam3_nn.kernels.portable`` for other
   GPUs), then a check that no operator was left without a route;
2. llvm: polynomial exp/erf/softmax (vectorizable; libm's are scalar calls);
3. the weight-only work of every function lifted into a transform run once at bind time
   (``sam3_nn.compiler.passes.param_transform``);
4. TVM's library dispatch, legalization and fusion, then dlight schedules for what no
   kernel of ours took (GPU rules, or the CPU rules);
5. TVM's dataflow lowering and finalize passes, with its CUDA-graph rewrite replaced by ours
   and the arena memory planner after its static planner (``sam3_nn.compiler.passes``).

The Tensorize segfault
----------------------
TVM 0.27's default Metal pipeline crashed in ``s_tir::Tensorize`` for a plain matmul
(``dl.gpu.Matmul`` -> ``MetalMatmul`` -> ``sch.tensorize``); CUDA's tensor-core rule
(``MatmulTensorization``) too. Cause: ``Tensorize`` deep-copies the intrinsic with
``ToJSONGraph``, which lives in ``libtvm_ffi.so`` (package ``apache-tvm-ffi``).
``apache-tvm==0.27.0.post1`` accepts any ``apache-tvm-ffi>=0.1.14.post0``, and the
0.1.15 releases are not ABI-compatible with ``libtvm_compiler.so`` there: even
``tvm.ir.save_json(tirx.Var)`` segfaults. ``apache-tvm-ffi==0.1.14.post1`` fixes it
(``make install`` pins it; ``scripts/repro_tensorize_crash.py`` reproduces). So the
GPU presets keep the fast simdgroup / tensor-core matmul rules, and fall back to the
plain (non-tensorized) dlight matmul schedule when :func:`tensorize_works` finds the
broken combination, rather than crash.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from sam3_nn.compiler.options import BuildOptions, KernelOptions, Toolchain
from sam3_nn.compiler.passes.cuda_graph import rewrite_cuda_graph
from sam3_nn.compiler.passes.memory_plan import arena_pass
from sam3_nn.compiler.passes.param_transform import lift_pass
from sam3_nn.kernels import cpu as cpu_kernels
from sam3_nn.kernels import cuda as cuda_kernels
from sam3_nn.kernels import portable
from sam3_nn.kernels.rewrite import check_routed_pass, route_ops_pass

_PROBE = "import tvm\ntvm.ir.save_json(tvm.tirx.Var('x', 'int32'))\n"

# targets whose planned storages are merged into one arena per function (memory_plan); the
# others keep TVM's storages (Metal, Vulkan and OpenCL address buffers, not offsets, and are
# not measured here)
ARENA_TARGETS = ("cuda", "llvm")


@functools.lru_cache(maxsize=None)
def tensorize_works() -> bool:
    """Whether ``sch.tensorize`` can run in this environment (it segfaults with the
    apache-tvm-ffi 0.1.15 releases; see the module docstring). Probed once, in a
    subprocess, because the failure is a crash."""
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def routing_passes(target: tvm.target.Target, kernels: KernelOptions = KernelOptions(),
                   cuda_arches: Optional[Sequence[str]] = None, toolchain: Toolchain = Toolchain(),
                   log: Callable[[str], None] = lambda s: None) -> List[tvm.transform.Pass]:
    """The passes routing the model's operators to kernels on ``target`` (step 1;
    ``cuda_arches``: a CUDA library's SASS arches, None: the target's own)."""
    kind = target.kind.name
    if kind == "llvm":
        return cpu_kernels.routing_passes(target, kernels)
    if kind == "cuda":
        return cuda_kernels.routing_passes(target, cuda_arches, kernels, toolchain, log)
    return [route_ops_pass(portable.attention_routes(target, kernels))]


def schedule_rules(target: tvm.target.Target, log: Callable[[str], None] = lambda s: None) -> list:
    """dlight rules for what no kernel of ours took (step 4)."""
    if "gpu" in target.keys:
        if tensorize_works():
            matmul = [_SafeMatmul()]
        else:
            log("  warning: tensorize is broken in this environment (apache-tvm-ffi "
                ">= 0.1.15 with apache-tvm 0.27: run `make install`); using non-tensorized "
                "matmul schedules")
            matmul = [_PlainMatmul()]
        return matmul + [_SafeGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                         dl.gpu.Fallback()]
    if target.kind.name == "llvm":
        return cpu_kernels.schedule_rules()
    return []


def _backend(target: tvm.target.Target):
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    elif "gpu" in target.keys:
        from tvm.relax.backend.gpu_generic import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    return backend


def finalize_passes(backend, target: tvm.target.Target) -> list:
    """The backend's finalize passes, with TVM's RewriteCUDAGraph replaced by ours, which
    gives the small exported functions CUDA-graph storages of their own
    (sam3_nn.compiler.passes.cuda_graph), and, on ``ARENA_TARGETS``, the arena planner after
    TVM's ``StaticPlanBlockMemory`` (sam3_nn.compiler.passes.memory_plan)."""
    passes = []
    for p in backend.finalize_passes(target):
        passes.append(rewrite_cuda_graph if p.info.name == "RewriteCUDAGraph" else p)
        if p.info.name == "StaticPlanBlockMemory" and target.kind.name in ARENA_TARGETS:
            passes.append(arena_pass)
    return passes


def build_pipeline(preset, options: BuildOptions, log: Callable[[str], None] = lambda s: None,
                   lift: Sequence[str] = ()) -> tvm.transform.Pass:
    """The whole Relax pipeline of ``preset`` for ``options`` (steps 1-5); ``lift``:
    the functions whose weight-only work is lifted (step 3)."""
    target = preset.tvm_target()
    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0, name="sam3_pipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext):
        with target:
            legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                        relax.transform.FuseTIR()]
            rules = schedule_rules(target, log)
            if rules:
                legalize.append(dl.ApplyDefaultSchedule(*rules))
            seq = tvm.transform.Sequential(
                routing_passes(target, options.kernels, preset.cuda_arches or None,
                               options.toolchain, log)
                + [check_routed_pass(preset.name)]
                + (cpu_kernels.math_passes() if target.kind.name == "llvm" else [])
                + ([lift_pass(lift)] if lift else [])
                + backend.library_dispatch_passes(target)
                + legalize
                + backend.dataflow_lower_passes(target)
                + finalize_passes(backend, target))
            return seq(mod)

    return _pipeline


def _SafeGEMV():
    """dlight's ``gpu.GEMV``; where it raises (with static shapes: "'Add' object has no
    attribute 'value'" on a split it assumes constant), the next rule schedules the block."""

    class SafeGEMV(dl.gpu.GEMV):
        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a schedule error: Reduction/Fallback take it
                return None

    return SafeGEMV()


def _SafeMatmul():
    """dlight's ``gpu.Matmul`` (tensor cores / simdgroup), falling back to the plain SIMT
    schedule where tensorization raises (e.g. CUDA ``MatmulTensorization`` on the FPN's
    im2col'd 3x3 convolution: "scope is not a stage pipeline")."""

    plain = _PlainMatmul()

    class SafeMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a schedule error: take the plain schedule
                try:
                    return plain.apply(func, target, tunable)
                except Exception:  # noqa: BLE001 - let the next rule (GEMV, Fallback) try
                    return None

    return SafeMatmul()


def _PlainMatmul():
    """dlight's ``gpu.Matmul`` with tensorization turned off (no ``sch.tensorize``)."""

    class PlainMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            if target.kind.name in ("cuda", "metal"):
                # the rule tensorizes for cuda >= sm_70 and metal; a pre-tensor-core cuda
                # target takes the SIMT path (only the schedule is taken from it)
                target = tvm.target.Target({"kind": "cuda", "arch": "sm_60"})
            return super().apply(func, target, tunable)

    return PlainMatmul()
