"""Fused attention TIR kernels with SAM 3's 2D axial RoPE applied inline.

One kernel computes ``softmax(q k^T / sqrt(D) + bias) v`` for every head of a
batch of sequences, flash-attention style: a tile of queries stays on chip, keys
and values stream past it, the softmax is updated online (running max and sum in
float32, exponentials in base 2) and no ``Nq x Nk`` score matrix exists in memory.

* ``RopeMode.INLINE``: q and k are rotated (``sam3_nn.ops.rope.rotate_element``) while
  their tiles are loaded; rotated q/k never reach memory.
* No RoPE: the same kernel for layers without it, including cross attention with
  q and k/v of different lengths.

Inputs are read in place: ``q``, ``k``, ``v`` are ``[B, N, W]`` tensors and the
heads of each sit at a fixed column offset, so the fused qkv projection
``[B, N, 3*H*D]`` is passed three times (offsets 0, H*D, 2*H*D) without a split
copy. The output is ``[B, Nq, H*D]`` (heads already merged).

An optional additive key bias ``[Bb, Nk]`` (``Bb`` = B or 1), always float32 (so
-1e9 stays finite in fp16 models), masks keys; clamped so that even an infinite
one stays finite.

On CUDA, float16 with head dims 32/64/128/256 does not use these kernels: TIR gives no practical
route to tensor-core flash attention in TVM 0.27 (two chained GEMMs with an online softmax
between them, mma/ldmatrix or wgmma tensorization that the schedules here cannot express),
so a hand-written CUDA kernel with the same semantics takes those calls
(``sam3_nn/kernels/cuda/attention.cu``, ``sam3_nn.kernels.cuda.attention``). These TIR kernels
remain the path for Metal and other GPU targets, float32, and the CPU.

Two implementations of the same semantics:

* GPU (CUDA, Metal, ...): thread-bound tiles in shared memory (query tile x key
  tile per block, 4 warps), modelled on TVM's prefill kernels.
* CPU (llvm): one parallel task per (batch, head, query tile); q/k tiles are
  rotated into float32 scratch using a per-task cos/sin table of the grid
  positions (``max(grid_h, grid_w) x D/4`` angles instead of ``N x D``), so the
  trigonometry stays small next to the two GEMMs.
"""

from __future__ import annotations

import math
from typing import Optional

import tvm
from tvm import tirx
from tvm.script import tirx as T

from sam3_nn.ops.rope import AxialRope, rotate_element

LOG2E = math.log2(math.e)
NEG_INIT = -3.0e38  # running max before any key was seen (finite)
BIAS_FLOOR = -1.0e30  # a bias below this (e.g. -inf after an fp16 cast) is clamped here


def kernel_name(rope: Optional[AxialRope], has_bias: bool) -> str:
    return "sam3_attention" + ("_rope" if rope is not None else "") + ("_masked" if has_bias else "")


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


def _tile_size(x, y, num_threads):
    """Per-thread 2D tile of an ``x x y`` block for ``num_threads`` threads, or None."""
    if (x * y) % num_threads:
        return None
    per = (x * y) // num_threads
    inner_y = math.ceil(math.sqrt(per))
    while inner_y <= per:
        if per % inner_y == 0:
            inner_x = per // inner_y
            if y % inner_y == 0 and x % inner_x == 0:
                return inner_x, inner_y
        inner_y += 1
    return None


def _vec(extent, load_vec):
    return min(load_vec, extent & ~(extent - 1))


def _load_config(x, y, num_threads, load_vec):
    if (x * y) % num_threads:
        return None
    per = (x * y) // num_threads
    vec = min(_vec(y, load_vec), _vec(per, load_vec))
    tile = _tile_size(x, y // vec, num_threads)
    return None if tile is None else (vec, *tile)




def _gpu_config(head_dim: int, dtype: str, target, tiles: Optional[tuple] = None):
    """``tiles``: (query rows, keys) per block; None: 32x32 for fp16, 16x32 for fp32."""
    nbytes = 2 if dtype == "float16" else 4
    load_vec = 8 // nbytes
    bdx, num_warps = 32, 4
    tile_x = 64 // nbytes  # query rows per block
    tile_z = tile_x  # keys per step
    if tiles:
        tile_x, tile_z = tiles
    while (tile_x * tile_z) % (bdx * num_warps):
        tile_z += tile_x
    max_threads = int(target.attrs.get("max_num_threads", 1024)) if target is not None else 1024
    assert bdx * num_warps <= max_threads
    for ext in ((tile_x, tile_z), (tile_x, head_dim)):
        if _tile_size(*ext, bdx * num_warps) is None:
            raise ValueError(f"attention tile {ext} does not fit {bdx * num_warps} threads")
    for ext in ((tile_x, head_dim), (tile_z, head_dim)):
        if _load_config(*ext, bdx * num_warps, load_vec) is None:
            raise ValueError(f"attention load {ext} does not fit {bdx * num_warps} threads")
    return load_vec, bdx, num_warps, tile_x, tile_z


def _schedule_gpu(sch, load_vec, bdx, num_warps, tile_x, head_dim, tile_z):
    nthreads = bdx * num_warps
    extent = lambda *lps: [int(sch.get(lp).extent) for lp in lps]

    def load(block):
        lx, ly = sch.get_loops(block)[-2:]
        vec, tx_, ty_ = _load_config(*extent(lx, ly), nthreads, load_vec)
        yo, yv = sch.split(ly, [None, vec])
        xo, xi = sch.split(lx, [tx_, None])
        yo, yi = sch.split(yo, [ty_, None])
        sch.reorder(xi, yi, xo, yo)
        t = sch.fuse(xi, yi)
        ty, tx = sch.split(t, [num_warps, bdx])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(yv)

    def ewise(block, tile):
        lx, ly = sch.get_loops(block)[-2:]
        xo, xi = sch.split(lx, [None, tile[0]])
        yo, yi = sch.split(ly, [None, tile[1]])
        sch.reorder(xo, yo, xi, yi)
        yio, yiv = sch.split(yi, [None, _vec(tile[1], load_vec)])
        sch.unroll(yio)
        sch.vectorize(yiv)
        t = sch.fuse(xo, yo)
        ty, tx = sch.split(t, [None, bdx])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

    def gemm(block, tile, k_major, r_len=16):
        lx, ly, lz = sch.get_loops(block)[-3:]
        xo, xi = sch.split(lx, [None, tile[0]])
        yo, yi = sch.split(ly, [None, tile[1]])
        sch.reorder(xo, yo, xi, yi)
        t = sch.fuse(xo, yo)
        ty, tx = sch.split(t, [None, bdx])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        ko, ki = sch.split(lz, [None, r_len])
        if k_major:
            sch.reorder(ko, xi, yi, ki)
        else:
            sch.reorder(ko, ki, xi, yi)
        yio, yiv = sch.split(yi, [None, _vec(tile[1], load_vec)])
        sch.unroll(yio)
        sch.vectorize(yiv)
        sch.unroll(xi)
        sch.decompose_reduction(block, ty)

    tile_s = _tile_size(tile_x, tile_z, nthreads)
    tile_o = _tile_size(tile_x, head_dim, nthreads)
    gemm(sch.get_sblock("S_gemm"), tile_s, True)
    gemm(sch.get_sblock("O_gemm"), tile_o, False)
    ewise(sch.get_sblock("S_store"), tile_s)
    ewise(sch.get_sblock("O_init"), tile_o)
    ewise(sch.get_sblock("O_store"), tile_o)
    load(sch.get_sblock("Q_load"))
    load(sch.get_sblock("K_load"))
    load(sch.get_sblock("V_load"))
    return sch


def gpu_attention_kernel(num_heads: int, head_dim: int, dtype: str, rope: Optional[AxialRope],
                         offsets, has_bias: bool, bias_batched: bool, target=None, tiles=None):
    """Scheduled GPU kernel ``(q, k, v[, bias], out)``; see the module docstring."""
    load_vec, bdx, num_warps, tile_x, tile_z = _gpu_config(head_dim, dtype, target, tiles)
    D = head_dim
    q_off, k_off, v_off = offsets
    sm_scale = (D ** -0.5) * LOG2E
    rows = math.ceil(tile_x / (bdx * num_warps))

    def q_elem(q, b, n, h, j):
        if rope is None:
            return q[b, n, q_off + h * D + j]
        return T.Cast(dtype, rotate_element(rope, lambda jj: T.Cast("float32", q[b, n, q_off + h * D + jj]), n, j))

    def k_elem(k, b, n, h, j):
        if rope is None:
            return k[b, n, k_off + h * D + j]
        return T.Cast(dtype, rotate_element(rope, lambda jj: T.Cast("float32", k[b, n, k_off + h * D + jj]), n, j))

    def bias_elem(bias, b, col):
        if bias is None:
            return T.float32(0)
        return T.max(T.Cast("float32", bias[b if bias_batched else 0, col]), T.float32(BIAS_FLOOR)) * T.float32(LOG2E)

    @T.macro
    def body(q, k, v, bias, out, batch, qo_len, kv_len):
        q_tiles: T.let[T.int32] = T.ceildiv(qo_len, tile_x)
        for lbx in T.thread_binding(T.Cast("int32", batch) * q_tiles, thread="blockIdx.x"):
            for lby in T.thread_binding(num_heads, thread="blockIdx.y"):
                for lty in T.thread_binding(num_warps, thread="threadIdx.y"):
                    for ltx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("attn"):
                            vbx, hh, ty, tx = T.axis.remap("SSSS", [lbx, lby, lty, ltx])
                            T.reads()
                            T.writes()
                            Q_smem = T.sblock_alloc_buffer((tile_x, D), dtype, scope="shared")
                            K_smem = T.sblock_alloc_buffer((tile_z, D), dtype, scope="shared")
                            V_smem = T.sblock_alloc_buffer((tile_z, D), dtype, scope="shared")
                            O_local = T.sblock_alloc_buffer((tile_x, D), "float32", scope="local")
                            S_smem = T.sblock_alloc_buffer((tile_x, tile_z), "float32", scope="shared")
                            S_local = T.sblock_alloc_buffer((tile_x, tile_z), "float32", scope="local")
                            m_smem = T.sblock_alloc_buffer((tile_x,), "float32", scope="shared")
                            m_prev_smem = T.sblock_alloc_buffer((tile_x,), "float32", scope="shared")
                            d_smem = T.sblock_alloc_buffer((tile_x,), "float32", scope="shared")
                            m_new = T.sblock_alloc_buffer((rows,), "float32", scope="local")
                            m_prev = T.sblock_alloc_buffer((rows,), "float32", scope="local")
                            d_new = T.sblock_alloc_buffer((rows,), "float32", scope="local")

                            b_idx: T.let[T.int32] = vbx // q_tiles
                            L_start: T.let[T.int32] = (vbx % q_tiles) * tile_x
                            T.tvm_storage_sync("shared")

                            for i in T.serial(rows):
                                row: T.let[T.int32] = i * bdx * num_warps + ty * bdx + tx
                                if row < tile_x:
                                    m_smem[row] = T.float32(NEG_INIT)
                                    d_smem[row] = T.float32(0)
                            for li, lj in T.grid(tile_x, D):
                                with T.sblock("O_init"):
                                    i, j = T.axis.remap("SS", [li, lj])
                                    O_local[i, j] = T.float32(0)
                            T.tvm_storage_sync("shared")

                            for li, lj in T.grid(tile_x, D):
                                with T.sblock("Q_load"):
                                    i, j = T.axis.remap("SS", [li, lj])
                                    T.reads()
                                    T.writes()
                                    cur: T.let[T.int32] = L_start + i
                                    if cur < qo_len:
                                        Q_smem[i, j] = q_elem(q, b_idx, cur, hh, j)
                                    else:
                                        Q_smem[i, j] = T.Cast(dtype, 0)
                            T.tvm_storage_sync("shared")

                            for it in T.serial(T.ceildiv(kv_len, tile_z)):
                                kv_start: T.let[T.int32] = it * tile_z
                                for lz, ly in T.grid(tile_z, D):
                                    with T.sblock("K_load"):
                                        i, j = T.axis.remap("SS", [lz, ly])
                                        T.reads()
                                        T.writes()
                                        cur: T.let[T.int32] = kv_start + i
                                        if cur < kv_len:
                                            K_smem[i, j] = k_elem(k, b_idx, cur, hh, j)
                                        else:
                                            K_smem[i, j] = T.Cast(dtype, 0)
                                T.tvm_storage_sync("shared")
                                for lz, ly in T.grid(tile_z, D):
                                    with T.sblock("V_load"):
                                        i, j = T.axis.remap("SS", [lz, ly])
                                        T.reads()
                                        T.writes()
                                        cur: T.let[T.int32] = kv_start + i
                                        if cur < kv_len:
                                            V_smem[i, j] = v[b_idx, cur, v_off + hh * D + j]
                                        else:
                                            V_smem[i, j] = T.Cast(dtype, 0)
                                T.tvm_storage_sync("shared")

                                with T.sblock():
                                    for li, lj, lk in T.grid(tile_x, tile_z, D):
                                        with T.sblock("S_gemm"):
                                            i, j, kk = T.axis.remap("SSR", [li, lj, lk])
                                            with T.init():
                                                S_local[i, j] = T.float32(0)
                                            S_local[i, j] += T.Cast("float32", Q_smem[i, kk]) * T.Cast("float32", K_smem[j, kk]) * T.float32(sm_scale)
                                T.tvm_storage_sync("shared")
                                for li, lj in T.grid(tile_x, tile_z):
                                    with T.sblock("S_store"):
                                        i, j = T.axis.remap("SS", [li, lj])
                                        S_smem[i, j] = S_local[i, j] + bias_elem(bias, b_idx, T.min(kv_start + j, kv_len - 1))
                                T.tvm_storage_sync("shared")

                                # online softmax: running max, rescale, exponentiate (masked-out columns -> 0)
                                for i in T.serial(rows):
                                    row: T.let[T.int32] = i * bdx * num_warps + ty * bdx + tx
                                    if row < tile_x:
                                        with T.sblock("update1"):
                                            m_prev[i] = m_smem[row]
                                            m_new[i] = m_smem[row]
                                            for j in T.serial(tile_z):
                                                if kv_start + j < kv_len:
                                                    m_new[i] = T.max(m_new[i], S_smem[row, j])
                                            d_new[i] = d_smem[row] * T.exp2(m_prev[i] - m_new[i])
                                for i in T.serial(rows):
                                    row: T.let[T.int32] = i * bdx * num_warps + ty * bdx + tx
                                    with T.sblock("update"):
                                        for j in T.serial(tile_z):
                                            if row < tile_x:
                                                if kv_start + j < kv_len:
                                                    S_smem[row, j] = T.exp2(S_smem[row, j] - m_new[i])
                                                else:
                                                    S_smem[row, j] = T.float32(0)
                                for i in T.serial(rows):
                                    row: T.let[T.int32] = i * bdx * num_warps + ty * bdx + tx
                                    if row < tile_x:
                                        with T.sblock("update"):
                                            for j in T.serial(tile_z):
                                                d_new[i] += S_smem[row, j]
                                            m_smem[row] = m_new[i]
                                            d_smem[row] = d_new[i]
                                            m_prev_smem[row] = m_prev[i]
                                T.tvm_storage_sync("shared")

                                with T.sblock():
                                    for li, lj, lk in T.grid(tile_x, D, tile_z):
                                        with T.sblock("O_gemm"):
                                            i, j, kk = T.axis.remap("SSR", [li, lj, lk])
                                            with T.init():
                                                O_local[i, j] *= T.exp2(m_prev_smem[i] - m_smem[i])
                                            O_local[i, j] += S_smem[i, kk] * T.Cast("float32", V_smem[kk, j])
                                T.tvm_storage_sync("shared")

                            for li, lj in T.grid(tile_x, D):
                                with T.sblock("O_store"):
                                    i, j = T.axis.remap("SS", [li, lj])
                                    cur: T.let[T.int32] = L_start + i
                                    if cur < qo_len:
                                        out[b_idx, cur, hh * D + j] = T.Cast(dtype, O_local[i, j] / d_smem[i])

    func = _declare(body, num_heads, head_dim, dtype, has_bias, bias_batched)
    sch = tvm.s_tir.Schedule(func)
    sch = _schedule_gpu(sch, load_vec, bdx, num_warps, tile_x, D, tile_z)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _declare(body, num_heads, head_dim, dtype, has_bias, bias_batched):
    """Wrap ``body`` in a prim_func with or without the bias argument."""
    hidden = num_heads * head_dim

    if has_bias:
        @T.prim_func(private=True, s_tir=True)
        def kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_bias: T.handle, var_out: T.handle):
            T.func_attr({"op_pattern": 8})
            batch = T.int32()
            bias_b = T.int32()
            qo_len = T.int32()
            kv_len = T.int32()
            wq = T.int32()
            wk = T.int32()
            wv = T.int32()
            q = T.match_buffer(var_q, (batch, qo_len, wq), dtype)
            k = T.match_buffer(var_k, (batch, kv_len, wk), dtype)
            v = T.match_buffer(var_v, (batch, kv_len, wv), dtype)
            bias = T.match_buffer(var_bias, (bias_b, kv_len), "float32")
            out = T.match_buffer(var_out, (batch, qo_len, hidden), dtype)
            body(q, k, v, bias, out, batch, qo_len, kv_len)
    else:
        @T.prim_func(private=True, s_tir=True)
        def kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_out: T.handle):
            T.func_attr({"op_pattern": 8})
            batch = T.int32()
            qo_len = T.int32()
            kv_len = T.int32()
            wq = T.int32()
            wk = T.int32()
            wv = T.int32()
            q = T.match_buffer(var_q, (batch, qo_len, wq), dtype)
            k = T.match_buffer(var_k, (batch, kv_len, wk), dtype)
            v = T.match_buffer(var_v, (batch, kv_len, wv), dtype)
            out = T.match_buffer(var_out, (batch, qo_len, hidden), dtype)
            body(q, k, v, None, out, batch, qo_len, kv_len)
    return kernel


# --------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------


def cpu_attention_kernel(num_heads: int, head_dim: int, dtype: str, rope: Optional[AxialRope],
                         offsets, has_bias: bool, bias_batched: bool, tile_q: int = 32, tile_k: int = 64):
    """CPU kernel with the same signature and semantics as ``gpu_attention_kernel``."""
    D = head_dim
    Q4 = D // 4
    q_off, k_off, v_off = offsets
    sm_scale = (D ** -0.5) * LOG2E
    grid = max(rope.grid_h, rope.grid_w) if rope is not None else 1

    def table_angle(pos, i):
        # rope_angle's formula for a token at column (or row) ``pos`` and frequency ``i``
        return (T.Cast("float32", pos) * T.float32(rope.scale)) * (T.float32(1.0) / T.pow(
            T.float32(rope.theta), T.Cast("float32", i * 2) / T.float32(D // 2)))

    def rotated(buf, b, n, h, off, j, cos_t, sin_t):
        x = lambda jj: T.Cast("float32", buf[b, n, off + h * D + jj])
        if rope is None:
            return x(j)
        p = j // 2
        pos = T.if_then_else(p < Q4, tirx.floormod(n, rope.grid_w), tirx.floordiv(n, rope.grid_w))
        i = T.if_then_else(p < Q4, p, p - Q4)
        partner = T.if_then_else(j % 2 == 0, -x(j + 1), x(j - 1))
        return x(j) * cos_t[pos, i] + partner * sin_t[pos, i]

    def bias_elem(bias, b, col):
        if bias is None:
            return T.float32(0)
        return T.max(T.Cast("float32", bias[b if bias_batched else 0, col]), T.float32(BIAS_FLOOR)) * T.float32(LOG2E)

    @T.macro
    def body(q, k, v, bias, out, batch, qo_len, kv_len):
        q_tiles: T.let[T.int32] = T.ceildiv(qo_len, tile_q)
        for task in T.parallel(T.Cast("int32", batch) * num_heads * q_tiles):
            with T.sblock("attn"):
                t = T.axis.spatial(T.Cast("int32", batch) * num_heads * q_tiles, task)
                T.reads()
                T.writes()
                cos_t = T.sblock_alloc_buffer((grid, Q4), "float32")
                sin_t = T.sblock_alloc_buffer((grid, Q4), "float32")
                Qt = T.sblock_alloc_buffer((tile_q, D), "float32")
                Kt = T.sblock_alloc_buffer((D, tile_k), "float32")
                Vt = T.sblock_alloc_buffer((tile_k, D), "float32")
                S = T.sblock_alloc_buffer((tile_q, tile_k), "float32")
                O = T.sblock_alloc_buffer((tile_q, D), "float32")
                m = T.sblock_alloc_buffer((tile_q,), "float32")
                l = T.sblock_alloc_buffer((tile_q,), "float32")
                alpha = T.sblock_alloc_buffer((tile_q,), "float32")
                bvec = T.sblock_alloc_buffer((tile_k,), "float32")

                b_idx: T.let[T.int32] = t // (num_heads * q_tiles)
                hh: T.let[T.int32] = (t // q_tiles) % num_heads
                q_start: T.let[T.int32] = (t % q_tiles) * tile_q

                if rope is not None:
                    for pos, i in T.grid(grid, Q4):
                        a: T.let[T.float32] = table_angle(pos, i)
                        cos_t[pos, i] = T.cos(a)
                        sin_t[pos, i] = T.sin(a)
                for i in T.serial(tile_q):
                    m[i] = T.float32(NEG_INIT)
                    l[i] = T.float32(0)
                    for j in T.vectorized(D):
                        O[i, j] = T.float32(0)
                for i, j in T.grid(tile_q, D):
                    if q_start + i < qo_len:
                        Qt[i, j] = rotated(q, b_idx, q_start + i, hh, q_off, j, cos_t, sin_t) * T.float32(sm_scale)
                    else:
                        Qt[i, j] = T.float32(0)

                for it in T.serial(T.ceildiv(kv_len, tile_k)):
                    kv_start: T.let[T.int32] = it * tile_k
                    for jk, j in T.grid(tile_k, D):
                        if kv_start + jk < kv_len:
                            Kt[j, jk] = rotated(k, b_idx, kv_start + jk, hh, k_off, j, cos_t, sin_t)
                            Vt[jk, j] = T.Cast("float32", v[b_idx, kv_start + jk, v_off + hh * D + j])
                        else:
                            Kt[j, jk] = T.float32(0)
                            Vt[jk, j] = T.float32(0)
                    for jk in T.serial(tile_k):
                        if kv_start + jk < kv_len:
                            bvec[jk] = bias_elem(bias, b_idx, kv_start + jk)
                        else:
                            bvec[jk] = T.float32(NEG_INIT)
                    for i in T.serial(tile_q):
                        for jk in T.vectorized(tile_k):
                            S[i, jk] = bvec[jk]
                        for j in T.serial(D):
                            for jk in T.vectorized(tile_k):
                                S[i, jk] = S[i, jk] + Qt[i, j] * Kt[j, jk]
                    for i in T.serial(tile_q):
                        alpha[i] = m[i]
                        for jk in T.serial(tile_k):
                            m[i] = T.max(m[i], S[i, jk])
                        alpha[i] = T.exp2(alpha[i] - m[i])
                        for jk in T.serial(tile_k):
                            if kv_start + jk < kv_len:
                                S[i, jk] = T.exp2(S[i, jk] - m[i])
                            else:
                                S[i, jk] = T.float32(0)
                        l[i] = l[i] * alpha[i]
                        for jk in T.serial(tile_k):
                            l[i] = l[i] + S[i, jk]
                        for j in T.vectorized(D):
                            O[i, j] = O[i, j] * alpha[i]
                        for jk in T.serial(tile_k):
                            for j in T.vectorized(D):
                                O[i, j] = O[i, j] + S[i, jk] * Vt[jk, j]
                for i, j in T.grid(tile_q, D):
                    if q_start + i < qo_len:
                        out[b_idx, q_start + i, hh * D + j] = T.Cast(dtype, O[i, j] / l[i])

    func = _declare(body, num_heads, head_dim, dtype, has_bias, bias_batched)
    return func.with_attr("tirx.is_scheduled", True)


def attention_kernel_for(gpu: bool, target, num_heads: int, head_dim: int, dtype: str,
                         rope: Optional[AxialRope], offsets, has_bias: bool,
                         bias_batched: bool = True, tiles: Optional[tuple] = None):
    """The thread-bound GPU kernel (``gpu``; ``target`` and ``tiles`` size its tiles) or the
    CPU one."""
    if gpu:
        return gpu_attention_kernel(num_heads, head_dim, dtype, rope, offsets, has_bias, bias_batched,
                                    target, tiles)
    return cpu_attention_kernel(num_heads, head_dim, dtype, rope, offsets, has_bias, bias_batched)
