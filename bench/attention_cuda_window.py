"""Window mode of the CUDA attention kernel: check against torch, time against the
partitioned call + the two transposes it replaces.

The ViT's windowed blocks used to partition the LayerNorm output [B, 72, 72, 1024] into
9 windows of 24x24 tokens (a transpose), run qkv / the attention kernel / o_proj on
[B*9, 576, C], and unpartition the attention output (another transpose). In window mode the
kernel reads each window's rows from the unpartitioned [B, 5184, 3072] qkv and writes them
back to [B, 5184, 1024] (sam3_nn/kernels/cuda/attention.cu, ``sam3_attention_fp16_window``).

  build (here: nvcc; the TVM library needs the full TVM):
      .venv/bin/python bench/attention_cuda_window.py build build/attn_win
  optional: the kernel before window mode for comparison, build/attn_win/head/libsam3_attention.so
  run (accelerator machine, torch with CUDA; carry .devbundle and build/attn_win):
      export PYTHONPATH=$PWD/.devbundle/site:$PWD; python3 bench/attention_cuda_window.py run build/attn_win

Checks (fp16 in, float64 reference with complex RoPE computed on the partitioned windows,
then unpartitioned): window mode for every tile configuration, 2 images of 72x72 tokens
(16 heads, head dim 64), a 48x72 grid with head dim 32 (mma.sync kernels), and bit-equality
with the partitioned kernel call (same arithmetic, other addresses). The TVM library's
``sam3_attention_cuda_window`` (the model's ``qkv_window_attention``) is checked the same way.
Keys rotated once (``sam3_rope_keys_fp16`` + the kernel rotating q only, what the model
uses from 512 queries per sequence on): bit-equality with the inline rotation, window mode
and a global block, and the time of each step.
The pipelined wgmma loop (configs 6, 8) against the serial one (7, 9): bit-equal.
q and k rotated once (one rotation call over both, then the kernel without RoPE; not used by
the model, it measured no faster): bit-equality with the inline rotation, and its times.
Timings: CUDA-event medians over graph replays with 4 rotating input sets
(window mode with the automatic tile choice and with each wgmma tiling forced; a global
block of 5184 tokens per tiling)
(bench/attention_cuda_kernel.time_cuda): window mode against partition (torch
permute + contiguous of the [B, 72, 72, 1024] norm output) + kernel on the partitioned qkv +
unpartition (permute + contiguous of [B*9, 576, 1024]).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import attention_cuda_kernel as akern  # noqa: E402

HEADS, HEAD_DIM, WS = 16, 64, 24


def build(out_dir: str, arch: str = "sm_90a") -> None:
    akern.build(out_dir, arch)
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    sys.path.insert(0, os.path.join(HERE, ".."))
    from sam3_nn.compiler.options import KernelOptions
    from sam3_nn.kernels.cuda import attention as attention_cuda
    from sam3_nn.kernels.cuda.source import fcompile_with_cudart
    from sam3_nn.kernels.rewrite import route_ops_pass
    from sam3_nn.ops.attention import qkv_self_attention, qkv_window_attention
    from sam3_nn.ops.rope import AxialRope

    rope = AxialRope(WS, WS, HEAD_DIM, akern.THETA, 1.0)

    class Win(nn.Module):
        def window(self, qkv):
            return qkv_window_attention(qkv, HEADS, rope, WS, 72, 72)

        def partitioned(self, qkv):  # the per-window call (sam3_attention_cuda) on [B*9, 576, 3C]
            return qkv_self_attention(qkv, HEADS, rope)

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    spec = {"window": {"qkv": nn.spec.Tensor(["b", 72 * 72, 3 * HEADS * HEAD_DIM], "float16")},
            "partitioned": {"qkv": nn.spec.Tensor(["b", WS * WS, 3 * HEADS * HEAD_DIM], "float16")}}
    mod, _ = Win().export_tvm(spec=spec)
    routes = attention_cuda.attention_routes(target, None, KernelOptions(rope_mode="inline"))
    mod = route_ops_pass(routes)(mod)
    seq = tvm.transform.Sequential([attention_cuda.attach_pass(target, log=print),
                                    relax.get_default_pipeline(target)])
    ex = tvm.compile(mod, target=target, relax_pipeline=seq)
    ex.export_library(os.path.join(out_dir, "attn_window.so"), fcompile=fcompile_with_cudart())
    print("built", out_dir)


class WindowKernel(akern.Kernel):
    """ctypes binding of ``sam3_attention_fp16_window`` (unpartitioned [B, gh*gw, W] tensors)."""

    def __init__(self, so: str):
        super().__init__(so)
        import ctypes

        f = self.lib.sam3_attention_fp16_window
        P, LL, I, F = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
        f.argtypes = [P, P, P, P, P, LL, LL, I, LL, LL, I, LL, LL, I, LL, LL, LL,
                      I, I, I, I, I, I, I, F, F, I, I, I, I, I, P]
        f.restype = I
        self.wfn = f
        r = self.lib.sam3_rope_keys_fp16
        r.argtypes = [P, P, LL, LL, I, I, I, I, I, I, I, F, F, I, I, I, P]
        r.restype = I
        self.rfn = r

    def rope_keys(self, qkv, heads, head_dim, grid, window=0, img=(0, 0), out=None, offset=None):
        """``heads`` head columns of ``qkv [B, N, 3C]`` from ``offset`` (default C: the keys)
        rotated once (``sam3_rope_keys_fp16``): [B, N, heads * head_dim]."""
        import torch

        b, n, _ = qkv.shape
        c = heads * head_dim
        offset = c if offset is None else offset
        if out is None:
            out = torch.empty(b, n, c, dtype=qkv.dtype, device=qkv.device)
        err = self.rfn(qkv.data_ptr(), out.data_ptr(), qkv.stride(0), qkv.stride(1), offset, b, n, heads, head_dim,
                       grid[0], grid[1], 1.0, akern.THETA, window, img[0], img[1],
                       torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"sam3_rope_keys_fp16 returned {err}")
        return out

    def attend(self, q, k, v, offsets, heads, head_dim, grid, keys_rotated, window=0, img=(0, 0), config=0,
               out=None):
        """``sam3_attention_fp16_window`` on separate q/k/v tensors (window 0: global attention)."""
        import torch

        b, n, _ = q.shape
        c = heads * head_dim
        if out is None:
            out = torch.empty(b, n, c, dtype=q.dtype, device=q.device)
        nq = window * window if window else n
        err = self.wfn(q.data_ptr(), k.data_ptr(), v.data_ptr(), None, out.data_ptr(),
                       q.stride(0), q.stride(1), offsets[0], k.stride(0), k.stride(1), offsets[1],
                       v.stride(0), v.stride(1), offsets[2], out.stride(0), out.stride(1), 0,
                       b, heads, head_dim, nq, nq, grid[0], grid[1], 1.0, akern.THETA, window, img[0], img[1],
                       config, int(keys_rotated), torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"sam3_attention_fp16_window returned {err}")
        return out

    def window(self, qkv, heads, head_dim, ws, gh, gw, rope=True, config=0, out=None):
        """Window mode on a fused ``qkv [B, gh*gw, 3C]``, keys rotated inline."""
        c = heads * head_dim
        r = ws if rope else 0
        return self.attend(qkv, qkv, qkv, (0, c, 2 * c), heads, head_dim, (r, r), False, ws, (gh, gw),
                           config, out)


def partition(x, ws):
    """[B, gh*gw, C] or [B, gh, gw, C] -> [B * windows, ws*ws, C] (contiguous)."""
    b, c = x.shape[0], x.shape[-1]
    gh, gw = (x.shape[1], x.shape[2]) if x.dim() == 4 else (None, None)
    if gh is None:
        raise ValueError("pass [B, gh, gw, C]")
    x = x.view(b, gh // ws, ws, gw // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (gh // ws) * (gw // ws), ws * ws, c)


def unpartition(x, b, gh, gw, ws):
    """[B * windows, ws*ws, C] -> [B, gh, gw, C] (contiguous)."""
    c = x.shape[-1]
    x = x.view(b, gh // ws, gw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh, gw, c)


def run(out_dir: str, result_dir: str | None = None) -> dict:
    import torch

    dev = "cuda"
    kern = WindowKernel(os.path.join(out_dir, akern.LIB))
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float16, generator=gen)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": [], "timings": {}}

    def reference(qkv, b, gh, gw, ws, heads, d, rope=True):
        c = heads * d
        part = partition(qkv.view(b, gh, gw, 3 * c), ws)
        ref = akern.reference(part, part, part, heads, d, (0, c, 2 * c), None, (ws, ws) if rope else None, 1.0)
        return part, unpartition(ref, b, gh, gw, ws).reshape(b, gh * gw, c)

    ok_all = True
    for name, b, gh, gw, heads, d, configs in [
        ("2 images 72x72 h16 d64", 2, 72, 72, 16, 64, (0, 1, 4, 5, 6, 7, 8, 9)),
        ("3 images 48x72 h3 d32", 3, 48, 72, 3, 32, (0, 1, 2, 3, 4, 5)),
    ]:
        c = heads * d
        qkv = rnd(b, gh * gw, 3 * c)
        part, ref = reference(qkv, b, gh, gw, WS, heads, d)
        outs_by_cfg = {}
        for cfg in configs:
            out = torch.full((b, gh * gw, c), float("nan"), device=dev, dtype=torch.float16)
            kern.window(qkv, heads, d, WS, gh, gw, config=cfg, out=out)
            base = kern(part, part, part, heads, d, (0, c, 2 * c), None, (WS, WS), 1.0, config=cfg)
            torch.cuda.synchronize()
            e = akern.errors(out, ref)
            same = torch.equal(out, unpartition(base, b, gh, gw, WS).reshape(b, gh * gw, c))
            outs_by_cfg[cfg] = out
            if cfg in (7, 9) and cfg - 1 in outs_by_cfg:  # serial loop (one warpgroup) vs pipelined (two)
                pipe = torch.equal(out, outs_by_cfg[cfg - 1])
                print(f"check window {name:24s} cfg {cfg - 1} (pipelined) bit-equal to cfg {cfg} (serial) {pipe}",
                      flush=True)
                same &= pipe
            ok = e["finite"] and e["rel"] < 2e-3 and same
            ok_all &= ok
            results["checks"].append({"case": name, "config": cfg, **e, "bit_equal_partitioned": same, "ok": ok})
            print(f"check window {name:24s} cfg {cfg}: rel {e['rel']:.2e} max_abs {e['max_abs']:.2e} "
                  f"bit-equal to partitioned {same} {'ok' if ok else 'FAIL'}", flush=True)
    # no RoPE, 2 images
    qkv = rnd(2, 72 * 72, 3 * 1024)
    _, ref = reference(qkv, 2, 72, 72, WS, 16, 64, rope=False)
    e = akern.errors(kern.window(qkv, 16, 64, WS, 72, 72, rope=False), ref)
    ok_all &= e["finite"] and e["rel"] < 2e-3
    results["checks"].append({"case": "2 images 72x72 no rope", "config": 0, **e})
    print(f"check window no rope: rel {e['rel']:.2e}", flush=True)

    # through the TVM library (the model's qkv_window_attention -> sam3_attention_cuda_window)
    lib = os.path.join(out_dir, "attn_window.so")
    if os.path.exists(lib):
        try:
            import tvm
            from sam3_nn.runtime.engine import load_device_runtime

            load_device_runtime("cuda")
            from tvm.runtime.vm import VirtualMachine

            vm = VirtualMachine(tvm.runtime.load_module(lib), tvm.cuda(0))
            qkv = rnd(2, 72 * 72, 3 * 1024)
            part, ref = reference(qkv, 2, 72, 72, WS, 16, 64)
            try:
                po = torch.from_numpy(vm["partitioned"](tvm.runtime.tensor(part.cpu().numpy(), tvm.cuda(0))).numpy()).cuda()
                e = akern.errors(unpartition(po, 2, 72, 72, WS).reshape(2, 72 * 72, 1024), ref)
                results["checks"].append({"case": "TVM library sam3_attention_cuda (partitioned)", **e})
                print(f"check TVM library partitioned: rel {e['rel']:.2e}", flush=True)
            except Exception as exc:
                print("TVM library partitioned call failed:", repr(exc)[:500], flush=True)
            ours = torch.from_numpy(vm["window"](tvm.runtime.tensor(qkv.cpu().numpy(), tvm.cuda(0))).numpy()).cuda()
            direct = kern.window(qkv, 16, 64, WS, 72, 72)
            torch.cuda.synchronize()
            e = akern.errors(ours, ref)
            same = torch.equal(ours, direct)
            ok_all &= e["finite"] and e["rel"] < 2e-3 and same
            results["checks"].append({"case": "TVM library sam3_attention_cuda_window", **e, "equal_to_direct": same})
            print(f"check TVM library window: rel {e['rel']:.2e} equal to the direct call {same}", flush=True)
        except Exception as exc:  # report, keep the timings
            ok_all = False
            results["checks"].append({"case": "TVM library", "error": repr(exc)[:500]})
            print("TVM library check failed:", repr(exc)[:500], flush=True)

    # timings: window mode vs partition + kernel + unpartition
    for b in (1, 2):
        gh = gw = 72
        n, c = gh * gw, HEADS * HEAD_DIM
        nwin = (gh // WS) * (gw // WS)
        qkvs = [rnd(b, n, 3 * c) for _ in range(4)]
        parts = [rnd(b * nwin, WS * WS, 3 * c) for _ in range(4)]
        ys = [rnd(b, gh, gw, c) for _ in range(4)]  # the LayerNorm output (partitioned before qkv)
        outs = [torch.empty(b, n, c, device=dev, dtype=torch.float16) for _ in range(4)]
        pouts = [torch.empty(b * nwin, WS * WS, c, device=dev, dtype=torch.float16) for _ in range(4)]
        r = {}
        r["window_mode_ms"] = akern.time_cuda([lambda i=i: kern.window(qkvs[i], HEADS, HEAD_DIM, WS, gh, gw, out=outs[i])
                                               for i in range(4)])
        for cfg in (6, 7, 8, 9):  # forced tile configurations (0 above: the automatic choice)
            r[f"window_config{cfg}_ms"] = akern.time_cuda(
                [lambda i=i, cfg=cfg: kern.window(qkvs[i], HEADS, HEAD_DIM, WS, gh, gw, config=cfg, out=outs[i])
                 for i in range(4)])
        r["partitioned_kernel_ms"] = akern.time_cuda([lambda i=i: kern(parts[i], parts[i], parts[i], HEADS, HEAD_DIM,
                                                                      (0, c, 2 * c), None, (WS, WS), 1.0, out=pouts[i])
                                                     for i in range(4)])
        head = os.path.join(out_dir, "head", akern.LIB)  # the kernel before window mode, if built
        if os.path.exists(head):
            try:
                hk = akern.Kernel(head)
                r["partitioned_kernel_before_ms"] = akern.time_cuda(
                    [lambda i=i: hk(parts[i], parts[i], parts[i], HEADS, HEAD_DIM, (0, c, 2 * c), None, (WS, WS),
                                    1.0, out=pouts[i]) for i in range(4)])
            except Exception as exc:  # an older kernel build may clash with the one loaded first
                print("kernel before window mode:", repr(exc)[:300], flush=True)
        r["partition_ms"] = akern.time_cuda([lambda i=i: partition(ys[i], WS) for i in range(4)])
        r["unpartition_ms"] = akern.time_cuda([lambda i=i: unpartition(pouts[i], b, gh, gw, WS) for i in range(4)])

        def old(i):
            partition(ys[i], WS)
            kern(parts[i], parts[i], parts[i], HEADS, HEAD_DIM, (0, c, 2 * c), None, (WS, WS), 1.0, out=pouts[i])
            unpartition(pouts[i], b, gh, gw, WS)

        r["partitioned_total_ms"] = akern.time_cuda([lambda i=i: old(i) for i in range(4)])
        r["saving_ms"] = r["partitioned_total_ms"] - r["window_mode_ms"]
        r["saving_28_blocks_ms"] = 28 * r["saving_ms"]
        results["timings"][f"batch{b}"] = r
        print(f"batch {b}", json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)
    # a global block (all 5184 tokens attend to each other) per tile configuration
    c = HEADS * HEAD_DIM
    qkvs = [rnd(1, 72 * 72, 3 * c) for _ in range(4)]
    outs = [torch.empty(1, 72 * 72, c, device=dev, dtype=torch.float16) for _ in range(4)]
    g = {}
    for cfg in (0, 6, 7, 8, 9):
        g[f"global_config{cfg}_ms"] = akern.time_cuda(
            [lambda i=i, cfg=cfg: kern(qkvs[i], qkvs[i], qkvs[i], HEADS, HEAD_DIM, (0, c, 2 * c), None, (72, 72),
                                       1.0, config=cfg, out=outs[i]) for i in range(4)])
    results["timings"]["global"] = g
    print("global", json.dumps({k: round(v, 4) for k, v in g.items()}), flush=True)

    # keys rotated once (sam3_rope_keys_fp16, then the kernel rotating q only) against the
    # kernel rotating every k tile it reads: bit-equal, and the time of both steps
    krs = [torch.empty(1, 72 * 72, c, device=dev, dtype=torch.float16) for _ in range(4)]
    modes = {"global": dict(grid=(72, 72)), "window": dict(grid=(WS, WS), window=WS, img=(72, 72))}

    def rotated(i, mode, cfg=0, rotate=True):
        kw = modes[mode]
        if rotate:
            kern.rope_keys(qkvs[i], HEADS, HEAD_DIM, kw["grid"], kw.get("window", 0), kw.get("img", (0, 0)),
                           out=krs[i])
        return kern.attend(qkvs[i], krs[i], qkvs[i], (0, 0, 2 * c), HEADS, HEAD_DIM, kw["grid"], True,
                           kw.get("window", 0), kw.get("img", (0, 0)), config=cfg, out=outs[i])

    def inline(i, mode, cfg=0):
        kw = modes[mode]
        return kern.attend(qkvs[i], qkvs[i], qkvs[i], (0, c, 2 * c), HEADS, HEAD_DIM, kw["grid"], False,
                           kw.get("window", 0), kw.get("img", (0, 0)), config=cfg, out=outs[i])

    def bit_equal_to_inline(label, fn, configs):
        ok = True
        for mode in modes:
            for cfg in configs:
                same = torch.equal(fn(0, mode, cfg).clone(), inline(0, mode, cfg).clone())
                ok &= same
                results["checks"].append({"case": f"{label}, {mode}", "config": cfg, "bit_equal_inline": same})
                print(f"check {label}, {mode} cfg {cfg}: bit-equal to inline rotation {same}", flush=True)
        return ok

    ok_all &= bit_equal_to_inline("keys rotated once", rotated, (1, 6))  # an mma.sync and a wgmma tiling
    rk = {}
    for mode in modes:
        rk[f"{mode}_inline_ms"] = akern.time_cuda([lambda i=i, m=mode: inline(i, m) for i in range(4)])
        rk[f"{mode}_rope_keys_ms"] = akern.time_cuda(
            [lambda i=i, m=mode: kern.rope_keys(qkvs[i], HEADS, HEAD_DIM, modes[m]["grid"], modes[m].get("window", 0),
                                                modes[m].get("img", (0, 0)), out=krs[i]) for i in range(4)])
        rk[f"{mode}_attention_rotated_keys_ms"] = akern.time_cuda(
            [lambda i=i, m=mode: rotated(i, m, rotate=False) for i in range(4)])
        rk[f"{mode}_rotated_total_ms"] = akern.time_cuda([lambda i=i, m=mode: rotated(i, m) for i in range(4)])
    results["timings"]["keys_rotated_once"] = rk
    print("keys rotated once", json.dumps({k: round(v, 4) for k, v in rk.items()}), flush=True)

    # q and k rotated once (one sam3_rope_keys_fp16 call over the q and k heads of the fused
    # projection, then the kernel without RoPE): measured, not used by the model (no faster)
    qks = [torch.empty(1, 72 * 72, 2 * c, device=dev, dtype=torch.float16) for _ in range(4)]

    def rope_qk(i, mode):
        kw = modes[mode]
        return kern.rope_keys(qkvs[i], 2 * HEADS, HEAD_DIM, kw["grid"], kw.get("window", 0), kw.get("img", (0, 0)),
                              out=qks[i], offset=0)

    def plain(i, mode, cfg=0):
        kw = modes[mode]
        return kern.attend(qks[i], qks[i], qkvs[i], (0, c, 2 * c), HEADS, HEAD_DIM, (0, 0), False,
                           kw.get("window", 0), kw.get("img", (0, 0)), config=cfg, out=outs[i])

    ok_all &= bit_equal_to_inline("q and k rotated once", lambda i, m, cfg: (rope_qk(i, m), plain(i, m, cfg))[1],
                                  (1, 6, 7))
    qk = {}
    for mode in modes:
        qk[f"{mode}_rope_qk_ms"] = akern.time_cuda([lambda i=i, m=mode: rope_qk(i, m) for i in range(4)])
        qk[f"{mode}_attention_no_rope_ms"] = akern.time_cuda([lambda i=i, m=mode: plain(i, m) for i in range(4)])
        qk[f"{mode}_total_ms"] = akern.time_cuda([lambda i=i, m=mode: (rope_qk(i, m), plain(i, m)) for i in range(4)])
    results["timings"]["q_and_k_rotated_once"] = qk
    print("q and k rotated once", json.dumps({k: round(v, 4) for k, v in qk.items()}), flush=True)
    from common import finish_run

    return finish_run(results, ok_all, result_dir, "attention_cuda_window.json")


if __name__ == "__main__":
    from common import build_or_run_main

    build_or_run_main(__doc__, build, run)
