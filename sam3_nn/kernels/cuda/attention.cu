// Fused multi-head attention for CUDA (sm_80+, tuned on sm_90): tensor cores, flash-attention-2
// style, with SAM 3's 2D axial RoPE applied to q and k inline.
//
// Why CUDA source and not TIR: the portable kernel (sam3_nn/attention_kernels.py) is TIR and
// runs on the CUDA cores; reaching tensor-core flash attention from TIR would need
// mma/ldmatrix tensorization of two chained GEMMs with an online softmax between them,
// which TVM 0.27's schedules do not provide in any practical way (dlight has no attention
// rule, and its tensor-core GEMM path is what the rest of the project works around). So
// CUDA gets this hand-written kernel; Metal and the other GPU targets keep the TIR kernel,
// and llvm keeps the CPU TIR kernel. Same semantics everywhere:
//
//   out[b, i, h*D + d] = sum_j softmax_j(q_i . k_j / sqrt(D) + bias[b, j]) v[b, j, v_off + h*D + d]
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
//   softmax, as the TIR kernels do).
// * Softmax scale 1/sqrt(D); fp32 accumulation; online softmax in base 2 with finite
//   sentinels (no inf arithmetic).
//
// Structure: one thread block per (query tile, head, batch); each warp owns 16*MT query rows
// whose q fragments stay in registers. K/V tiles of BN keys stream through a two-stage
// cp.async ring (zero-filled past the sequence end); S = Q K^T and O += P V use
// mma.sync.m16n8k16 (fp16 in, fp32 accumulate) with ldmatrix from XOR-swizzled shared
// memory. Each thread rotates exactly the 16-byte chunks it copied itself, so the rotation
// needs no extra barrier. The output is staged through shared memory for 16-byte stores.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace sam3_attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInit = -3.0e38f;   // running max before any key (finite)
constexpr float kNegTail = -1.0e38f;   // score of a key past the sequence end (finite)
constexpr float kBiasFloor = -1.0e30f; // bias clamp (matches the TIR kernels)

struct Params {
  const half* q;
  const half* k;
  const half* v;
  const float* bias;
  half* out;
  int64_t q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs, o_rs, bias_bs;  // strides in elements
  int q_off, k_off, v_off;                                          // column of head 0
  int batch, heads, nq, nk;
  int grid_h, grid_w;  // RoPE grid (grid_w > 0 when rotating)
  float rope_scale, rope_theta;
  float scale_log2;  // softmax scale * log2(e)
};

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
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(D == 32 || D == 64, "head dim 32 or 64");
  if constexpr (D == 64) {
    return row * 64 + ((chunk ^ (row & 7)) << 3);
  } else {
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
  }
}

// ---------------------------------------------------------------- tile movement

// Copy rows [row0, row0 + ROWS) of a head (gmem points at row 0, column of the head) into a
// swizzled tile; rows at or past `nrows` are zero-filled.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(half* s, const half* g, int64_t rs, int row0, int nrows,
                                          int tid) {
  constexpr int CH = D / 8;
  constexpr int TOTAL = ROWS * CH;
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int idx = it * NT + tid;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CH, c = idx % CH;
      const int gr = row0 + r;
      const bool ok = gr < nrows;
      cp_async16(s + swz<D>(r, c), g + (ok ? gr : 0) * rs + c * 8, ok);
    }
  }
}

// Rotate, in place, the chunks this thread copied with load_tile (same index mapping).
// tab[coord * D/4 + i] = (cos, sin) of coord * scale * f[i].
template <int D, int ROWS, int NT>
__device__ __forceinline__ void rope_tile(half* s, int row0, int nrows, const float2* tab,
                                          int grid_w, int tid) {
  constexpr int CH = D / 8;
  constexpr int Q4 = D / 4;
  constexpr int TOTAL = ROWS * CH;
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int idx = it * NT + tid;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CH, c = idx % CH;
      const int gr = row0 + r;
      if (gr < nrows) {
        const int gy = gr / grid_w;
        const int gx = gr - gy * grid_w;
        const int p0 = c * 4;  // first pair of the chunk; a chunk never straddles x/y halves
        const bool is_x = p0 < Q4;
        const float4* t =
            reinterpret_cast<const float4*>(tab + (is_x ? gx : gy) * Q4 + (is_x ? p0 : p0 - Q4));
        const float4 t01 = t[0], t23 = t[1];
        const float cs[4] = {t01.x, t01.z, t23.x, t23.z};
        const float sn[4] = {t01.y, t01.w, t23.y, t23.w};
        uint4* ptr = reinterpret_cast<uint4*>(s + swz<D>(r, c));
        uint4 val = *ptr;
        uint32_t w[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 xy = __half22float2(*reinterpret_cast<__half2*>(&w[e]));
          w[e] = pack_half2(xy.x * cs[e] - xy.y * sn[e], xy.x * sn[e] + xy.y * cs[e]);
        }
        *ptr = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
}

// ---------------------------------------------------------------- the kernel

template <int D, int NW, int MT, int BN, bool ROPE, bool BIAS>
struct Cfg {
  static constexpr int NT = NW * 32;
  static constexpr int BM = 16 * MT * NW;
  static constexpr int Q4 = D / 4;
  static constexpr int smem_bytes(int table_rows) {
    return (BM * D + 4 * BN * D) * 2 + (BIAS ? 2 * BN * 4 : 0) + (ROPE ? table_rows * Q4 * 8 : 0);
  }
};

template <int D, int NW, int MT, int BN, bool ROPE, bool BIAS>
__global__ void __launch_bounds__(NW * 32)
    attention_kernel(const Params p) {
  using C = Cfg<D, NW, MT, BN, ROPE, BIAS>;
  constexpr int NT = C::NT, BM = C::BM, Q4 = C::Q4;
  constexpr int KS = D / 16;   // k-steps of Q K^T
  constexpr int NS = BN / 8;   // n8 tiles of S
  constexpr int DS = D / 8;    // n8 tiles of O
  static_assert(BN % 16 == 0 && D % 16 == 0, "tile shape");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  half* sQ = reinterpret_cast<half*>(smem_raw);
  half* sK = sQ + BM * D;       // 2 stages
  half* sV = sK + 2 * BN * D;   // 2 stages
  float* sBias = reinterpret_cast<float*>(sV + 2 * BN * D);           // 2 stages (BIAS)
  float2* sTab = reinterpret_cast<float2*>(sBias + (BIAS ? 2 * BN : 0));  // (ROPE)

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int q0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;

  const half* gq = p.q + b * p.q_bs + p.q_off + h * D;
  const half* gk = p.k + b * p.k_bs + p.k_off + h * D;
  const half* gv = p.v + b * p.v_bs + p.v_off + h * D;
  const float* gbias = BIAS ? p.bias + b * p.bias_bs : nullptr;
  const int nk = p.nk, nq = p.nq;
  const int ntiles = (nk + BN - 1) / BN;

  // q tile and the first k/v tile start copying before the rotation table is built
  load_tile<D, BM, NT>(sQ, gq, p.q_rs, q0, nq, tid);
  load_tile<D, BN, NT>(sK, gk, p.k_rs, 0, nk, tid);
  load_tile<D, BN, NT>(sV, gv, p.v_rs, 0, nk, tid);
  cp_async_commit();

  float bias_next = 0.f;
  if constexpr (BIAS) {
    if (tid < BN) {
      bias_next = tid < nk ? fmaxf(gbias[tid], kBiasFloor) * kLog2e : kNegTail;
    }
  }
  if constexpr (ROPE) {
    const int g = max(p.grid_h, p.grid_w);
    for (int e = tid; e < g * Q4; e += NT) {
      const int c = e / Q4, i = e - (e / Q4) * Q4;
      const float inv = 1.0f / powf(p.rope_theta, float(2 * i) / float(D / 2));
      const float a = (float(c) * p.rope_scale) * inv;
      float sn, cs;
      sincosf(a, &sn, &cs);
      sTab[e] = make_float2(cs, sn);
    }
  }
  if constexpr (BIAS) {
    if (tid < BN) sBias[tid] = bias_next;
  }
  cp_async_wait_all();
  if constexpr (ROPE) {
    __syncthreads();  // the table
    rope_tile<D, BM, NT>(sQ, q0, nq, sTab, p.grid_w, tid);
    rope_tile<D, BN, NT>(sK, 0, nk, sTab, p.grid_w, tid);
  }
  __syncthreads();

  // q fragments (A operand, row-major) stay in registers
  uint32_t qf[MT][KS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int row = warp * 16 * MT + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int ch = ks * 2 + (lane >> 4);
      ldsm_x4(qf[mt][ks][0], qf[mt][ks][1], qf[mt][ks][2], qf[mt][ks][3], sQ + swz<D>(row, ch));
    }
  }

  float o[MT][DS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < DS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
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

  for (int j = 0; j < ntiles; ++j) {
    const int st = j & 1;
    const int kv0 = j * BN;
    const bool has_next = j + 1 < ntiles;
    if (has_next) {
      const int kv1 = kv0 + BN;
      load_tile<D, BN, NT>(sK + (st ^ 1) * BN * D, gk, p.k_rs, kv1, nk, tid);
      load_tile<D, BN, NT>(sV + (st ^ 1) * BN * D, gv, p.v_rs, kv1, nk, tid);
      cp_async_commit();
      if constexpr (BIAS) {
        if (tid < BN) {
          const int key = kv1 + tid;
          bias_next = key < nk ? fmaxf(gbias[key], kBiasFloor) * kLog2e : kNegTail;
        }
      }
    }
    const half* cK = sK + st * BN * D;
    const half* cV = sV + st * BN * D;

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
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t b0, b1, b2, b3;
        const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
        const int ch = ks * 2 + ((lane >> 3) & 1);
        ldsm_x4(b0, b1, b2, b3, cK + swz<D>(row, ch));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], qf[mt][ks], b0, b1);
          mma16816(s[mt][2 * np + 1], qf[mt][ks], b2, b3);
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
        ldsm_x4_t(b0, b1, b2, b3, cV + swz<D>(row, ch));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * dp], pa[mt], b0, b1);
          mma16816(o[mt][2 * dp + 1], pa[mt], b2, b3);
        }
      }
    }

    if (has_next) {
      cp_async_wait_all();
      if constexpr (ROPE) rope_tile<D, BN, NT>(sK + (st ^ 1) * BN * D, kv0 + BN, nk, sTab, p.grid_w, tid);
      if constexpr (BIAS) {
        if (tid < BN) sBias[(st ^ 1) * BN + tid] = bias_next;
      }
    }
    __syncthreads();
  }

  // ---- normalise, stage through this warp's rows of sQ, 16-byte stores
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_run[mt][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = 1.f / l;
      const int row = warp * 16 * MT + mt * 16 + (lane >> 2) + hr * 8;
#pragma unroll
      for (int d = 0; d < DS; ++d) {
        const uint32_t v = pack_half2(o[mt][d][2 * hr] * inv, o[mt][d][2 * hr + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, d) + 2 * (lane & 3)) = v;
      }
    }
  }
  __syncwarp();
  {
    constexpr int CH = D / 8;
    constexpr int ROWS = 16 * MT;
    half* go = p.out + b * p.o_bs + h * D;
#pragma unroll
    for (int it = 0; it < ROWS * CH / 32; ++it) {
      const int idx = it * 32 + lane;
      const int r = warp * ROWS + idx / CH, c = idx % CH;
      const int gr = q0 + r;
      if (gr < nq) {
        *reinterpret_cast<uint4*>(go + gr * p.o_rs + c * 8) =
            *reinterpret_cast<const uint4*>(sQ + swz<D>(r, c));
      }
    }
  }
}

// ---------------------------------------------------------------- launch

template <int D, int NW, int MT, int BN, bool ROPE, bool BIAS>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  using C = Cfg<D, NW, MT, BN, ROPE, BIAS>;
  const int table_rows = ROPE ? (p.grid_h > p.grid_w ? p.grid_h : p.grid_w) : 0;
  const int smem = C::smem_bytes(table_rows);
  auto kern = attention_kernel<D, NW, MT, BN, ROPE, BIAS>;
  static int configured = 0;  // largest dynamic shared memory size set so far
  if (smem > 48 * 1024 && smem > configured) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    configured = smem;
  }
  dim3 grid((p.nq + C::BM - 1) / C::BM, p.heads, p.batch);
  kern<<<grid, C::NT, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tile configurations: (warps, 16-row m-tiles per warp), keys per tile 64.
//   1: 4 warps x 32 rows (128)   2: 3 x 32 (96)   3: 2 x 32 (64)   4: 4 x 16 (64)   5: 2 x 16 (32)
template <int D, bool ROPE, bool BIAS>
cudaError_t dispatch_cfg(const Params& p, int config, cudaStream_t stream) {
  switch (config) {
    case 1: return launch<D, 4, 2, 64, ROPE, BIAS>(p, stream);
    case 2: return launch<D, 3, 2, 64, ROPE, BIAS>(p, stream);
    case 3: return launch<D, 2, 2, 64, ROPE, BIAS>(p, stream);
    case 4: return launch<D, 4, 1, 64, ROPE, BIAS>(p, stream);
    case 5: return launch<D, 2, 1, 64, ROPE, BIAS>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Automatic choice: the largest query tile that leaves little padding and enough blocks.
inline int auto_config(const Params& p) {
  int sms = 132;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0) sms = v;
  }
  const int bm[6] = {0, 128, 96, 64, 64, 32};
  const long long bh = (long long)p.batch * p.heads;
  // query rows actually computed (padding included) per useful row, plus a penalty when the
  // grid is under two blocks per multiprocessor
  int best = 1;
  double best_cost = 1e30;
  for (int c : {1, 2, 3, 5}) {
    const long long tiles = (p.nq + bm[c] - 1) / bm[c];
    const long long blocks = tiles * bh;
    double cost = double(tiles * bm[c]) / p.nq;
    const double fill = double(blocks) / (2.0 * sms);
    if (fill < 1.0) cost /= fill;
    if (c == 5) cost *= 1.15;  // 16-row warps re-read k/v from shared memory twice as often
    if (c == 3) cost *= 1.03;
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = c;
    }
  }
  return best;
}

}  // namespace sam3_attn

extern "C" {

// Returns 0 on success, a cudaError_t code otherwise (cudaErrorInvalidValue for arguments the
// kernel does not support: head_dim other than 32/64, offsets/strides not multiples of 8
// elements, pointers not 16-byte aligned, empty key sequence).
// Strides are in elements; bias (float32 [Bb, Nk], rows contiguous) may be null (no bias),
// bias_batch_stride 0 broadcasts it.
// grid_w <= 0: no RoPE. config 0: automatic tile choice (1..5: see dispatch_cfg).
int sam3_attention_fp16(const void* q, const void* k, const void* v, const void* bias, void* out,
                        long long q_batch_stride, long long q_row_stride, int q_offset,
                        long long k_batch_stride, long long k_row_stride, int k_offset,
                        long long v_batch_stride, long long v_row_stride, int v_offset,
                        long long out_batch_stride, long long out_row_stride,
                        long long bias_batch_stride, int batch, int heads, int head_dim, int nq,
                        int nk, int grid_h, int grid_w, float rope_scale, float rope_theta,
                        int config, cudaStream_t stream) {
  using namespace sam3_attn;
  if (batch <= 0 || heads <= 0 || nq <= 0) return 0;
  if (nk <= 0 || (head_dim != 32 && head_dim != 64)) return cudaErrorInvalidValue;
  auto m8 = [](long long x) { return x % 8 == 0; };
  if (!m8(q_batch_stride) || !m8(q_row_stride) || !m8(q_offset) || !m8(k_batch_stride) ||
      !m8(k_row_stride) || !m8(k_offset) || !m8(v_batch_stride) || !m8(v_row_stride) ||
      !m8(v_offset) || !m8(out_batch_stride) || !m8(out_row_stride))
    return cudaErrorInvalidValue;
  auto a16 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  if (!a16(q) || !a16(k) || !a16(v) || !a16(out)) return cudaErrorInvalidValue;
  const bool rope = grid_w > 0;
  if (rope && (grid_h <= 0 || (long long)grid_h * grid_w < nq || (long long)grid_h * grid_w < nk))
    return cudaErrorInvalidValue;
  if (batch > 65535 || heads > 65535) return cudaErrorInvalidValue;

  Params p;
  p.q = static_cast<const half*>(q);
  p.k = static_cast<const half*>(k);
  p.v = static_cast<const half*>(v);
  p.bias = static_cast<const float*>(bias);
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
  p.scale_log2 = kLog2e / sqrtf(float(head_dim));
  if (config <= 0) config = auto_config(p);

  const bool has_bias = bias != nullptr;
  cudaError_t err;
  if (head_dim == 64) {
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

}  // extern "C"
