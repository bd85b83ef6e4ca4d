// Fused multi-head attention for CUDA (sm_80+, tuned on sm_90): tensor cores, flash-attention-2
// style, with SAM 3's 2D axial RoPE applied to q and k inline.
//
// CUDA source, not TIR: the portable kernel (sam3_nn/ops/attention_tir.py) runs on the CUDA
// cores, and TVM 0.27 offers TIR no practical route to two chained tensor-core GEMMs with an
// online softmax between them (docs/attention_cuda.md). Other targets keep the TIR kernels,
// with the same semantics:
//
//   out[b, i, h*DV + d] = sum_j softmax_j(q_i . k_j / sqrt(D) + bias[b, j]) v[b, j, v_off + h*DV + d]
//
// DV (the value head dim) is D, except head dim 256 with 64-wide values (DV 64): the memory
// attention applies its value projection after the attention (P (M Wv) = (P M) Wv), so its
// values stay the 64-wide memory and O += P V costs a quarter.
//
// * q, k, v are [B, N, W] fp16 with arbitrary row/batch strides; head h of each starts at
//   column off + h*D, so a fused qkv projection [B, N, 3*H*D] is passed three times
//   (offsets 0, H*D, 2*H*D) and read in place. The output is [B, Nq, H*D] (heads merged).
// * RoPE (optional, self attention on a grid_h x grid_w row-major token grid): the head is
//   D/2 interleaved pairs (x[2p], x[2p+1]); pairs p < D/4 rotate by pos_x * f[p], the others
//   by pos_y * f[p - D/4]; f[i] = 1 / theta^(2i / (D/2)); pos = coordinate * scale. The
//   cos/sin come from a per-block table over the grid's distinct coordinates
//   (max(grid_h, grid_w) x D/4 angles, computed once per block in shared memory). q and k
//   tiles are rotated in shared memory right after they land; rotated q/k never exist in
//   global memory.
// * bias (optional): additive float32 key bias [Bb, Nk] (Bb = B, or 1 with batch stride 0),
//   clamped below at -1e30 so that even -inf stays finite (a fully masked row gives a uniform
//   softmax, as the TIR kernels do). mma.sync kernels skip the key tiles whose bias lies
//   kSkipGap or more below the batch entry's largest key bias (masked keys: their exp2 is
//   exactly 0), so empty memory slots cost almost nothing (see attention_kernel).
// * full bias (optional, mma.sync kernels): additive fp16 [Bb, H, Nq, Nk] (the DETR decoder's
//   box relative position bias), read straight from global memory into the score fragments
//   (two adjacent keys per load, so Nk must be even); it can be combined with the key bias.
// * window mode (ViT windowed blocks): the batch index is (image, window) and the rows of a
//   window are gathered from / scattered to the unpartitioned [images, img_h * img_w, W]
//   token rows (token i of window (wy, wx) is row (wy*ws + i/ws) * img_w + wx*ws + i%ws), so
//   the model needs no partition/unpartition transposes around the kernel; RoPE uses the
//   in-window positions, as for a partitioned window.
// * Softmax scale 1/sqrt(D); fp32 accumulation; online softmax in base 2 with finite
//   sentinels (no inf arithmetic).
//
// Structure: one thread block per (query tile, head, batch); each warp owns 16*MT query rows
// whose q fragments stay in registers (head dims 128/256: reloaded from shared memory per
// k-step, the O accumulator alone being D/2 floats per thread). K/V tiles of BN keys stream through a two-stage
// cp.async ring (zero-filled past the sequence end); S = Q K^T and O += P V use
// mma.sync.m16n8k16 (fp16 in, fp32 accumulate) with ldmatrix from XOR-swizzled shared
// memory. Each thread rotates exactly the 16-byte chunks it copied itself, so the rotation
// needs no extra barrier. The output is staged through shared memory for 16-byte stores.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include "device.cuh"
#include "pdl.cuh"
#include "rope.cuh"

namespace sam3_attn {
// Internal linkage for everything but the C launchers and the tvm-ffi entry points: the
// function-local statics below (launch's `configured`, wgmma_available's `state`) would
// otherwise be process-wide unique symbols (template/inline statics), shared by every
// library that links this file, so a second library in the process would skip
// cudaFuncSetAttribute and its launches fail with "invalid argument".
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInit = -3.0e38f;   // running max before any key (finite)
constexpr float kNegTail = -1.0e38f;   // score of a key past the sequence end (finite)
constexpr float kBiasFloor = -1.0e30f; // bias clamp (matches the TIR kernels)
// A key tile whose key bias lies this far (or more) below the batch entry's largest key bias
// is skipped: against the key of largest bias its keys' exp2 is exactly 0 (and a score
// before it is wiped by the rescale factor exp2(-gap) = 0) as long as |q.k| / sqrt(D) varies
// by less than this across the keys, which fp16 activations never approach.
constexpr float kSkipGap = 1.0e6f;
constexpr int kMaxSkipTiles = 4096;  // per-tile bias maxima held in shared memory (16 KiB)

struct Params {
  const half* q;
  const half* k;
  const half* v;
  const float* bias;
  const half* fbias;  // full bias [Bb, heads, nq, nk] fp16 (mma.sync kernels, BIAS), or null
  half* out;
  int64_t q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs, o_rs, bias_bs;  // strides in elements
  int64_t fb_bs, fb_hs;                                             // full bias: batch, head
  // key split (mma.sync kernels, plain mode): blockIdx.z = batch * splits + split; split s
  // takes key tiles [s * split_tiles, (s + 1) * split_tiles) and writes its unnormalised
  // output and (log2-domain max, sum) per row to `part`; combine_splits merges them
  int splits, split_tiles;
  float* part;  // [batch, heads, splits, nq, DV + 2] fp32
  // masked-tile skip (mma.sync kernels with a key bias): the number of key tiles (of the
  // kernel's BN keys) whose bias maxima are kept in shared memory; 0: no skip
  int skip_tiles;
  int smem_tail;  // attention_kernel: byte offset of the key bias in shared memory (Cfg)
  int q_off, k_off, v_off;                                          // column of head 0
  int batch, heads, nq, nk;
  int grid_h, grid_w;  // RoPE grid (grid_w > 0 when rotating)
  float rope_scale, rope_theta;
  float inv_grid_w;  // 1 / grid_w
  int rope_half;     // wgmma kernels: rotate k tiles in half2 arithmetic
  int rope_k;        // 1: rotate the k tiles too; 0: the keys arrive rotated (rope_keys_kernel)
  float scale_log2;  // softmax scale * log2(e)
  // window mode (win > 0): batch index = (image, window); q/k/v/out are the unpartitioned
  // [images, img_h * img_w, W] token rows and token i of window (wy, wx) of image `img` is
  // row (wy * win + i / win) * img_w + wx * win + i % win of image img (see row_index).
  int win;             // window side, 0: off
  int win_nw;          // windows per image row (img_w / win)
  int win_nwin;        // windows per image
  int win_w;           // img_w: tokens per image row
  uint32_t win_magic;  // ceil(2^32 / win): gr / win = umulhi(gr, magic) for gr < 2^16; 0: off
  int win_skip;        // img_w - win: rows skipped between two window rows; 0: off
};

// Token rows of one batch entry. Plain: row gr is row gr of the batch entry. Window mode:
// row gr of the window is row (gr / ws) * img_w + gr % ws = gr + (gr / ws) * (img_w - ws)
// from the window's first token; gr / ws is one umulhi with a magic multiplier (exact for
// gr < 2^16, ws < 256: the launcher's limits). Plain mode is the same formula with zeros, so
// the row addressing costs two integer instructions and no branch.
struct RowMap {
  uint32_t magic;  // ceil(2^32 / ws), 0: plain
  int skip;        // img_w - ws, 0: plain
};

__device__ __forceinline__ RowMap row_map(const Params& p) { return RowMap{p.win_magic, p.win_skip}; }

__device__ __forceinline__ int row_index(const RowMap& m, int gr) {
  return gr + int(__umulhi(uint32_t(gr), m.magic)) * m.skip;
}

// Element offset of batch entry b's first token (window mode: the window's top-left token).
__device__ __forceinline__ int64_t batch_offset(const Params& p, int b, int64_t bs, int64_t rs) {
  if (p.win == 0) return int64_t(b) * bs;
  const int img = b / p.win_nwin, rem = b - img * p.win_nwin;
  const int wy = rem / p.win_nw, wx = rem - wy * p.win_nw;
  return int64_t(img) * bs + (int64_t(wy) * p.win * p.win_w + int64_t(wx) * p.win) * rs;
}

// Where block (blockIdx.y = head, blockIdx.z = batch entry) reads and writes: the head's
// first q/k/v element, its key bias, the row map. Shared by both kernels' prologues.
struct BlockInputs {
  const half* q;
  const half* k;
  const half* v;
  const float* bias;
  const half* fbias;  // this (batch, head)'s [nq, nk] full bias, or null
  RowMap rm;
};

template <int D, bool BIAS, int DV = D>
__device__ __forceinline__ BlockInputs block_inputs(const Params& p, int b, int h) {
  return BlockInputs{p.q + batch_offset(p, b, p.q_bs, p.q_rs) + p.q_off + h * D,
                     p.k + batch_offset(p, b, p.k_bs, p.k_rs) + p.k_off + h * D,
                     p.v + batch_offset(p, b, p.v_bs, p.v_rs) + p.v_off + h * DV,
                     BIAS && p.bias ? p.bias + b * p.bias_bs : nullptr,
                     BIAS && p.fbias ? p.fbias + b * p.fb_bs + h * p.fb_hs : nullptr, row_map(p)};
}

// Why the last launcher call on this thread failed (for the tvm-ffi error message).
inline const char*& last_failure() {
  static thread_local const char* why = "";
  return why;
}
inline cudaError_t fail(const char* why, cudaError_t err = cudaErrorInvalidValue) {
  last_failure() = why;
  return err;
}

// ---------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                        const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                          const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Key `key`'s bias in the log2 domain: 0 without a key bias, the tail sentinel past nk.
__device__ __forceinline__ float key_bias_log2(const float* gbias, int key, int nk) {
  return key < nk ? (gbias ? fmaxf(gbias[key], kBiasFloor) * kLog2e : 0.f) : kNegTail;
}

// Sum over the four lanes that hold one row of an mma fragment.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows, D] fp16 tile, XOR-swizzled
// so that ldmatrix's 8 row reads of one chunk column hit 8 different bank groups.
// Rows of 128 bytes or more (head dim 64, 128, 256) XOR the low three chunk bits, which
// permutes each 128-byte group of a row.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(D == 32 || D == 64 || D == 128 || D == 256, "head dim 32, 64, 128 or 256");
  if constexpr (D >= 64) {
    return row * D + ((chunk ^ (row & 7)) << 3);
  } else {
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
  }
}

// ---------------------------------------------------------------- tile movement

// Copy rows [row0, row0 + ROWS) of a head (gmem points at row 0, column of the head) into a
// swizzled tile; rows at or past `nrows` are zero-filled.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(half* s, const half* g, int64_t rs, int row0, int nrows,
                                          int tid, const RowMap& rm) {
  constexpr int CH = D / 8;
  constexpr int TOTAL = ROWS * CH;
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int idx = it * NT + tid;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CH, c = idx % CH;
      const int gr = row0 + r;
      const bool ok = gr < nrows;
      cp_async16(s + swz<D>(r, c), g + int64_t(row_index(rm, ok ? gr : 0)) * rs + c * 8, ok);
    }
  }
}

// One 16-byte chunk (4 interleaved pairs) rotated by table entries tab[e0 .. e0 + 3] in float32
// (one rounding): shared by the inline rotation (rope_tile) and rope_keys_kernel, so the two
// paths give bit-identical keys.
__device__ __forceinline__ uint4 rotate_chunk(const uint4 val, const float2* tab, int e0) {
  uint32_t w[4] = {val.x, val.y, val.z, val.w};
  const float4* t = reinterpret_cast<const float4*>(tab + e0);
  const float4 t01 = t[0], t23 = t[1];
  const float cs[4] = {t01.x, t01.z, t23.x, t23.z};
  const float sn[4] = {t01.y, t01.w, t23.y, t23.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 xy = __half22float2(*reinterpret_cast<__half2*>(&w[e]));
    w[e] = pack_half2(xy.x * cs[e] - xy.y * sn[e], xy.x * sn[e] + xy.y * cs[e]);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Rotate, in place, the chunks this thread copied with load_tile (same index mapping).
// tab[coord * D/4 + i] = (cos, sin) of coord * scale * f[i] (float32 arithmetic, one rounding);
// HALF: tabh[...] = {(cos, cos), (-sin, sin)} as half2 pairs and the rotation in half2
// arithmetic (two roundings; what a PyTorch fp16 RoPE does, at half the instructions).
// Token coordinates come from a float reciprocal of grid_w (exact after the +-1 fix-up).
template <int D, int ROWS, int NT, bool HALF = false>
__device__ __forceinline__ void rope_tile(half* s, int row0, int nrows, const float2* tab,
                                          const uint2* tabh, int grid_w, float inv_gw, int tid) {
  constexpr int CH = D / 8;
  constexpr int Q4 = D / 4;
  constexpr int TOTAL = ROWS * CH;
  static_assert(NT % CH == 0, "each thread keeps one chunk column");
  const int c = tid % CH;
  const int p0 = c * 4;  // first pair of the chunk; a chunk never straddles the x/y halves
  const bool is_x = p0 < Q4;
  const int i0 = is_x ? p0 : p0 - Q4;
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int idx = it * NT + tid;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CH;
      const int gr = row0 + r;
      if (gr < nrows) {
        int gy = __float2int_rd((float(gr) + 0.5f) * inv_gw);
        int gx = gr - gy * grid_w;
        if (gx < 0) {
          gy -= 1;
          gx += grid_w;
        } else if (gx >= grid_w) {
          gy += 1;
          gx -= grid_w;
        }
        const int e0 = (is_x ? gx : gy) * Q4 + i0;
        uint4* ptr = reinterpret_cast<uint4*>(s + swz<D>(r, c));
        uint4 val = *ptr;
        uint32_t w[4] = {val.x, val.y, val.z, val.w};
        if constexpr (HALF) {
          const uint4 t0 = *reinterpret_cast<const uint4*>(tabh + e0);
          const uint4 t1 = *reinterpret_cast<const uint4*>(tabh + e0 + 2);
          const uint32_t cc[4] = {t0.x, t0.z, t1.x, t1.z};
          const uint32_t ss[4] = {t0.y, t0.w, t1.y, t1.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const __half2 v = *reinterpret_cast<const __half2*>(&w[e]);
            const __half2 r2 = __hfma2(__lowhigh2highlow(v), *reinterpret_cast<const __half2*>(&ss[e]),
                                       __hmul2(v, *reinterpret_cast<const __half2*>(&cc[e])));
            w[e] = *reinterpret_cast<const uint32_t*>(&r2);
          }
          *ptr = make_uint4(w[0], w[1], w[2], w[3]);
        } else {
          *ptr = rotate_chunk(val, tab, e0);
        }
      }
    }
  }
}

// cos/sin table over the grid's distinct coordinates (and its half2 form when tabh is set).
template <int D, int NT>
__device__ __forceinline__ void build_rope_table(int grid_h, int grid_w, float rope_scale, float rope_theta,
                                                 float2* tab, uint2* tabh, int tid) {
  constexpr int Q4 = D / 4;
  const int g = max(grid_h, grid_w);
  for (int e = tid; e < g * Q4; e += NT) {
    const int c = e / Q4, i = e - (e / Q4) * Q4;
    const float2 t = sam3_cuda::rope_cos_sin(c, i, D, rope_scale, rope_theta);
    tab[e] = t;
    if (tabh != nullptr) tabh[e] = make_uint2(pack_half2(t.x, t.x), pack_half2(-t.y, t.y));
  }
}

// ---------------------------------------------------------------- keys rotated once

// Rotated keys for the attention kernels' "keys arrive rotated" mode (Params::rope_k = 0).
// With inline RoPE every query block rotates every k tile it reads (each key 41 times in a
// global ViT block, a quarter of the kernel's time: docs/attention_cuda.md). This kernel
// rotates each key once, from the head columns of a fused
// projection into a compact [B, N, heads * D] buffer, with exactly the arithmetic of
// rope_tile (same table, same float32 rotation, one rounding), so the attention result is
// the same as with inline rotation; q stays rotated inline (once per query tile).
// Positions: window == 0: token t of a batch entry sits at (t / grid_w, t % grid_w) of the
// RoPE grid; window > 0: token t of an img_h x img_w image at (y, x) = (t / img_w, t % img_w)
// sits at (y % window, x % window) of its window (the window-mode attention's positions).
// With cols > hidden (the q/k rotation of a fused projection, sam3_rope_qk_cuda) the dst rows
// are `cols` wide: the first `hidden` columns rotated, the rest copied as they are (v).
struct RopeKeysParams {
  const half* src;  // column k_off of row 0 of batch entry 0
  half* dst;        // [batch, n, cols], compact
  int64_t src_bs, src_rs;
  int batch, n, hidden, cols;
  int grid_h, grid_w;
  float rope_scale, rope_theta;
  int window, img_w;
};

template <int D>
__global__ void __launch_bounds__(256) rope_keys_kernel(const RopeKeysParams rp) {
  constexpr int Q4 = D / 4, CH = D / 8, NT = 256, U = 4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float2* tab = reinterpret_cast<float2*>(smem_raw);
  // the table needs only the parameters: built before waiting on the previous kernel; few
  // blocks (a grid-stride loop over the chunks) so that it is built few times
  build_rope_table<D, NT>(rp.grid_h, rp.grid_w, rp.rope_scale, rp.rope_theta, tab, nullptr, threadIdx.x);
  __syncthreads();
  sam3_cuda::pdl_wait_then_release();
  const int chunks = rp.cols / 8;  // 16-byte chunks per row
  const int rot_chunks = rp.hidden / 8;
  const int total = rp.batch * rp.n * chunks;
  for (int base = blockIdx.x * (NT * U) + threadIdx.x; base < total; base += gridDim.x * (NT * U)) {
    uint4 val[U];
    int row[U], cc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // U independent 16-byte loads in flight per thread
      const int idx = base + u * NT;
      row[u] = idx / chunks;
      cc[u] = idx - row[u] * chunks;
      if (idx < total) {
        const int b = row[u] / rp.n, t = row[u] - b * rp.n;
        val[u] = *reinterpret_cast<const uint4*>(rp.src + int64_t(b) * rp.src_bs + int64_t(t) * rp.src_rs +
                                                 cc[u] * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * NT >= total) break;
      half* out = rp.dst + int64_t(row[u]) * rp.cols + cc[u] * 8;
      if (cc[u] >= rot_chunks) {
        *reinterpret_cast<uint4*>(out) = val[u];
        continue;
      }
      const int b = row[u] / rp.n, t = row[u] - b * rp.n;
      int gy, gx;
      if (rp.window > 0) {
        gy = (t / rp.img_w) % rp.window;
        gx = (t % rp.img_w) % rp.window;
      } else {
        gy = t / rp.grid_w;
        gx = t - gy * rp.grid_w;
      }
      const int p0 = (cc[u] % CH) * 4;  // first pair of the chunk within its head
      const bool is_x = p0 < Q4;
      const int e0 = (is_x ? gx : gy) * Q4 + (is_x ? p0 : p0 - Q4);
      *reinterpret_cast<uint4*>(out) = rotate_chunk(val[u], tab, e0);
    }
  }
}

// ---------------------------------------------------------------- the kernel

// Shared memory of attention_kernel, in this order: the q tile [BM, D]; k/v stages 0 and 1
// ([BN, D] k then [BN, DV] v each); the RoPE table; at Params::smem_tail, the key bias of both stages
// and the per-tile key bias maxima of the masked-tile skip (skip_tiles + one per warp). When
// the keys arrive rotated the table is needed only for the q tile, before stage 1 is first
// written, so it overlays stage 1 (head dim 256 on a 72x72 grid: 36 KiB of table).
template <int D, int DV, int NW, int MT, int BN, bool ROPE, bool BIAS>
struct Cfg {
  static constexpr int NT = NW * 32;
  static constexpr int BM = 16 * MT * NW;
  static constexpr int Q4 = D / 4;
  // q fragments in registers: 4 * MT * D / 16 of them, at most 32 (head dim 64 at two m-tiles,
  // 128 at one); head dim 256 reloads them per k-step (its O accumulator takes 128 registers)
  static constexpr bool QREG = MT * D <= 128;
  // masked-tile skip for head dims 128/256 (the video tracker's memory attention, whose empty
  // memory slots are masked); the shorter key sets of the other dims gain nothing from it
  static constexpr bool SKIP = BIAS && D >= 128;
  static constexpr int STAGE = BN * (D + DV);  // elements of one k/v stage
  static constexpr int STAGE1 = (BM * D + STAGE) * 2;  // byte offset of stage 1
  // byte offset of the key bias: after the table, or after stage 1 and the overlaid table
  static constexpr int tail_offset(int table_rows, bool table_over_stage1) {
    const int end = STAGE1 + STAGE * 2, tab = ROPE ? table_rows * Q4 * 8 : 0;
    const int t = table_over_stage1 ? (STAGE1 + tab > end ? STAGE1 + tab : end) : end + tab;
    return (t + 15) & ~15;
  }
  static constexpr int smem_bytes(int table_rows, int skip_tiles, bool table_over_stage1) {
    return tail_offset(table_rows, table_over_stage1) + (BIAS ? 2 * BN * 4 : 0) +
           (skip_tiles > 0 ? (skip_tiles + NW) * 4 : 0);
  }
};

template <int D, int DV, int NW, int MT, int BN, bool ROPE, bool BIAS>
__global__ void __launch_bounds__(NW * 32)
    attention_kernel(const Params p) {
  sam3_cuda::pdl_wait_then_release();
  using C = Cfg<D, DV, NW, MT, BN, ROPE, BIAS>;
  constexpr int NT = C::NT, BM = C::BM;
  constexpr bool QREG = C::QREG;
  constexpr int KS = D / 16;   // k-steps of Q K^T
  constexpr int NS = BN / 8;   // n8 tiles of S
  constexpr int DS = DV / 8;   // n8 tiles of O
  static_assert(BN % 32 == 0 && D % 16 == 0 && DV % 16 == 0 && DV <= D, "tile shape");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  half* sQ = reinterpret_cast<half*>(smem_raw);
  half* sS0 = sQ + BM * D;                                             // k/v stage 0
  half* sS1 = sS0 + C::STAGE;                                          // k/v stage 1
  float2* sTab = reinterpret_cast<float2*>(p.rope_k ? sS1 + C::STAGE : sS1);  // (ROPE)
  float* sBias = reinterpret_cast<float*>(smem_raw + p.smem_tail);     // 2 stages (BIAS)
  float* sTileMax = sBias + (BIAS ? 2 * BN : 0);                       // (skip_tiles)

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int q0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int split = p.splits > 1 ? int(blockIdx.z) % p.splits : 0;
  const int b = p.splits > 1 ? int(blockIdx.z) / p.splits : int(blockIdx.z);

  const BlockInputs in = block_inputs<D, BIAS, DV>(p, b, h);
  const half *gq = in.q, *gk = in.k, *gv = in.v;
  const float* gbias = in.bias;
  const half* gfb = in.fbias;
  const RowMap rm = in.rm;
  const int nk = p.nk, nq = p.nq;
  const int all_tiles = (nk + BN - 1) / BN;
  const int j_begin = p.splits > 1 ? split * p.split_tiles : 0;
  const int j_end = p.splits > 1 ? min(all_tiles, j_begin + p.split_tiles) : all_tiles;

  load_tile<D, BM, NT>(sQ, gq, p.q_rs, q0, nq, tid, rm);

  // Masked-tile skip: the key bias is the same for every query row of the batch entry, so
  // whether a tile contributes is block-uniform. The warps take each tile's bias maximum
  // (log2 domain; keys past nk at the tail sentinel), several loads per lane in flight;
  // tiles whose maximum lies kSkipGap or more below the largest are never loaded. A row
  // whose keys are all masked alike (one bias value) keeps every tile: the uniform softmax
  // of before. The tiles that remain run the same arithmetic as without the skip.
  float skip_below = kNegInit;  // tiles with a bias maximum below this are skipped
  if constexpr (C::SKIP) {
    if (p.skip_tiles > 0) {
      float wmax = kNegInit;
      if (nk % 4 == 0 && (reinterpret_cast<uintptr_t>(gbias) & 15) == 0) {
        // 16-byte loads: lane l of a warp reads keys 4c..4c+3 (c = its chunk), the BN/4 lanes
        // of a tile reduce; U chunks in flight per lane (8 made ptxas spill at head dim 256).
        // The maximum of the clamped, scaled values is the clamped, scaled maximum (monotonic).
        constexpr int U = 4, LT = BN / 4;  // lanes per tile
        const int chunks = nk / 4;
        const float4* g4 = reinterpret_cast<const float4*>(gbias);
        for (int c0 = warp * 32 + lane; c0 - lane < chunks; c0 += NW * 32 * U) {
          float4 v[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int c = c0 + u * NW * 32;
            v[u] = c < chunks ? g4[c] : make_float4(kNegInit, kNegInit, kNegInit, kNegInit);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float m = fmaxf(fmaxf(v[u].x, v[u].y), fmaxf(v[u].z, v[u].w));
            m = fmaxf(m, kBiasFloor) * kLog2e;
#pragma unroll
            for (int o = 1; o < LT; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            const int t = (c0 + u * NW * 32) / LT;
            if (lane % LT == 0 && t < all_tiles) sTileMax[t] = m;
            wmax = fmaxf(wmax, m);
          }
        }
      } else {
        constexpr int R = BN / 32, U = 8 / R;
        for (int t0 = warp; t0 < all_tiles; t0 += NW * U) {
          float v[U][R];
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const int t = t0 + u * NW;
              v[u][r] = t < all_tiles ? key_bias_log2(gbias, t * BN + r * 32 + lane, nk) : kNegInit;
            }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float m = v[u][0];
#pragma unroll
            for (int r = 1; r < R; ++r) m = fmaxf(m, v[u][r]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            const int t = t0 + u * NW;
            if (lane == 0 && t < all_tiles) sTileMax[t] = m;
            wmax = fmaxf(wmax, m);
          }
        }
      }
      if (lane == 0) sTileMax[p.skip_tiles + warp] = wmax;
      __syncthreads();
      float bmax = kNegInit;
#pragma unroll
      for (int w = 0; w < NW; ++w) bmax = fmaxf(bmax, sTileMax[p.skip_tiles + w]);
      skip_below = bmax - kSkipGap * kLog2e;
    }
  }
  // the first tile at or after t (below j_end) that is not skipped
  auto next_tile = [&](int t) {
    if (C::SKIP && p.skip_tiles > 0)
      while (t < j_end && sTileMax[t] < skip_below) ++t;
    return t;
  };
  int j = next_tile(j_begin);
  const int kv_start = j * BN;

  // q tile and the first k/v tile start copying before the rotation table is built
  if (j < j_end) {
    load_tile<D, BN, NT>(sS0, gk, p.k_rs, kv_start, nk, tid, rm);
    load_tile<DV, BN, NT>(sS0 + BN * D, gv, p.v_rs, kv_start, nk, tid, rm);
  }
  cp_async_commit();

  float bias_next = 0.f;
  if constexpr (BIAS) {
    if (tid < BN) {
      const int key = kv_start + tid;
      bias_next = key_bias_log2(gbias, key, nk);
    }
  }
  if constexpr (ROPE) build_rope_table<D, NT>(p.grid_h, p.grid_w, p.rope_scale, p.rope_theta, sTab, nullptr, tid);
  if constexpr (BIAS) {
    if (tid < BN) sBias[tid] = bias_next;
  }
  cp_async_wait_all();
  if constexpr (ROPE) {
    __syncthreads();  // the table
    rope_tile<D, BM, NT>(sQ, q0, nq, sTab, nullptr, p.grid_w, p.inv_grid_w, tid);
    if (p.rope_k && j < j_end) rope_tile<D, BN, NT>(sS0, kv_start, nk, sTab, nullptr, p.grid_w, p.inv_grid_w, tid);
  }
  __syncthreads();

  // q fragments (A operand, row-major): kept in registers (QREG) or reloaded per k-step
  auto load_q = [&](uint32_t* f, int mt, int ks) {
    const int row = warp * 16 * MT + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int ch = ks * 2 + (lane >> 4);
    ldsm_x4(f[0], f[1], f[2], f[3], sQ + swz<D>(row, ch));
  };
  uint32_t qf[MT][QREG ? KS : 1][4];
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) load_q(qf[mt][ks], mt, ks);
  }

  float o[MT][DS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int d = 0; d < DS; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][d][e] = 0.f;
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      m_run[mt][hr] = kNegInit;
      l_run[mt][hr] = 0.f;
    }
  // no bias: scores stay raw and the scale is applied inside exp2; bias: scores become
  // log2-domain logits first (scale 1 afterwards)
  const float sc = BIAS ? 1.f : p.scale_log2;

  for (int st = 0; j < j_end; st ^= 1) {
    const int kv0 = j * BN;
    const int jn = next_tile(j + 1);
    const bool has_next = jn < j_end;
    half* const nS = st ? sS0 : sS1;  // the other stage
    if (has_next) {
      const int kv1 = jn * BN;
      load_tile<D, BN, NT>(nS, gk, p.k_rs, kv1, nk, tid, rm);
      load_tile<DV, BN, NT>(nS + BN * D, gv, p.v_rs, kv1, nk, tid, rm);
      cp_async_commit();
      if constexpr (BIAS) {
        if (tid < BN) {
          const int key = kv1 + tid;
          bias_next = key_bias_log2(gbias, key, nk);
        }
      }
    }
    const half* cK = st ? sS1 : sS0;
    const half* cV = cK + BN * D;

    // ---- S = Q K^T
    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (QREG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[mt][e] = qf[mt][ks][e];
        } else {
          load_q(qa[mt], mt, ks);
        }
      }
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t b0, b1, b2, b3;
        const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
        const int ch = ks * 2 + ((lane >> 3) & 1);
        ldsm_x4(b0, b1, b2, b3, cK + swz<D>(row, ch));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], qa[mt], b0, b1);
          mma16816(s[mt][2 * np + 1], qa[mt], b2, b3);
        }
      }
    }

    // ---- bias, tail, online softmax
    const int col_base = kv0 + 2 * (lane & 3);
    if constexpr (BIAS) {
      const float* cb = sBias + st * BN;
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const float2 bb = *reinterpret_cast<const float2*>(cb + n * 8 + 2 * (lane & 3));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          s[mt][n][0] = fmaf(s[mt][n][0], p.scale_log2, bb.x);
          s[mt][n][1] = fmaf(s[mt][n][1], p.scale_log2, bb.y);
          s[mt][n][2] = fmaf(s[mt][n][2], p.scale_log2, bb.x);
          s[mt][n][3] = fmaf(s[mt][n][3], p.scale_log2, bb.y);
        }
      }
      if (gfb != nullptr) {  // full bias: nk even, so a pair of columns is one aligned half2
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int row = q0 + warp * 16 * MT + mt * 16 + (lane >> 2) + hr * 8;
            if (row >= nq) continue;
            const half* rp = gfb + int64_t(row) * nk;
#pragma unroll
            for (int n = 0; n < NS; ++n) {
              const int col = col_base + n * 8;
              if (col < nk) {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(rp + col));
                s[mt][n][2 * hr] = fmaf(f.x, kLog2e, s[mt][n][2 * hr]);
                s[mt][n][2 * hr + 1] = fmaf(f.y, kLog2e, s[mt][n][2 * hr + 1]);
              }
            }
          }
        }
      }
    }
    if (kv0 + BN > nk) {
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (col_base + n * 8 + (e & 1) >= nk) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][n][e] = kNegTail;
          }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = m_run[mt][hr];
#pragma unroll
        for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hr], s[mt][n][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float alpha = fast_exp2((m_run[mt][hr] - mx) * sc);
        m_run[mt][hr] = mx;
        const float msc = mx * sc;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          s[mt][n][2 * hr] = fast_exp2(fmaf(s[mt][n][2 * hr], sc, -msc));
          s[mt][n][2 * hr + 1] = fast_exp2(fmaf(s[mt][n][2 * hr + 1], sc, -msc));
          sum += s[mt][n][2 * hr] + s[mt][n][2 * hr + 1];
        }
        l_run[mt][hr] = l_run[mt][hr] * alpha + sum;
#pragma unroll
        for (int d = 0; d < DS; ++d) {
          o[mt][d][2 * hr] *= alpha;
          o[mt][d][2 * hr + 1] *= alpha;
        }
      }
    }

    // ---- O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DS / 2; ++dp) {
        uint32_t b0, b1, b2, b3;
        const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = dp * 2 + (lane >> 4);
        ldsm_x4_t(b0, b1, b2, b3, cV + swz<DV>(row, ch));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * dp], pa[mt], b0, b1);
          mma16816(o[mt][2 * dp + 1], pa[mt], b2, b3);
        }
      }
    }

    if (has_next) {
      cp_async_wait_all();
      if (ROPE && p.rope_k)
        rope_tile<D, BN, NT>(nS, jn * BN, nk, sTab, nullptr, p.grid_w, p.inv_grid_w, tid);
      if constexpr (BIAS) {
        if (tid < BN) sBias[(st ^ 1) * BN + tid] = bias_next;
      }
    }
    __syncthreads();
    j = jn;
  }

  if (p.splits > 1) {  // ---- key split: this split's unnormalised rows, max and sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float l = quad_sum(l_run[mt][hr]);
        const int row = q0 + warp * 16 * MT + mt * 16 + (lane >> 2) + hr * 8;
        if (row >= nq) continue;
        float* dst = p.part + ((int64_t(b * p.heads + h) * p.splits + split) * nq + row) * (DV + 2);
#pragma unroll
        for (int d = 0; d < DS; ++d)
          *reinterpret_cast<float2*>(dst + d * 8 + 2 * (lane & 3)) =
              make_float2(o[mt][d][2 * hr], o[mt][d][2 * hr + 1]);
        if ((lane & 3) == 0) *reinterpret_cast<float2*>(dst + DV) = make_float2(m_run[mt][hr] * sc, l);
      }
    }
    return;
  }

  // ---- normalise, stage through this warp's rows of sQ, 16-byte stores (DV < D: rows of DV
  // elements, which overlap other warps' q rows: every warp must be done with them)
  if constexpr (DV != D) __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float l = quad_sum(l_run[mt][hr]);
      const float inv = 1.f / l;
      const int row = warp * 16 * MT + mt * 16 + (lane >> 2) + hr * 8;
#pragma unroll
      for (int d = 0; d < DS; ++d) {
        const uint32_t v = pack_half2(o[mt][d][2 * hr] * inv, o[mt][d][2 * hr + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swz<DV>(row, d) + 2 * (lane & 3)) = v;
      }
    }
  }
  __syncwarp();
  {
    constexpr int CH = DV / 8;
    constexpr int ROWS = 16 * MT;
    half* go = p.out + batch_offset(p, b, p.o_bs, p.o_rs) + h * DV;
#pragma unroll
    for (int it = 0; it < ROWS * CH / 32; ++it) {
      const int idx = it * 32 + lane;
      const int r = warp * ROWS + idx / CH, c = idx % CH;
      const int gr = q0 + r;
      if (gr < nq) {
        *reinterpret_cast<uint4*>(go + int64_t(row_index(rm, gr)) * p.o_rs + c * 8) =
            *reinterpret_cast<const uint4*>(sQ + swz<DV>(r, c));
      }
    }
  }
}

// ---------------------------------------------------------------- Hopper (sm_90a): wgmma

// Head dim 64 on sm_90a: the same algorithm with warpgroup MMAs. Each consumer warpgroup owns
// 64 query rows; S = Q K^T reads q and k straight from shared memory (wgmma descriptors over
// the same 128-byte XOR-swizzled tiles, which are exactly the SWIZZLE_128B canonical layout),
// O += P V takes P from registers (the S accumulator layout converts to the A fragment in
// place) and V from shared memory as an N-major operand. Fewer registers than the mma.sync
// kernel (no q fragments, no ldmatrix), so two blocks share a multiprocessor and one block's
// softmax overlaps the other's tensor-core work.

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAM3_WGMMA 1
#endif

// Shared-memory matrix descriptor, 128-byte swizzle; byte offsets in 16-byte units.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t saddr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= uint64_t((saddr >> 4) & 0x3FFF);
  d |= uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= uint64_t(1) << 62;
  return d;
}

__device__ __forceinline__ void fence_f32(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_u32(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

#ifdef SAM3_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define SAM3_D32(d)                                                                                \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),      \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),      \
  "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d[64 x 64] (+)= A[64 x 16] (smem, K-major) * B[16 x 64] (smem, K-major)
__device__ __forceinline__ void wgmma_ss_64x64(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : SAM3_D32(d)
      : "l"(da), "l"(db), "r"(accumulate));
}

// d[64 x 64] += A[64 x 16] (registers) * B[16 x 64] (smem, N-major)
__device__ __forceinline__ void wgmma_rs_64x64_tb(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : SAM3_D32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}
#endif

template <int NWG, bool ROPE, bool BIAS>
struct WgCfg {
  static constexpr int D = 64, BN = 64, NT = NWG * 128, BM = NWG * 64, Q4 = D / 4;
  // the pipelined loop for two warpgroups only: with one (four blocks per multiprocessor) it
  // measured slower than the serial loop (docs/attention_cuda.md, "Pipelined loop")
  static constexpr bool PIPE = NWG == 2;
  static constexpr int STAGES = PIPE ? 4 : 3;
  static constexpr int smem_bytes(int table_rows) {
    return 1024 + (BM * D + 2 * STAGES * BN * D) * 2 + (BIAS ? STAGES * BN * 4 : 0) +
           (ROPE ? table_rows * Q4 * 16 : 0);
  }
};

// The steps of one 64-row warpgroup on one 64-key tile (head dim 64), shared by both loops.
namespace wgstep {
constexpr int D = 64, BN = 64, NS = BN / 8, DS = D / 8;

#ifdef SAM3_WGMMA
// S = Q K^T (4 k-steps of 16; +32 bytes along the swizzled rows): issued and committed
__device__ __forceinline__ void issue_s(float* s, uint32_t q_addr, uint32_t k_addr) {
#pragma unroll
  for (int i = 0; i < NS * 4; ++i) s[i] = 0.f;
  const uint64_t dq = gmma_desc(q_addr, 16, 1024);
  const uint64_t dk = gmma_desc(k_addr, 16, 1024);
#pragma unroll
  for (int i = 0; i < NS * 4; ++i) fence_f32(s[i]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) wgmma_ss_64x64(s, dq + 2 * ks, dk + 2 * ks, ks > 0);
  wgmma_commit();
}

// O += P V (P: A fragments from the S accumulators; V: N-major, +2048 bytes per 16 keys):
// issued and committed
__device__ __forceinline__ void issue_pv(float* o, uint32_t (*pa)[4], uint32_t v_addr) {
  const uint64_t dv = gmma_desc(v_addr, 1024, 1024);
#pragma unroll
  for (int i = 0; i < DS * 4; ++i) fence_f32(o[i]);
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) fence_u32(pa[kk][e]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_64x64_tb(o, pa[kk], dv + 128 * kk);
  wgmma_commit();
}

template <int N>
__device__ __forceinline__ void wait_all(float* r) {
  wgmma_wait0();
#pragma unroll
  for (int i = 0; i < N; ++i) fence_f32(r[i]);
}
#endif

// A row's reference maximum moves only when the tile's maximum exceeds it by more than
// kRescaleLog2 in the exp2 domain, so P = 2^(s sc - m sc) <= 2^8 (within fp16's range, at its
// full relative precision) and O is rescaled only after such a jump: after the first tiles
// almost never, where an exact running max rescaled O on most tiles (32 multiplies per thread
// and tile). The result is the same softmax: numerator and denominator share m.
constexpr float kRescaleLog2 = 8.f;

// Bias, tail and online softmax of one S tile in place (rows warp*16 + lane/4 and +8 of the
// warpgroup): the scores become unnormalised base-2 probabilities, the reference max (see
// kRescaleLog2) and the sum advance, alpha = the factor O must be scaled by (1 for a row whose
// reference did not move).
template <bool BIAS>
__device__ __forceinline__ void softmax(float* s, float* m_run, float* l_run, float* alpha,
                                        const float* cb, int kv0, int nk, float sc,
                                        float scale_log2, int lane) {
  const int col_base = kv0 + 2 * (lane & 3);
  if constexpr (BIAS) {
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const float2 bb = *reinterpret_cast<const float2*>(cb + n * 8 + 2 * (lane & 3));
      s[4 * n + 0] = fmaf(s[4 * n + 0], scale_log2, bb.x);
      s[4 * n + 1] = fmaf(s[4 * n + 1], scale_log2, bb.y);
      s[4 * n + 2] = fmaf(s[4 * n + 2], scale_log2, bb.x);
      s[4 * n + 3] = fmaf(s[4 * n + 3], scale_log2, bb.y);
    }
  }
  if (kv0 + BN > nk) {
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (col_base + n * 8 + (e & 1) >= nk) s[4 * n + e] = kNegTail;
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float mx = m_run[hr];
#pragma unroll
    for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * hr], s[4 * n + 2 * hr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // (the first tile always moves it: m_run starts at kNegInit, the product is then huge)
    const float m_new = (mx - m_run[hr]) * sc > kRescaleLog2 ? mx : m_run[hr];
    alpha[hr] = fast_exp2((m_run[hr] - m_new) * sc);  // exactly 1 where the reference stays
    m_run[hr] = m_new;
    const float msc = m_new * sc;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      s[4 * n + 2 * hr] = fast_exp2(fmaf(s[4 * n + 2 * hr], sc, -msc));
      s[4 * n + 2 * hr + 1] = fast_exp2(fmaf(s[4 * n + 2 * hr + 1], sc, -msc));
      sum += s[4 * n + 2 * hr] + s[4 * n + 2 * hr + 1];
    }
    l_run[hr] = l_run[hr] * alpha[hr] + sum;
  }
}

// Scale O by alpha, only when some row of the warp saw a new maximum (rare after the first
// tiles).
__device__ __forceinline__ void rescale(float* o, const float* alpha) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int d = 0; d < DS; ++d) {
      o[4 * d + 0] *= alpha[0];
      o[4 * d + 1] *= alpha[0];
      o[4 * d + 2] *= alpha[1];
      o[4 * d + 3] *= alpha[1];
    }
  }
}

// P as fp16 A fragments: the S accumulator layout converts in place
__device__ __forceinline__ void pack_p(const float* s, uint32_t (*pa)[4]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    pa[kk][0] = pack_half2(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = pack_half2(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack_half2(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack_half2(s[8 * kk + 6], s[8 * kk + 7]);
  }
}
}  // namespace wgstep

// Two loops over the k/v tiles (WgCfg::PIPE selects):
// * serial (three-stage ring): per tile, S = Q K^T, the softmax, then O += P V, each waited
//   before the next; while the tensor cores compute S for tile j, the threads finish tile j+1
//   (its copies were issued an iteration earlier), so an inline k rotation is off the
//   critical path; tile j+2 is being copied meanwhile.
// * pipelined (four-stage ring): O += P_{j-1} V_{j-1} runs on the tensor cores while the
//   warpgroup computes the softmax of tile j (FlashAttention 3's intra-warpgroup overlap).
//   Only `wgmma.wait_group 0` is used (S_j is waited before P V is issued), so ptxas can
//   follow which accumulators are in flight; P is double-buffered in registers. Same
//   arithmetic in the same order as the serial loop: bit-identical output.
template <int NWG, bool ROPE, bool BIAS>
__global__ void __launch_bounds__(NWG * 128, NWG == 2 ? 2 : 4)
    attention_wgmma_kernel(const Params p) {
#ifdef SAM3_WGMMA
  sam3_cuda::pdl_wait_then_release();
  using C = WgCfg<NWG, ROPE, BIAS>;
  constexpr bool PIPE = C::PIPE;
  using namespace wgstep;
  constexpr int NT = C::NT, BM = C::BM, Q4 = C::Q4, ST = C::STAGES;
  constexpr int TILE = BN * D;  // elements of one k or v stage

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // 1024-byte aligned base: the swizzle pattern follows absolute address bits
  const uint32_t raw_addr = smem_u32(smem_raw);
  unsigned char* base = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
  half* sQ = reinterpret_cast<half*>(base);
  half* sK = sQ + BM * D;
  half* sV = sK + ST * TILE;
  float* sBias = reinterpret_cast<float*>(sV + ST * TILE);
  float2* sTab = reinterpret_cast<float2*>(sBias + (BIAS ? ST * BN : 0));
  const int tab_rows = ROPE ? max(p.grid_h, p.grid_w) : 0;
  uint2* sTabH = reinterpret_cast<uint2*>(sTab + tab_rows * Q4);

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int warp_in_wg = (tid >> 5) & 3, lane = tid & 31;
  const int q0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;

  const BlockInputs in = block_inputs<D, BIAS>(p, b, h);
  const half *gq = in.q, *gk = in.k, *gv = in.v;
  const float* gbias = in.bias;
  const RowMap rm = in.rm;
  const int nk = p.nk, nq = p.nq;
  const int ntiles = (nk + BN - 1) / BN;
  const bool rope_half = ROPE && p.rope_half;

  auto bias_val = [&](int key) {
    return key_bias_log2(gbias, key, nk);
  };
  auto rotate_k_tile = [&](int tile) {
    half* dst = sK + (tile % ST) * TILE;
    if (rope_half)
      rope_tile<D, BN, NT, true>(dst, tile * BN, nk, sTab, sTabH, p.grid_w, p.inv_grid_w, tid);
    else
      rope_tile<D, BN, NT, false>(dst, tile * BN, nk, sTab, sTabH, p.grid_w, p.inv_grid_w, tid);
  };
  auto load_kv = [&](int tile) {
    load_tile<D, BN, NT>(sK + (tile % ST) * TILE, gk, p.k_rs, tile * BN, nk, tid, rm);
    load_tile<D, BN, NT>(sV + (tile % ST) * TILE, gv, p.v_rs, tile * BN, nk, tid, rm);
  };

  // prologue: group 0 = q + tile 0, then one group per following tile of the ring's
  // look-ahead (possibly empty): tile 1 (serial), tiles 1 and 2 (pipelined)
  load_tile<D, BM, NT>(sQ, gq, p.q_rs, q0, nq, tid, rm);
  load_kv(0);
  cp_async_commit();
#pragma unroll
  for (int t = 1; t < ST - 1; ++t) {
    if (t < ntiles) load_kv(t);
    cp_async_commit();
  }
  if constexpr (BIAS) {
    if (tid < BN) sBias[tid] = bias_val(tid);
  }
  if constexpr (ROPE) build_rope_table<D, NT>(p.grid_h, p.grid_w, p.rope_scale, p.rope_theta, sTab, sTabH, tid);
  if constexpr (PIPE)
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  else
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  if constexpr (ROPE) {
    __syncthreads();  // the table
    rope_tile<D, BM, NT>(sQ, q0, nq, sTab, sTabH, p.grid_w, p.inv_grid_w, tid);
    if (p.rope_k) rope_tile<D, BN, NT>(sK, 0, nk, sTab, sTabH, p.grid_w, p.inv_grid_w, tid);
  }
  fence_proxy_async();
  __syncthreads();

  const uint32_t q_addr = smem_u32(sQ + wg * 64 * D);
  const uint32_t k_addr = smem_u32(sK), v_addr = smem_u32(sV);

  float o[DS * 4];
#pragma unroll
  for (int i = 0; i < DS * 4; ++i) o[i] = 0.f;
  float m_run[2] = {kNegInit, kNegInit}, l_run[2] = {0.f, 0.f}, alpha[2];
  const float sc = BIAS ? 1.f : p.scale_log2;
  float s[NS * 4];
  uint32_t pa[BN / 16][4];

  if constexpr (PIPE) {
    // one tile: P V of the previous tile (P in `cur`) under the softmax of tile j (P into nxt)
    auto step = [&](int j, uint32_t(*cur)[4], uint32_t(*nxt)[4]) {
      const int st = j % ST;
      // tile j landed (only tile j+1's group may be pending); finish it, then one barrier:
      // tile j visible everywhere, and stage (j+2) % ST (tile j-2, whose P V both
      // warpgroups waited for last iteration) free for tile j+2
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
      if (ROPE && p.rope_k) rotate_k_tile(j);
      if constexpr (BIAS) {
        if (tid < BN) sBias[st * BN + tid] = bias_val(j * BN + tid);
      }
      fence_proxy_async();
      __syncthreads();
      if (j + 2 < ntiles) load_kv(j + 2);
      cp_async_commit();

      issue_s(s, q_addr, k_addr + st * TILE * 2);
      wait_all<NS * 4>(s);
      issue_pv(o, cur, v_addr + ((j - 1) % ST) * TILE * 2);  // in flight: o, cur
      softmax<BIAS>(s, m_run, l_run, alpha, sBias + st * BN, j * BN, nk, sc, p.scale_log2, lane);
      pack_p(s, nxt);
      wait_all<DS * 4>(o);
      rescale(o, alpha);
    };
    uint32_t pb[BN / 16][4];
    issue_s(s, q_addr, k_addr);
    wait_all<NS * 4>(s);
    softmax<BIAS>(s, m_run, l_run, alpha, sBias, 0, nk, sc, p.scale_log2, lane);  // O = 0: no rescale
    pack_p(s, pa);
    // two tiles per trip, P alternating between two register sets (a copy from one to the
    // other would let the compiler merge them, and the softmax would then write the
    // registers the in-flight P V reads: ptxas serializes every wgmma for that)
    int j = 1;
    for (; j + 1 < ntiles; j += 2) {
      step(j, pa, pb);
      step(j + 1, pb, pa);
    }
    if (j < ntiles) {
      step(j, pa, pb);
      issue_pv(o, pb, v_addr + ((ntiles - 1) % ST) * TILE * 2);
    } else {
      issue_pv(o, pa, v_addr + ((ntiles - 1) % ST) * TILE * 2);
    }
    wait_all<DS * 4>(o);
  } else {
    for (int j = 0; j < ntiles; ++j) {
      const int st = j % ST;
      const int kv0 = j * BN;
      // copies of tile j+2 into the stage tile j-1 used (freed by the last barrier)
      if (j + 2 < ntiles) load_kv(j + 2);
      cp_async_commit();  // one group per iteration (empty near the end): wait_group 1 below

      issue_s(s, q_addr, k_addr + st * TILE * 2);
      // ---- meanwhile: finish tile j+1 (copies landed: only the newest group may be pending)
      if (j + 1 < ntiles) {
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        if (ROPE && p.rope_k) rotate_k_tile(j + 1);
        if constexpr (BIAS) {
          if (tid < BN) sBias[((j + 1) % ST) * BN + tid] = bias_val(kv0 + BN + tid);
        }
        fence_proxy_async();
      }
      wait_all<NS * 4>(s);
      softmax<BIAS>(s, m_run, l_run, alpha, sBias + st * BN, kv0, nk, sc, p.scale_log2, lane);
      rescale(o, alpha);
      pack_p(s, pa);
      issue_pv(o, pa, v_addr + st * TILE * 2);
      wait_all<DS * 4>(o);
      __syncthreads();  // tile j+1 complete everywhere; stage j free for tile j+3
    }
  }

  // ---- normalise, stage through this warpgroup's rows of sQ, 16-byte stores
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float l = quad_sum(l_run[hr]);
    const float inv = 1.f / l;
    const int row = wg * 64 + warp_in_wg * 16 + (lane >> 2) + hr * 8;
#pragma unroll
    for (int d = 0; d < DS; ++d) {
      const uint32_t v = pack_half2(o[4 * d + 2 * hr] * inv, o[4 * d + 2 * hr + 1] * inv);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, d) + 2 * (lane & 3)) = v;
    }
  }
  __syncwarp();
  {
    constexpr int CH = D / 8;
    half* go = p.out + batch_offset(p, b, p.o_bs, p.o_rs) + h * D;
    const int row0 = wg * 64 + warp_in_wg * 16;
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; ++it) {
      const int idx = it * 32 + lane;
      const int r = row0 + idx / CH, c = idx % CH;
      const int gr = q0 + r;
      if (gr < nq) {
        *reinterpret_cast<uint4*>(go + int64_t(row_index(rm, gr)) * p.o_rs + c * 8) =
            *reinterpret_cast<const uint4*>(sQ + swz<D>(r, c));
      }
    }
  }
#else
  __trap();  // built without sm_90a code; the launcher never selects this kernel then
#endif
}

// Merge the key splits of attention_kernel: one warp per (row, head, batch entry), lane c
// holding columns c, c + 32, ... of the head: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s.
template <int D>
__global__ void __launch_bounds__(128) combine_splits(const Params p) {
  sam3_cuda::pdl_wait_then_release();
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= p.nq) return;
  const float* src = p.part + (int64_t(b * p.heads + h) * p.splits * p.nq + row) * (D + 2);
  const int64_t step = int64_t(p.nq) * (D + 2);  // one split further
  float mx = kNegInit;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, src[s * step + D]);
  float l = 0.f, acc[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) acc[i] = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float* ps = src + s * step;
    const float w = fast_exp2(ps[D] - mx);
    l = fmaf(w, ps[D + 1], l);
#pragma unroll
    for (int i = 0; i < D / 32; ++i) acc[i] = fmaf(w, ps[lane + 32 * i], acc[i]);
  }
  const float inv = 1.f / l;
  half* go = p.out + int64_t(b) * p.o_bs + int64_t(row) * p.o_rs + h * D;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) go[lane + 32 * i] = __float2half_rn(acc[i] * inv);
}

// ---------------------------------------------------------------- launch

template <int D, int NW, int MT, int BN, bool ROPE, bool BIAS, int DV = D>
cudaError_t launch(const Params& params, cudaStream_t stream) {
  using C = Cfg<D, DV, NW, MT, BN, ROPE, BIAS>;
  Params p = params;
  // masked-tile skip: with a key bias, up to kMaxSkipTiles key tiles of this BN
  const int tiles = (p.nk + BN - 1) / BN;
  p.skip_tiles = C::SKIP && p.bias != nullptr && tiles <= kMaxSkipTiles ? tiles : 0;
  const int table_rows = ROPE ? (p.grid_h > p.grid_w ? p.grid_h : p.grid_w) : 0;
  p.smem_tail = C::tail_offset(table_rows, p.rope_k == 0);
  const int smem = C::smem_bytes(table_rows, p.skip_tiles, p.rope_k == 0);
  auto kern = attention_kernel<D, DV, NW, MT, BN, ROPE, BIAS>;
  static int configured = 0;  // largest dynamic shared memory size set so far
  if (smem > 48 * 1024 && smem > configured) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return fail("cudaFuncSetAttribute(max dynamic shared memory)", err);
    configured = smem;
  }
  dim3 grid((p.nq + C::BM - 1) / C::BM, p.heads, p.batch * (p.splits > 1 ? p.splits : 1));
  cudaError_t err = sam3_cuda::launch(kern, grid, dim3(C::NT), smem, stream, p);
  if (err == cudaSuccess && p.splits > 1)
    err = sam3_cuda::launch(combine_splits<DV>, dim3((p.nq + 3) / 4, p.heads, p.batch), dim3(128), 0,
                            stream, p);
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? err : fail("kernel launch", err);
}

template <int NWG, bool ROPE, bool BIAS>
cudaError_t launch_wg(const Params& p, cudaStream_t stream) {
  using C = WgCfg<NWG, ROPE, BIAS>;
  const int table_rows = ROPE ? (p.grid_h > p.grid_w ? p.grid_h : p.grid_w) : 0;
  const int smem = C::smem_bytes(table_rows);
  auto kern = attention_wgmma_kernel<NWG, ROPE, BIAS>;
  static int configured = 0;
  if (smem > 48 * 1024 && smem > configured) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return fail("cudaFuncSetAttribute(max dynamic shared memory)", err);
    configured = smem;
  }
  dim3 grid((p.nq + C::BM - 1) / C::BM, p.heads, p.batch);
  cudaError_t err = sam3_cuda::launch(kern, grid, dim3(C::NT), smem, stream, p);
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? err : fail("kernel launch", err);
}

// Whether the wgmma kernels were built for this device (sm_90a code present, CC 9.0).
inline bool wgmma_available() {
  static int state = -1;
  if (state < 0) {
    state = 0;
#ifdef SAM3_ATTENTION_NO_WGMMA  // build option: the mma.sync path everywhere
    return false;
#endif
    int dev = 0, major = 0, minor = 0;
    cudaFuncAttributes attr;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
        major == 9 && minor == 0 &&
        cudaFuncGetAttributes(&attr, attention_wgmma_kernel<2, false, false>) == cudaSuccess &&
        attr.binaryVersion == 90 && attr.numRegs >= 64)  // sm_90 without "a": a trap stub
      state = 1;
    cudaGetLastError();  // clear a failed query
  }
  return state == 1;
}

// Tile configurations: (warps, 16-row m-tiles per warp), keys per tile 64.
//   head dim 32/64: 1: 4 warps x 32 rows (128)   2: 3 x 32 (96)   3: 2 x 32 (64)   5: 2 x 16 (32)
//   head dim 32/64/128: 4: 4 x 16 (64)
//   head dim 128/256, 32 keys per tile: 10: 4 x 16 (64)   11: 8 x 16 (128);  128 only: 12: 2 x 16 (32)
//   sm_90a, head dim 64 only (wgmma): 6: 2 warpgroups x 64 rows (128)   7: 1 x 64 (64)
//   8, 9: as 6, 7 with the k tiles rotated in half2 arithmetic
//   (6 and 8 run the pipelined loop, 7 and 9 the serial one: same output)
// Head dims 128/256 keep one 16-row m-tile per warp (two would need D accumulator registers
// per thread); the configurations left out spill registers (ptxas, sm_90a): 2 x 16 rows
// at 64 keys (128, 256), 4 x 16 at 64 keys and 2 x 16 at 32 keys (256).
template <int D, bool ROPE, bool BIAS>
cudaError_t dispatch_cfg(const Params& p, int config, cudaStream_t stream) {
  switch (config) {
    case 1: if constexpr (D <= 64) return launch<D, 4, 2, 64, ROPE, BIAS>(p, stream); break;
    case 2: if constexpr (D <= 64) return launch<D, 3, 2, 64, ROPE, BIAS>(p, stream); break;
    case 3: if constexpr (D <= 64) return launch<D, 2, 2, 64, ROPE, BIAS>(p, stream); break;
    case 4: if constexpr (D <= 128) return launch<D, 4, 1, 64, ROPE, BIAS>(p, stream); break;
    case 5: if constexpr (D <= 64) return launch<D, 2, 1, 64, ROPE, BIAS>(p, stream); break;
    case 10: if constexpr (D >= 128) return launch<D, 4, 1, 32, ROPE, BIAS>(p, stream); break;
    case 11: if constexpr (D >= 128) return launch<D, 8, 1, 32, ROPE, BIAS>(p, stream); break;
    case 12: if constexpr (D == 128) return launch<D, 2, 1, 32, ROPE, BIAS>(p, stream); break;
    case 6:
    case 7:
    case 8:
    case 9:
      if constexpr (D == 64) {
        if (!wgmma_available()) return fail("wgmma configuration without sm_90a code");
        return (config % 2 == 0) ? launch_wg<2, ROPE, BIAS>(p, stream) : launch_wg<1, ROPE, BIAS>(p, stream);
      }
      return fail("wgmma configuration with head dim other than 64");
    default: return fail("unknown tile configuration");
  }
  return fail("tile configuration not built for this head dim (dispatch_cfg)");
}

// Head dim 256 with 64-wide values: configuration 11 only (8 warps x 16 rows, 32 keys).
template <bool ROPE, bool BIAS>
cudaError_t dispatch_cfg_v64(const Params& p, int config, cudaStream_t stream) {
  if (config != 11) return fail("64-wide values: tile configuration other than 11");
  return launch<256, 8, 1, 32, ROPE, BIAS, 64>(p, stream);
}

// Rows per block and keys per tile of the mma.sync configurations 1..5, 10..12 (dispatch_cfg).
inline int config_rows(int config) {
  static const int rows[] = {0, 128, 96, 64, 64, 32, 0, 0, 0, 0, 64, 128, 32};
  return config >= 1 && config <= 12 ? rows[config] : 0;
}
inline int config_keys(int config) { return config >= 10 && config <= 12 ? 32 : 64; }

// Multiprocessors of the current device.
inline int current_sm_count() {
  int dev = 0;
  return sam3_cuda::sm_count(cudaGetDevice(&dev) == cudaSuccess ? dev : 0);
}

// Automatic choice: padding of the last query tile against filling the multiprocessors
// (blocks resident per SM: 2 for the 128-row tiles, 4 for the 64/32-row ones).
inline int auto_config(const Params& p, int head_dim, bool wgmma_ok = true) {
  const int sms = current_sm_count();
  const long long bh = (long long)p.batch * p.heads;
  auto cost = [&](int bm, int resident, double penalty) {
    const long long tiles = (p.nq + bm - 1) / bm;
    const double fill = double(tiles * bh) / double(resident * sms);
    return double(tiles * bm) / p.nq / (fill < 1.0 ? fill : 1.0) * penalty;
  };
  if (head_dim == 64 && wgmma_ok && wgmma_available()) return cost(128, 2, 1.0) <= cost(64, 4, 1.25) ? 6 : 7;
  // head dim 128/256: one m-tile per warp, 32 keys per tile (~100 KiB of shared memory at
  // 256: two blocks per SM); at 128, 2 warps x 16 rows for short query sets. Few blocks get
  // a key split on top (launch_all). At 256, 8 warps x 16 rows: on the H100 the tracker's
  // 72x72 RoPE self-attention took 0.19 ms against 0.29 with 4 warps, its cross-attention
  // 1.25 against 1.29 (all 10 memory frames) and 0.64 against 0.77 (2 of 10).
  if (head_dim == 256) return 11;
  if (head_dim == 128) return cost(64, 2, 1.0) <= cost(32, 4, 1.2) ? 10 : 12;
  // mma.sync: 4 warps x 32 rows when the grid is large; smaller tiles for short query sets
  const double c1 = cost(128, 2, 1.0), c4 = cost(64, 3, 1.15), c5 = cost(32, 4, 1.2);
  if (c1 <= c4 && c1 <= c5) return 1;
  return c4 <= c5 ? 4 : 5;
}

}  // namespace
}  // namespace sam3_attn

namespace sam3_attn {
namespace {
// The launcher behind the C entry points: their arguments plus the full bias (fp16
// [Bb, heads, nq, nk] rows contiguous, batch/head strides in elements; null: none), which
// the mma.sync kernels read (head dim 32, or 64 without wgmma) and which needs nk even.
int launch_all(const void* q, const void* k, const void* v, const void* bias, const void* fbias,
               void* out, long long q_batch_stride, long long q_row_stride, int q_offset,
               long long k_batch_stride, long long k_row_stride, int k_offset,
               long long v_batch_stride, long long v_row_stride, int v_offset,
               long long out_batch_stride, long long out_row_stride, long long bias_batch_stride,
               long long fb_batch_stride, long long fb_head_stride, int batch, int heads,
               int head_dim, int head_dim_v, int nq, int nk, int grid_h, int grid_w, float rope_scale,
               float rope_theta, int window, int img_h, int img_w, int config, int keys_rotated,
               cudaStream_t stream) {
  last_failure() = "";
  if (batch <= 0 || heads <= 0 || nq <= 0) return 0;
  if (nk <= 0 || (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256))
    return fail("empty keys or head dim not 32/64/128/256");
  const bool v64 = head_dim_v != head_dim;  // head dim 256, values 64 wide (dispatch_cfg_v64)
  if (v64 && (head_dim != 256 || head_dim_v != 64 || window > 0 || fbias != nullptr))
    return fail("value head dim differs from the key's: only 256 / 64, no window, no full bias");
  int nwin = 0, nw = 0;
  if (window > 0) {
    if (img_h <= 0 || img_w <= 0 || img_h % window || img_w % window || bias != nullptr ||
        fbias != nullptr || (long long)window * window != nq || nq != nk)
      return fail("window mode: grid not a multiple of the window, bias, or nq/nk != window^2");
    if (window > 255) return fail("window mode: window over 255 tokens a side");
    nw = img_w / window;
    nwin = (img_h / window) * nw;
    if ((long long)batch * nwin > 65535) return fail("window mode: more than 65535 windows");
    batch *= nwin;  // one batch entry per window from here on
  }
  auto m8 = [](long long x) { return x % 8 == 0; };
  if (!m8(q_batch_stride) || !m8(q_row_stride) || !m8(q_offset) || !m8(k_batch_stride) ||
      !m8(k_row_stride) || !m8(k_offset) || !m8(v_batch_stride) || !m8(v_row_stride) ||
      !m8(v_offset) || !m8(out_batch_stride) || !m8(out_row_stride))
    return fail("strides/offsets not multiples of 8 elements");
  auto a16 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  if (!a16(q) || !a16(k) || !a16(v) || !a16(out)) return fail("pointers not 16-byte aligned");
  const bool rope = grid_w > 0;
  if (rope && (grid_h <= 0 || (long long)grid_h * grid_w < nq || (long long)grid_h * grid_w < nk))
    return fail("RoPE grid smaller than the sequence");
  if (batch > 65535 || heads > 65535) return fail("batch or heads over 65535");
  if (fbias != nullptr && ((reinterpret_cast<uintptr_t>(fbias) & 3) || nk % 2 || fb_head_stride % 2 ||
                           fb_batch_stride % 2))
    return fail("full bias: nk and strides must be even, the pointer 4-byte aligned");

  Params p;
  p.q = static_cast<const half*>(q);
  p.k = static_cast<const half*>(k);
  p.v = static_cast<const half*>(v);
  p.bias = static_cast<const float*>(bias);
  p.fbias = static_cast<const half*>(fbias);
  p.fb_bs = fb_batch_stride;
  p.fb_hs = fb_head_stride;
  p.out = static_cast<half*>(out);
  p.q_bs = q_batch_stride; p.q_rs = q_row_stride; p.q_off = q_offset;
  p.k_bs = k_batch_stride; p.k_rs = k_row_stride; p.k_off = k_offset;
  p.v_bs = v_batch_stride; p.v_rs = v_row_stride; p.v_off = v_offset;
  p.o_bs = out_batch_stride; p.o_rs = out_row_stride;
  p.bias_bs = bias_batch_stride;
  p.batch = batch; p.heads = heads; p.nq = nq; p.nk = nk;
  p.grid_h = rope ? grid_h : 0;
  p.grid_w = rope ? grid_w : 0;
  p.rope_scale = rope_scale;
  p.rope_theta = rope_theta;
  p.inv_grid_w = rope ? 1.0f / float(grid_w) : 0.f;
  p.scale_log2 = kLog2e / sqrtf(float(head_dim));
  p.win = window > 0 ? window : 0;
  p.win_nw = nw;
  p.win_nwin = nwin;
  p.win_w = window > 0 ? img_w : 0;
  // window 1: magic 2^32 - 1 is exact for the only row (0)
  p.win_magic = window > 0 ? uint32_t(((1ull << 32) + window - 1) / window - (window == 1 ? 1 : 0)) : 0u;
  p.win_skip = window > 0 ? img_w - window : 0;
  if (config <= 0) config = auto_config(p, head_dim, fbias == nullptr);
  if (v64 && config != 11) return fail("64-wide values: tile configuration other than 11");
  if (fbias != nullptr && config >= 6 && config <= 9) return fail("full bias with a wgmma configuration");
  // a full-bias call has few query rows and many keys (201 x 5184 in the DETR decoder): split
  // the keys over blocks until every multiprocessor has about four, at least 4 key tiles each.
  // Head dim 128/256 (about two blocks per multiprocessor): split the keys of fewer blocks
  // than multiprocessors over at most two per multiprocessor, at least 8 key tiles each (the
  // video tracker's memory attention of one object: 81 query tiles against ~52k keys).
  p.splits = 0;
  p.split_tiles = 0;
  p.part = nullptr;
  p.skip_tiles = 0;  // set per configuration (launch)
  if ((fbias != nullptr || head_dim >= 128) && window <= 0) {
    const int bm = config_rows(config), sms = current_sm_count();
    const int tiles = (nk + config_keys(config) - 1) / config_keys(config);
    const long long blocks = bm > 0 ? (long long)((nq + bm - 1) / bm) * heads * batch : 1;
    long long want = fbias != nullptr ? (4LL * sms + blocks - 1) / blocks : 2LL * sms / blocks;
    const long long most = fbias != nullptr ? tiles / 4 : tiles / 8;
    if (want > most) want = most;
    if (bm > 0 && blocks < (fbias != nullptr ? 2LL : 1LL) * sms && want > 1) {
      p.split_tiles = int((tiles + want - 1) / want);
      p.splits = (tiles + p.split_tiles - 1) / p.split_tiles;
      if ((long long)batch * p.splits > 65535) return fail("key split: batch x splits over 65535");
      int dev = 0;
      const char* why = "";
      cudaGetDevice(&dev);
      p.part = static_cast<float*>(sam3_cuda::scratch(
          sam3_cuda::kAttentionSplits,
          sizeof(float) * size_t(batch) * heads * p.splits * nq * (head_dim_v + 2), dev, stream, 0, &why));
      if (p.part == nullptr) return fail("key split: no scratch memory (or growing it during capture)");
    }
  }
  p.rope_half = config == 8 || config == 9 ? 1 : 0;
  p.rope_k = rope && !keys_rotated ? 1 : 0;

  const bool has_bias = bias != nullptr || fbias != nullptr;
  cudaError_t err;
  if (v64) {
    if (rope) err = has_bias ? dispatch_cfg_v64<true, true>(p, config, stream)
                             : dispatch_cfg_v64<true, false>(p, config, stream);
    else err = has_bias ? dispatch_cfg_v64<false, true>(p, config, stream)
                        : dispatch_cfg_v64<false, false>(p, config, stream);
  } else if (head_dim == 256) {
    if (rope) err = has_bias ? dispatch_cfg<256, true, true>(p, config, stream)
                             : dispatch_cfg<256, true, false>(p, config, stream);
    else err = has_bias ? dispatch_cfg<256, false, true>(p, config, stream)
                        : dispatch_cfg<256, false, false>(p, config, stream);
  } else if (head_dim == 128) {
    if (rope) err = has_bias ? dispatch_cfg<128, true, true>(p, config, stream)
                             : dispatch_cfg<128, true, false>(p, config, stream);
    else err = has_bias ? dispatch_cfg<128, false, true>(p, config, stream)
                        : dispatch_cfg<128, false, false>(p, config, stream);
  } else if (head_dim == 64) {
    if (rope) err = has_bias ? dispatch_cfg<64, true, true>(p, config, stream)
                             : dispatch_cfg<64, true, false>(p, config, stream);
    else err = has_bias ? dispatch_cfg<64, false, true>(p, config, stream)
                        : dispatch_cfg<64, false, false>(p, config, stream);
  } else {
    if (rope) err = has_bias ? dispatch_cfg<32, true, true>(p, config, stream)
                             : dispatch_cfg<32, true, false>(p, config, stream);
    else err = has_bias ? dispatch_cfg<32, false, true>(p, config, stream)
                        : dispatch_cfg<32, false, false>(p, config, stream);
  }
  return static_cast<int>(err);
}

int launch_rope_keys(const void* src, void* dst, long long src_batch_stride, long long src_row_stride,
                     int src_offset, int batch, int n, int heads, int head_dim, int grid_h, int grid_w,
                     float rope_scale, float rope_theta, int window, int img_h, int img_w,
                     cudaStream_t stream, int dst_cols = 0) {
  last_failure() = "";
  if (batch <= 0 || n <= 0 || heads <= 0) return 0;
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256)
    return fail("head dim not 32/64/128/256");
  if (grid_h <= 0 || grid_w <= 0) return fail("RoPE grid not positive");
  if (window > 0) {
    if (img_h <= 0 || img_w <= 0 || img_h % window || img_w % window || (long long)img_h * img_w != n)
      return fail("window mode: tokens not a grid of whole windows");
    if (grid_h < window || grid_w < window) return fail("RoPE grid smaller than the window");
  } else if ((long long)grid_h * grid_w < n) {
    return fail("RoPE grid smaller than the sequence");
  }
  if (src_batch_stride % 8 || src_row_stride % 8 || src_offset % 8 ||
      (reinterpret_cast<uintptr_t>(src) & 15) || (reinterpret_cast<uintptr_t>(dst) & 15))
    return fail("strides/offset not multiples of 8 elements or pointers not 16-byte aligned");
  RopeKeysParams rp;
  rp.src = static_cast<const half*>(src) + src_offset;
  rp.dst = static_cast<half*>(dst);
  rp.src_bs = src_batch_stride;
  rp.src_rs = src_row_stride;
  rp.batch = batch;
  rp.n = n;
  rp.hidden = heads * head_dim;
  rp.cols = dst_cols > 0 ? dst_cols : rp.hidden;
  if (rp.cols < rp.hidden || rp.cols % 8) return fail("output columns fewer than the rotated ones or not 8-aligned");
  rp.grid_h = grid_h;
  rp.grid_w = grid_w;
  rp.rope_scale = rope_scale;
  rp.rope_theta = rope_theta;
  rp.window = window > 0 ? window : 0;
  rp.img_w = window > 0 ? img_w : 0;
  const int smem = (grid_h > grid_w ? grid_h : grid_w) * (head_dim / 4) * 8;
  if (smem > 48 * 1024) return fail("RoPE grid too large for the key rotation table");
  const long long total = (long long)batch * n * (rp.cols / 8);
  if (total > 0x7fffffffLL - 1024LL * 1024) return fail("over 2^31 16-byte chunks of keys");
  long long blocks = (total + 1023) / 1024;  // 256 threads x 4 chunks
  const long long cap = 4LL * current_sm_count();
  if (blocks > cap) blocks = cap;
  const dim3 grid{unsigned(blocks)}, threads{256};
  cudaError_t err =
      head_dim == 256 ? sam3_cuda::launch(rope_keys_kernel<256>, grid, threads, smem, stream, rp)
      : head_dim == 128 ? sam3_cuda::launch(rope_keys_kernel<128>, grid, threads, smem, stream, rp)
      : head_dim == 64 ? sam3_cuda::launch(rope_keys_kernel<64>, grid, threads, smem, stream, rp)
                       : sam3_cuda::launch(rope_keys_kernel<32>, grid, threads, smem, stream, rp);
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(fail("key rotation launch", err));
}
}  // namespace
}  // namespace sam3_attn

extern "C" {

// Returns 0 on success, a cudaError_t code otherwise (cudaErrorInvalidValue for arguments the
// kernel does not support: head_dim other than 32/64/128/256, offsets/strides not multiples of 8
// elements, pointers not 16-byte aligned, empty key sequence).
// Strides are in elements; bias (float32 [Bb, Nk], rows contiguous) may be null (no bias),
// bias_batch_stride 0 broadcasts it.
// grid_w <= 0: no RoPE. config 0: automatic tile choice (1..9: see dispatch_cfg).
//
// Window mode (sam3_attention_fp16_window, window > 0): q/k/v/out hold `batch` images of
// img_h x img_w token rows each (batch strides per image), cut into window x window windows
// (img_h, img_w multiples of window, nq = nk = window^2, no bias). Each window attends within
// itself exactly as if it had been partitioned into a batch entry of its own (RoPE positions
// are the in-window ones, grid_h x grid_w as given), and its output rows land where its
// input rows are: no partition/unpartition copies around the kernel.
int sam3_attention_fp16_window(const void* q, const void* k, const void* v, const void* bias,
                               void* out, long long q_batch_stride, long long q_row_stride,
                               int q_offset, long long k_batch_stride, long long k_row_stride,
                               int k_offset, long long v_batch_stride, long long v_row_stride,
                               int v_offset, long long out_batch_stride, long long out_row_stride,
                               long long bias_batch_stride, int batch, int heads, int head_dim,
                               int nq, int nk, int grid_h, int grid_w, float rope_scale,
                               float rope_theta, int window, int img_h, int img_w, int config,
                               int keys_rotated, cudaStream_t stream) {
  return sam3_attn::launch_all(q, k, v, bias, nullptr, out, q_batch_stride, q_row_stride, q_offset,
                               k_batch_stride, k_row_stride, k_offset, v_batch_stride, v_row_stride,
                               v_offset, out_batch_stride, out_row_stride, bias_batch_stride, 0, 0,
                               batch, heads, head_dim, head_dim, nq, nk, grid_h, grid_w, rope_scale,
                               rope_theta, window, img_h, img_w, config, keys_rotated, stream);
}

int sam3_attention_fp16(const void* q, const void* k, const void* v, const void* bias, void* out,
                        long long q_batch_stride, long long q_row_stride, int q_offset,
                        long long k_batch_stride, long long k_row_stride, int k_offset,
                        long long v_batch_stride, long long v_row_stride, int v_offset,
                        long long out_batch_stride, long long out_row_stride,
                        long long bias_batch_stride, int batch, int heads, int head_dim, int nq,
                        int nk, int grid_h, int grid_w, float rope_scale, float rope_theta,
                        int config, cudaStream_t stream) {
  return sam3_attention_fp16_window(q, k, v, bias, out, q_batch_stride, q_row_stride, q_offset,
                                    k_batch_stride, k_row_stride, k_offset, v_batch_stride,
                                    v_row_stride, v_offset, out_batch_stride, out_row_stride,
                                    bias_batch_stride, batch, heads, head_dim, nq, nk, grid_h,
                                    grid_w, rope_scale, rope_theta, 0, 0, 0, config, 0, stream);
}

// Keys rotated once for the "keys arrive rotated" mode (keys_rotated = 1 above): columns
// [src_offset, src_offset + heads * head_dim) of `batch` x `n` rows of src (strides in
// elements) -> dst [batch, n, heads * head_dim], each head rotated as the attention kernel
// rotates k tiles. window 0: positions on the grid_h x grid_w grid (row-major);
// window > 0: in-window positions of an img_h x img_w token grid (window mode).
int sam3_rope_keys_fp16(const void* src, void* dst, long long src_batch_stride,
                        long long src_row_stride, int src_offset, int batch, int n, int heads,
                        int head_dim, int grid_h, int grid_w, float rope_scale, float rope_theta,
                        int window, int img_h, int img_w, cudaStream_t stream) {
  return sam3_attn::launch_rope_keys(src, dst, src_batch_stride, src_row_stride, src_offset, batch,
                                     n, heads, head_dim, grid_h, grid_w, rope_scale, rope_theta,
                                     window, img_h, img_w, stream);
}

}  // extern "C"

// ---------------------------------------------------------------- tvm-ffi entry points
//
// Built when the tvm-ffi headers are on the include path (sam3_nn.kernels.cuda.source);
// the standalone build (bench/attention_cuda_kernel.py) has only the C launcher above.
// Destination-passing style, as Relax's call_dps_packed calls them (out last):
//   sam3_attention_cuda(q, k, v, heads, q_off, k_off, v_off, grid_h, grid_w, rope_scale,
//                       rope_theta, keys_rotated, out)
//   sam3_attention_cuda_bias(q, k, v, bias, heads, ..., keys_rotated, out)
//   sam3_attention_cuda_window(q, k, v, heads, q_off, k_off, v_off, window, img_h, img_w,
//                              grid_h, grid_w, rope_scale, rope_theta, keys_rotated, out)
//   sam3_attention_cuda_full_bias(q, k, v, fbias, heads, q_off, k_off, v_off, out)
//   sam3_rope_keys_cuda(x, k_off, heads, window, img_h, img_w, grid_h, grid_w, rope_scale,
//                       rope_theta, out)
// q [B, Nq, Wq], k/v [B, Nk, Wk/Wv] fp16 (compact), bias [1 or B, Nk] float32,
// out [B, Nq, heads * D] fp16; grid_w = 0: no RoPE; keys_rotated = 1: k comes from
// sam3_rope_keys_cuda and only q is rotated in the kernel. Runs on the stream tvm-ffi has for the
// device (TVMFFIEnvGetStream), like TVM's own kernels.
#if __has_include(<tvm/ffi/function.h>)
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

namespace sam3_attn {
namespace ffi {

using tvm::ffi::TensorView;

inline void* data_of(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

inline void check(const TensorView& t, const char* what, int bits, int ndim) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != bits || t.dtype().lanes != 1)
    TVM_FFI_THROW(TypeError) << "sam3 attention: " << what << " must be float" << bits;
  if (t.device().device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << "sam3 attention: " << what << " must be on CUDA";
  if (t.ndim() != ndim)
    TVM_FFI_THROW(ValueError) << "sam3 attention: " << what << " must be " << ndim << "-D";
  if (!t.IsContiguous())
    TVM_FFI_THROW(ValueError) << "sam3 attention: " << what << " must be contiguous";
}

// qk_hidden: the q/k heads' width (0: the output's; narrower values: see sam3_attention_cuda_v64)
void run(TensorView q, TensorView k, TensorView v, const TensorView* bias, const TensorView* fbias,
         int64_t heads, int64_t q_off, int64_t k_off, int64_t v_off, int64_t grid_h,
         int64_t grid_w, double rope_scale, double rope_theta, int64_t keys_rotated,
         TensorView out, int64_t qk_hidden = 0) {
  check(q, "q", 16, 3);
  check(k, "k", 16, 3);
  check(v, "v", 16, 3);
  check(out, "out", 16, 3);
  const int64_t b = q.shape()[0], nq = q.shape()[1], nk = k.shape()[1];
  const int64_t hidden = out.shape()[2];
  if (heads <= 0 || hidden % heads)
    TVM_FFI_THROW(ValueError) << "sam3 attention: output width " << hidden << " is not a multiple of "
                              << heads << " heads";
  const int64_t qk = qk_hidden > 0 ? qk_hidden : hidden;
  if (qk % heads)
    TVM_FFI_THROW(ValueError) << "sam3 attention: q/k width " << qk << " is not a multiple of "
                              << heads << " heads";
  const int64_t d = qk / heads, dv = hidden / heads;
  if (k.shape()[0] != b || v.shape()[0] != b || out.shape()[0] != b || v.shape()[1] != nk ||
      out.shape()[1] != nq)
    TVM_FFI_THROW(ValueError) << "sam3 attention: batch/sequence sizes of q, k, v, out disagree";
  if (q_off < 0 || k_off < 0 || v_off < 0 || q_off + qk > q.shape()[2] ||
      k_off + qk > k.shape()[2] || v_off + hidden > v.shape()[2])
    TVM_FFI_THROW(ValueError) << "sam3 attention: head columns out of range";
  const float* bp = nullptr;
  int64_t bias_bs = 0;
  if (bias != nullptr) {
    check(*bias, "bias", 32, 2);
    const int64_t bb = bias->shape()[0];
    if (bias->shape()[1] != nk || (bb != 1 && bb != b))
      TVM_FFI_THROW(ValueError) << "sam3 attention: bias must be [1 or batch, Nk]";
    bp = static_cast<const float*>(data_of(*bias));
    bias_bs = bb == 1 ? 0 : nk;
  }
  const void* fp = nullptr;
  int64_t fb_bs = 0;
  if (fbias != nullptr) {
    check(*fbias, "full bias", 16, 4);
    const int64_t bb = fbias->shape()[0];
    if ((bb != 1 && bb != b) || fbias->shape()[1] != heads || fbias->shape()[2] != nq ||
        fbias->shape()[3] != nk)
      TVM_FFI_THROW(ValueError) << "sam3 attention: full bias must be [1 or batch, heads, Nq, Nk]";
    fp = data_of(*fbias);
    fb_bs = bb == 1 ? 0 : heads * nq * nk;
  }
  const int dev = q.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const int err = launch_all(
      data_of(q), data_of(k), data_of(v), bp, fp, data_of(out), nq * q.shape()[2], q.shape()[2],
      int(q_off), nk * k.shape()[2], k.shape()[2], int(k_off), nk * v.shape()[2], v.shape()[2],
      int(v_off), nq * hidden, hidden, bias_bs, fb_bs, nq * nk, int(b), int(heads), int(d),
      int(dv), int(nq), int(nk), int(grid_h), int(grid_w), float(rope_scale), float(rope_theta), 0, 0, 0,
      0, int(keys_rotated != 0), stream);
  if (err != 0)
    TVM_FFI_THROW(RuntimeError) << "sam3 attention (B=" << b << " Nq=" << nq << " Nk=" << nk
                                << " heads=" << heads << " D=" << d << " DV=" << dv << "): "
                                << cudaGetErrorString(static_cast<cudaError_t>(err)) << " ("
                                << last_failure() << ")";
}

// Window mode: q/k/v [B, img_h * img_w, W], out [B, img_h * img_w, heads * D]; windows of
// window x window tokens attend within themselves (see sam3_attention_fp16_window).
void run_window(TensorView q, TensorView k, TensorView v, int64_t heads, int64_t q_off,
                int64_t k_off, int64_t v_off, int64_t window, int64_t img_h, int64_t img_w,
                int64_t grid_h, int64_t grid_w, double rope_scale, double rope_theta,
                int64_t keys_rotated, TensorView out) {
  check(q, "q", 16, 3);
  check(k, "k", 16, 3);
  check(v, "v", 16, 3);
  check(out, "out", 16, 3);
  const int64_t b = q.shape()[0], n = q.shape()[1];
  const int64_t hidden = out.shape()[2];
  if (heads <= 0 || hidden % heads)
    TVM_FFI_THROW(ValueError) << "sam3 attention: output width " << hidden << " is not a multiple of "
                              << heads << " heads";
  const int64_t d = hidden / heads;
  if (window <= 0 || img_h <= 0 || img_w <= 0 || img_h % window || img_w % window ||
      img_h * img_w != n)
    TVM_FFI_THROW(ValueError) << "sam3 attention: " << n << " tokens are not a " << img_h << "x"
                              << img_w << " grid of " << window << "x" << window << " windows";
  if (k.shape()[0] != b || v.shape()[0] != b || out.shape()[0] != b || k.shape()[1] != n ||
      v.shape()[1] != n || out.shape()[1] != n)
    TVM_FFI_THROW(ValueError) << "sam3 attention: batch/sequence sizes of q, k, v, out disagree";
  if (q_off < 0 || k_off < 0 || v_off < 0 || q_off + hidden > q.shape()[2] ||
      k_off + hidden > k.shape()[2] || v_off + hidden > v.shape()[2])
    TVM_FFI_THROW(ValueError) << "sam3 attention: head columns out of range";
  const int dev = q.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const int64_t nwin = window * window;
  const int err = sam3_attention_fp16_window(
      data_of(q), data_of(k), data_of(v), nullptr, data_of(out), n * q.shape()[2], q.shape()[2],
      int(q_off), n * k.shape()[2], k.shape()[2], int(k_off), n * v.shape()[2], v.shape()[2],
      int(v_off), n * hidden, hidden, 0, int(b), int(heads), int(d), int(nwin), int(nwin),
      int(grid_h), int(grid_w), float(rope_scale), float(rope_theta), int(window), int(img_h),
      int(img_w), 0, int(keys_rotated != 0), stream);
  if (err != 0)
    TVM_FFI_THROW(RuntimeError) << "sam3 attention, windows of " << window << " (B=" << b
                                << " grid " << img_h << "x" << img_w << " heads=" << heads
                                << " D=" << d << "): "
                                << cudaGetErrorString(static_cast<cudaError_t>(err)) << " ("
                                << last_failure() << ")";
}

void attention(TensorView q, TensorView k, TensorView v, int64_t heads, int64_t q_off,
               int64_t k_off, int64_t v_off, int64_t grid_h, int64_t grid_w, double rope_scale,
               double rope_theta, int64_t keys_rotated, TensorView out) {
  run(q, k, v, nullptr, nullptr, heads, q_off, k_off, v_off, grid_h, grid_w, rope_scale,
      rope_theta, keys_rotated, out);
}

void attention_bias(TensorView q, TensorView k, TensorView v, TensorView bias, int64_t heads,
                    int64_t q_off, int64_t k_off, int64_t v_off, int64_t grid_h, int64_t grid_w,
                    double rope_scale, double rope_theta, int64_t keys_rotated, TensorView out) {
  run(q, k, v, &bias, nullptr, heads, q_off, k_off, v_off, grid_h, grid_w, rope_scale,
      rope_theta, keys_rotated, out);
}

// q [B, Nq, heads * 256], k [B, Nk, heads * 256], v [B, Nk, heads * 64], bias [1 or B, Nk]
// -> out [B, Nq, heads * 64]: attention whose value projection comes after it (the memory
// attention's cross-attention, values the 64-wide memory)
void attention_v64(TensorView q, TensorView k, TensorView v, TensorView bias, int64_t heads,
                   int64_t grid_h, int64_t grid_w, double rope_scale, double rope_theta,
                   int64_t keys_rotated, TensorView out) {
  check(q, "q", 16, 3);
  run(q, k, v, &bias, nullptr, heads, 0, 0, 0, grid_h, grid_w, rope_scale, rope_theta,
      keys_rotated, out, q.shape()[2]);
}

// x [B, N, W] -> out [B, N, heads * D]: columns [k_off, k_off + heads * D) of x rotated as the
// attention kernel rotates keys (sam3_rope_keys_fp16); window 0: positions on the
// grid_h x grid_w grid, window > 0: in-window positions of the img_h x img_w token grid.
void rope_keys(TensorView x, int64_t k_off, int64_t heads, int64_t window, int64_t img_h,
               int64_t img_w, int64_t grid_h, int64_t grid_w, double rope_scale,
               double rope_theta, TensorView out) {
  check(x, "keys", 16, 3);
  check(out, "rotated keys", 16, 3);
  const int64_t b = x.shape()[0], n = x.shape()[1], hidden = out.shape()[2];
  if (heads <= 0 || hidden % heads)
    TVM_FFI_THROW(ValueError) << "sam3 key rotation: output width " << hidden
                              << " is not a multiple of " << heads << " heads";
  if (out.shape()[0] != b || out.shape()[1] != n)
    TVM_FFI_THROW(ValueError) << "sam3 key rotation: output rows differ from the input's";
  if (k_off < 0 || k_off + hidden > x.shape()[2])
    TVM_FFI_THROW(ValueError) << "sam3 key rotation: key columns out of range";
  const int dev = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const int err = sam3_rope_keys_fp16(data_of(x), data_of(out), n * x.shape()[2], x.shape()[2],
                                      int(k_off), int(b), int(n), int(heads), int(hidden / heads),
                                      int(grid_h), int(grid_w), float(rope_scale), float(rope_theta),
                                      int(window), int(img_h), int(img_w), stream);
  if (err != 0)
    TVM_FFI_THROW(RuntimeError) << "sam3 key rotation (B=" << b << " N=" << n << " heads=" << heads
                                << "): " << cudaGetErrorString(static_cast<cudaError_t>(err)) << " ("
                                << last_failure() << ")";
}

// qkv [B, N, 3 * heads * D] -> out of the same shape: the q and k columns rotated as
// rope_keys rotates keys, the v columns copied (the standalone form of the qkv GEMM's RoPE
// epilogue, sam3_cutlass_gemm_nk_bias_rope_qk, which the GEMM rewrite fuses it into).
void rope_qk(TensorView x, int64_t heads, int64_t window, int64_t img_h, int64_t img_w,
             int64_t grid_h, int64_t grid_w, double rope_scale, double rope_theta, TensorView out) {
  check(x, "qkv", 16, 3);
  check(out, "rotated qkv", 16, 3);
  const int64_t b = x.shape()[0], n = x.shape()[1], width = x.shape()[2];
  if (heads <= 0 || width % (3 * heads))
    TVM_FFI_THROW(ValueError) << "sam3 q/k rotation: width " << width << " is not 3 x " << heads
                              << " heads x head dim";
  if (out.shape()[0] != b || out.shape()[1] != n || out.shape()[2] != width)
    TVM_FFI_THROW(ValueError) << "sam3 q/k rotation: output shape differs from the input's";
  const int dev = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const int err = launch_rope_keys(data_of(x), data_of(out), n * width, width, 0, int(b), int(n),
                                   int(2 * heads), int(width / (3 * heads)), int(grid_h),
                                   int(grid_w), float(rope_scale), float(rope_theta), int(window),
                                   int(img_h), int(img_w), stream, int(width));
  if (err != 0)
    TVM_FFI_THROW(RuntimeError) << "sam3 q/k rotation (B=" << b << " N=" << n << " heads=" << heads
                                << "): " << cudaGetErrorString(static_cast<cudaError_t>(err)) << " ("
                                << last_failure() << ")";
}

// fbias: fp16 [1 or B, heads, Nq, Nk] added to the scores (no RoPE: the DETR decoder's box
// relative position bias)
void attention_full_bias(TensorView q, TensorView k, TensorView v, TensorView fbias,
                         int64_t heads, int64_t q_off, int64_t k_off, int64_t v_off,
                         TensorView out) {
  run(q, k, v, nullptr, &fbias, heads, q_off, k_off, v_off, 0, 0, 1.0, 10000.0, 0, out);
}

}  // namespace ffi
}  // namespace sam3_attn

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_attention_cuda, sam3_attn::ffi::attention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_attention_cuda_bias, sam3_attn::ffi::attention_bias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_attention_cuda_v64, sam3_attn::ffi::attention_v64);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_attention_cuda_window, sam3_attn::ffi::run_window);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_attention_cuda_full_bias, sam3_attn::ffi::attention_full_bias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_rope_keys_cuda, sam3_attn::ffi::rope_keys);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_rope_qk_cuda, sam3_attn::ffi::rope_qk);
#endif  // tvm-ffi
