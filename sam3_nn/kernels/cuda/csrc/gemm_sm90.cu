// fp16 GEMMs for Hopper (sm_90a): CUTLASS 3.x warp-specialized TMA + wgmma kernels.
//
//   out[M, N] = epi(A[M, K] @ op(W) + bias[N]) (+ R[M, N])   fp16 in/out, fp32 accumulation
//   op(W) = W^T for W [N, K] ("nk", nn.Linear) or W for W [K, N] ("kn")
//   epi   = identity | GELU | ReLU   (GELU: `GeluTanh` below, within 3.1e-5 of the erf form)
//   R     = a residual read by the epilogue (CUTLASS's source C with beta = 1: the same
//           kernel instances as without it; beta = 0 skips the C load)
//
// One source, compiled once per part (-DSAM3_GEMM_PART=...) so the parts build in
// parallel; each part exports its entry points with tvm-ffi (DPS: out is last):
//   part 0: sam3_cutlass_gemm_nk(a, w, out)             + sam3_cutlass_gemm_set_tile(int),
//           sam3_cutlass_gemm_set_split(int)
//           sam3_cutlass_gemm_nk_residual(a, w, r, out)
//   part 1: sam3_cutlass_gemm_nk_bias(a, w, bias, out)
//           sam3_cutlass_gemm_nk_bias_residual(a, w, bias, r, out)
//   part 2: sam3_cutlass_gemm_nk_bias_gelu(a, w, bias, out)
//           sam3_cutlass_gemm_nk_bias_relu(a, w, bias, out)
//   part 3: sam3_cutlass_gemm_kn(a, w, out), sam3_cutlass_gemm_kn_bias(a, w, bias, out)
//   part 4: sam3_cutlass_gemm_nk_bias_rope_qk(a, w, bias, heads, window, img_h, img_w, grid_h,
//           grid_w, rope_scale, rope_theta, out): a qkv projection with q and k rotated (2D
//           axial RoPE, head dim 64) in the epilogue (Sm90RopeQK below)
// a: [.., K] (leading dims flattened to M), w: [N, K] / [K, N], bias: [N], out: [.., N];
// with a residual r, out and r are any shape of M * N elements (row-major [M, N] flattened:
// the rewrite emits out in its consumer's shape, so no reshape copy follows).
// K and N must be multiples of 8 (16-byte TMA rows); M is free (TMA clips the tails).
//
// Tile configs (`pick_tile`: 0 for <= 256 rows, 6 for K <= 256, else 2, unless forced by
// sam3_cutlass_gemm_set_tile(i), -1 = default; the sweeps behind the choice are in
// docs/kernels.md, "Tile configurations"):
//   0: 128x128x64 cooperative (2 consumer warpgroups), cluster 2x1, persistent
//   1: 128x256x64 cooperative, cluster 2x1, persistent
//   2: 128x128x64 ping-pong (consumer warpgroups alternate tiles), cluster 2x1, epilogue
//      in 64x64 subtiles
//   (no 3: stream-K lost on every shape measured, also with a scheduler subclass that
//    compiles under CUTLASS_ENABLE_GDC_FOR_SM90, which CUTLASS 4.2's own does not)
//   4: 128x192x64 cooperative, cluster 2x1, persistent
//   5: as 2 with CUTLASS's automatic epilogue subtile (64x32 for ping-pong), for comparison
//   6: as 2 without a cluster (1x1): for K <= 256, where the k loop is 4 blocks long
//   7: 64x128x64 ping-pong, no cluster: the tail rows of a split GEMM (split_rows below;
//      sam3_cutlass_gemm_set_split(s): -1 = split_rows decides, 0 = never, 1 = whenever it fits)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "ln_fold.cuh"
#include "rope.cuh"
#include "tensor_args.cuh"
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#ifndef SAM3_GEMM_PART
#define SAM3_GEMM_PART 0
#endif

using namespace cute;
using tvm::ffi::TensorView;

namespace sam3 {

using half = cutlass::half_t;

enum class Epi { kNone, kBias, kBiasGelu, kBiasRelu, kBiasRopeQK, kBiasResidualStats, kLnRopeQK, kLnGelu };

template <Epi E>
struct FusionFor;
template <>
struct FusionFor<Epi::kNone> {
  using Op = cutlass::epilogue::fusion::LinearCombination<half, float, half, float>;
};
template <>
struct FusionFor<Epi::kBias> {
  using Op = cutlass::epilogue::fusion::LinCombPerColBias<half, float, half, half, float>;
};
// GELU(x) = x * Phi(x) for the epilogue (`GeluTanh`), as 0.5 x (1 + tanh(x q(x^2))) with
// q(s) = c0 + s * sat(c1 + c2 s) fitted to atanh(erf(x / sqrt 2)) / x (least squares on
// [0, 6], weighted by GELU's sensitivity to q), sat() clamping to [0, 1]: the fit for
// x^2 < c1 / -c2 (~103), q = c0 beyond, where tanh has saturated. Seven instructions and one
// MUFU (tanh.approx), the clamp folded into an FMA's saturation: the epilogue runs after each
// tile's mainloop, so its length decides whether the ping-pong schedule hides it
// (docs/kernels.md, "GELU epilogue"). Error against the exact 0.5 x (1 + erf(x / sqrt 2)),
// measured on the device over every fp16 input and a dense float grid: 3.1e-5 absolute at
// most (the fp16 output's rounding is 4.9e-4 relative), 8.2e-4 relative where |GELU(x)| > 0.03
// (the negative tail, where 1 + tanh cancels and MUFU.TANH's 1e-5 relative error shows).
// Large |x| gives x or 0; NaN passes through.
template <class T>
struct GeluTanh {
  static constexpr float kC0 = 7.9745782e-01f, kC1 = 3.7051034e-02f, kC2 = -3.5886733e-04f;
  CUTLASS_HOST_DEVICE float eval(float x) const {
    float x2 = x * x, r, t;
#if defined(__CUDA_ARCH__)
    asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(kC2), "f"(x2), "f"(kC1));
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(x * fmaf(r, x2, kC0)));
#else
    r = fminf(fmaxf(fmaf(kC2, x2, kC1), 0.0f), 1.0f);
    t = tanhf(x * fmaf(r, x2, kC0));
#endif
    float h = 0.5f * x;
    return fmaf(h, t, h);
  }
  CUTLASS_HOST_DEVICE T operator()(T const& x) const { return T(eval(float(x))); }
};
template <class T, int N>
struct GeluTanh<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const {
    cutlass::Array<T, N> y;
    GeluTanh<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = op(v[i]);
    return y;
  }
};

template <>
struct FusionFor<Epi::kBiasRelu> {
  using Op = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::ReLu, half,
                                                                float, half, half, float>;
};

// ---- RoPE epilogue (Epi::kBiasRopeQK): the qkv projection of a RoPE attention ----------------
// out = rot(acc + bias) on the q and k columns ([0, 2 * hidden)), acc + bias on the v columns:
// what sam3_rope_qk_cuda (attention.cu) does to the GEMM's output, fused so the attention
// kernel reads q and k already rotated (no rotation kernel, no rotation in the attention).
// Head dim 64: column c of q or k is element d = c % 64 of its head, pair p = d / 2 rotates
// (x[2p], x[2p+1]) by pos * scale * f[i], pos = the token's column for p < 16 (i = p) and its
// row for p >= 16 (i = p - 16), f[i] = theta ** (-2 i / 32). Row r is token t = r % n of its
// batch entry; window 0: t sits at (t / grid_w, t % grid_w); window > 0: at
// ((t / img_w) % window, (t % img_w) % window) (in-window positions, window mode).
// cos/sin come from a table in shared memory over the distinct coordinates (rows x 16 angles,
// the attention kernel's table: same float32 values), built by each consumer warpgroup before
// its first tile; per pair the epilogue does one table read and four FMAs, and the token
// coordinates are shared by the pairs of a row (branch-free float-reciprocal divisions). A
// single warp per scheduler runs the epilogue, so its dependent chains are not hidden: sin/cos
// per pair, or CUTLASS's FastDivmod (branches, parameters reloaded per pair), measured over
// 2x slower (docs/kernels.md, "RoPE epilogue"). The rotation is computed from the float32
// accumulator (one rounding to fp16, where the standalone kernel rotates the rounded projection).
constexpr int kRopeTableRows = 96;  // max distinct coordinates: the window, or the global grid's side
// table row stride (float2s): 20 = 4 mod 16, so the 4 rows x 4 frequencies a half-warp reads
// for one pair of its fragment fall in 16 distinct 8-byte bank slots
constexpr int kRopeTableStride = 20;

// a / d and a % d for 0 <= a < 2^24 without a division: a float reciprocal, then a +-1 fix-up
// (branch-free, so the compiler shares it between the pairs of one row)
struct FloatDivmod {
  int d = 1;
  float inv = 1.0f;
  FloatDivmod() = default;
  explicit FloatDivmod(int d_) : d(d_), inv(1.0f / float(d_)) {}
  CUTLASS_DEVICE int operator()(int a, int& r) const {
    int q = __float2int_rd((float(a) + 0.5f) * inv);
    r = a - q * d;
    q = r < 0 ? q - 1 : (r >= d ? q + 1 : q);
    r = a - q * d;
    return q;
  }
};

struct RopeQKArgs {
  int hidden = 0;  // q columns [0, hidden), k [hidden, 2 hidden), v after
  // row r: token t = r % n at (y, x) = ((t / row_w) % window, (t % row_w) % window): windowed,
  // row_w = the image's width in tokens; global, row_w = the grid's width, window = 2^20
  FloatDivmod n, row_w, window;
  int rows = 1;  // table rows: the window, else max(grid_h, grid_w) (<= kRopeTableRows)
  float scale = 1.0f, theta = 10000.0f;
};

struct Sm90RopeQK : ArgsOnlyNode<RopeQKArgs> {
  struct SharedStorage {
    alignas(16) float2 tab[kRopeTableRows * kRopeTableStride];  // (cos, sin) of coordinate c, frequency i
  };

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.hidden % 128 == 0 && args.rows > 0 && args.rows <= kRopeTableRows;
  }

  CUTLASS_HOST_DEVICE Sm90RopeQK() {}
  CUTLASS_HOST_DEVICE Sm90RopeQK(Params const& p, SharedStorage const& ss)
      : params(p), tab(const_cast<float2*>(ss.tab)) {}
  Params params;
  float2* tab = nullptr;
  bool built = false;  // this thread's warpgroup has built the table (the node lives for the kernel)

  template <class CTensor, class ITensor>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor c, ITensor ox, ITensor oy, int m_base_, int n_base_,
                                          bool rotate_, bool build_, int thread_idx_, float2* tab_,
                                          Params const& p)
        : tCcD(c), off_x(ox), off_y(oy), m_base(m_base_), n_base(n_base_), rotate(rotate_), build(build_),
          thread_idx(thread_idx_), tab(tab_), params(p) {}
    CTensor tCcD;       // (CPY, CPY_M, CPY_N, EPI_M, EPI_N), relative to the thread's first element
    ITensor off_x, off_y;  // per row (stride 0 along N): table offsets of its x and y coordinates
    int m_base, n_base; // that element's row and column in D
    bool rotate;        // a q or k tile (tiles never straddle q/k and v: hidden % 128 == 0)
    bool build;         // build the table first (the warpgroup's first tile)
    int thread_idx;     // within the warpgroup
    float2* tab;
    Params const& params;

    // the table (first tile), then each of the thread's rows' grid coordinates (4 divisions),
    // once per tile so the pairs of a row share them (computed per pair, the compiler merged
    // only half of the repeats: 16 more divisions per thread and tile)
    CUTLASS_DEVICE void begin() {
      if (build) {
        for (int e = thread_idx % 128; e < params.rows * 16; e += 128) {
          const int c = e >> 4, i = e & 15;
          tab[c * kRopeTableStride + i] = sam3_cuda::rope_cos_sin(c, i, 64, params.scale, params.theta);
        }
      }
      if (!rotate) return;
      using namespace cute;
      Tensor fx = filter_zeros(off_x);
      Tensor fy = filter_zeros(off_y);
      Tensor fc = filter_zeros(tCcD, off_x.stride());
      const FloatDivmod n = params.n, row_w = params.row_w, window = params.window;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(fx); ++i) {
        const int row = m_base + int(get<0>(fc(i)));
        int t, x0, gy, gx;
        n(row, t);
        const int y0 = row_w(t, x0);
        window(y0, gy);
        window(x0, gx);
        fx(i) = gx * kRopeTableStride;
        fy(i) = gy * kRopeTableStride;
      }
    }
    CUTLASS_DEVICE bool begin_sync_needed() const { return build; }

    template <class ElementAccumulator, class ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<half, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                   int epi_v, int epi_m, int epi_n,
                                                   cutlass::Array<ElementInput, FragmentSize> const& x) {
      static_assert(FragmentSize % 2 == 0, "RoPE pairs need even fragments");
      cutlass::Array<float, FragmentSize> y;
      if (!rotate) {  // a v tile (uniform over the tile: no branch inside the pair loop below)
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < FragmentSize; ++j) y[j] = float(x[j]);
        return cutlass::NumericArrayConverter<half, float, FragmentSize>{}(y);
      }
      // coordinates relative to this thread's first element (static), + its base (dynamic)
      Tensor coords = tCcD(_, _, _, epi_m, epi_n);
      Tensor ox = off_x(_, _, _, epi_m, epi_n);
      Tensor oy = off_y(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < FragmentSize; j += 2) {
        // elements j, j + 1 of a fragment are columns c, c + 1 (c even) of one row: the fp16
        // register pairs the STSM copy stores
        const float a = float(x[j]), b = float(x[j + 1]);
        const int e = epi_v * FragmentSize + j;
        const int col = n_base + int(get<1>(coords(e)));
        const int pair = (col & 63) >> 1;
        const float2 cs = tab[(pair < 16 ? ox(e) : oy(e)) + (pair & 15)];
        y[j] = a * cs.x - b * cs.y;
        y[j + 1] = a * cs.y + b * cs.x;
      }
      return cutlass::NumericArrayConverter<half, float, FragmentSize>{}(y);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    // tCcD holds coordinates relative to the thread's first element; residue_tCcD is
    // (M, N) minus that element's coordinates in D
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    const int m_base = int(M) - int(get<0>(args.residue_tCcD));
    const int n_base = int(N) - int(get<1>(args.residue_tCcD));
    const bool rotate = int(n) * int(size<1>(args.tile_shape_mnk)) < 2 * params.hidden;
    const bool build = !built;
    built = true;
    auto ox = sam3::row_registers<ReferenceSrc, int>(args);
    auto oy = sam3::row_registers<ReferenceSrc, int>(args);
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(ox)>(
        args.tCcD, ox, oy, m_base, n_base, rotate, build, args.thread_idx, tab, params);
  }
};

// acc + bias[col] in fp32, the subtree under the RoPE and GELU epilogues' top nodes; their
// arguments are {{acc fetch, bias row broadcast, plus}, top node}
template <class Tile>
using AccPlusBias = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90AccFetch,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, half, float, Stride<_0, _1, int64_t>, 8>>;

// rot(acc + bias[col]): the node above over the bias add
template <class Tile>
using RopeQKCallbacks = cutlass::epilogue::fusion::Sm90EVT<Sm90RopeQK, AccPlusBias<Tile>>;

// GELU(acc + bias[col]): one add, no alpha / beta terms (the LinCombPerColBiasEltAct fusion
// computes alpha * acc + beta * C + bias, two FMAs)
template <class Tile>
using BiasGeluCallbacks = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<GeluTanh, half, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    AccPlusBias<Tile>>;

// ---- LayerNorm fold (ln_fold.cuh) ----
// x = fp16(acc + bias[col] + C) stored, its rows' statistics emitted: the residual GEMM before
// a folded LayerNorm
template <class Tile>
using BiasResidualStatsCallbacks = cutlass::epilogue::fusion::Sm90EVT<
    Sm90RowStats,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        AccPlusBias<Tile>, cutlass::epilogue::fusion::Sm90SrcFetch<half>>>;

// rstd * (acc - mean * c[col]) + b'[col] in fp32 (c, b' float32): the linear after a folded
// LayerNorm, under the RoPE and GELU top nodes; arguments {{acc fetch, c, b', ln}, top node}
template <class Tile>
using LnApplyTree = cutlass::epilogue::fusion::Sm90EVT<
    Sm90LnApply, cutlass::epilogue::fusion::Sm90AccFetch,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>, 4>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>, 4>>;
template <class Tile>
using LnRopeQKCallbacks = cutlass::epilogue::fusion::Sm90EVT<Sm90RopeQK, LnApplyTree<Tile>>;
template <class Tile>
using LnGeluCallbacks = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<GeluTanh, half, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    LnApplyTree<Tile>>;

// the LayerNorm-fold consumers' epilogue arguments: the row statistics, c, b' (float32)
struct LnFoldArgs {
  LnApplyArgs apply;
  const float* c = nullptr;
  const float* b = nullptr;
};

template <Epi E, class Tile>
struct FusionOf {
  using Op = typename FusionFor<E>::Op;
};
template <class Tile>
struct FusionOf<Epi::kBiasGelu, Tile> {
  using Op = BiasGeluCallbacks<Tile>;
};
template <class Tile>
struct FusionOf<Epi::kBiasRopeQK, Tile> {
  using Op = RopeQKCallbacks<Tile>;
};
template <class Tile>
struct FusionOf<Epi::kBiasResidualStats, Tile> {
  using Op = BiasResidualStatsCallbacks<Tile>;
};
template <class Tile>
struct FusionOf<Epi::kLnRopeQK, Tile> {
  using Op = LnRopeQKCallbacks<Tile>;
};
template <class Tile>
struct FusionOf<Epi::kLnGelu, Tile> {
  using Op = LnGeluCallbacks<Tile>;
};

template <class Tile, class Cluster, class MainSched, class EpiSched, class Scheduler, Epi E,
          class LayoutB, class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct Gemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      EpiTile, float, float, half, LayoutC, kAlign, half,
      LayoutC, kAlign, EpiSched, typename FusionOf<E, Tile>::Op>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, half, LayoutA, kAlign, half, LayoutB,
      kAlign, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kHasBias = E != Epi::kNone;
  static constexpr bool kRope = E == Epi::kBiasRopeQK;
  static constexpr bool kBiasGelu = E == Epi::kBiasGelu;
  static constexpr Epi kEpi = E;
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using Persistent = cutlass::gemm::PersistentScheduler;

template <Epi E, class LB>
using Cfg0 = Gemm<Shape<_128, _128, _64>, Shape<_2, _1, _1>, Coop, CoopEpi, Persistent, E, LB>;
template <Epi E, class LB>
using Cfg1 = Gemm<Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi, Persistent, E, LB>;
template <Epi E, class LB>
using Cfg2 = Gemm<Shape<_128, _128, _64>, Shape<_2, _1, _1>, Ping, PingEpi, Persistent, E, LB, Shape<_64, _64>>;
template <Epi E, class LB>
using Cfg4 = Gemm<Shape<_128, _192, _64>, Shape<_2, _1, _1>, Coop, CoopEpi, Persistent, E, LB>;
template <Epi E, class LB>
using Cfg5 = Gemm<Shape<_128, _128, _64>, Shape<_2, _1, _1>, Ping, PingEpi, Persistent, E, LB>;
template <Epi E, class LB>
using Cfg6 = Gemm<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi, Persistent, E, LB, Shape<_64, _64>>;
template <Epi E, class LB>
using Cfg7 = Gemm<Shape<_64, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi, Persistent, E, LB, Shape<_64, _64>>;


// ---- shared state (defined in part 0) -------------------------------------------------
extern int g_forced_tile;
extern int g_split;  // -1: split_rows decides, 0: never split, 1: split whatever K is
constexpr int64_t kSplitMinK = 2048;
using sam3_cuda::sm_count;

#if SAM3_GEMM_PART == 0
int g_forced_tile = -1;
int g_split = -1;

#endif

// Ping-pong (config 2) by default: one warpgroup's epilogue overlaps the other's mainloop,
// which pays at the ViT's short K (16 k-blocks at K = 1024); with 64x64 epilogue subtiles and
// the GeluTanh epilogue it measured ahead of every cooperative tile on the ViT's GEMMs. K <= 256
// (the DETR encoder) runs it without a cluster (config 6), where the 2x1 cluster measured
// slower; <= 256 rows (the text encoder's 32 tokens) the cooperative 128x128 tile (config 0)
// led. Sweeps: docs/kernels.md, "Tile configurations".
inline int pick_tile(int64_t m, int64_t k) {
  if (g_forced_tile >= 0) return g_forced_tile;
  if (m <= 256) return 0;
  return k <= 256 ? 6 : 2;
}

template <class G>
void run(int64_t m, int64_t n, int64_t k, const void* a, const void* w, const void* bias,
         const void* residual, void* out, int device, cudaStream_t stream,
         const RopeQKArgs* rope = nullptr, const RowStatsArgs* stats = nullptr,
         const LnFoldArgs* ln = nullptr) {
  using Op = typename G::Op;
  using Kernel = typename G::Kernel;
  auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(int(m), int(k), 1));
  auto sb = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(int(n), int(k), 1));
  auto sc = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(int(m), int(n), 1));
  auto sd = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(int(m), int(n), 1));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  // C = the residual (beta = 1), else never read (beta = 0): it aliases D so the C
  // descriptor is valid
  const void* src = residual ? residual : out;
  typename Op::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                              {int(m), int(n), int(k), 1},
                              {static_cast<const half*>(a), sa, static_cast<const half*>(w), sb},
                              {{}, static_cast<const half*>(src), sc, static_cast<half*>(out), sd},
                              hw};
  if constexpr (G::kEpi == Epi::kBiasResidualStats) {  // {{AccPlusBias, C fetch, plus}, stats}
    args.epilogue.thread = {{{{}, {static_cast<const half*>(bias)}, {}}, {}, {}}, *stats};
  } else if constexpr (G::kEpi == Epi::kLnRopeQK) {  // {LnApplyTree, rotation}
    args.epilogue.thread = {{{}, {ln->c}, {ln->b}, ln->apply}, *rope};
  } else if constexpr (G::kEpi == Epi::kLnGelu) {  // {LnApplyTree, GELU}
    args.epilogue.thread = {{{}, {ln->c}, {ln->b}, ln->apply}, {}};
  } else if constexpr (G::kBiasGelu) {  // AccPlusBias, then GELU (no arguments)
    args.epilogue.thread = {{{}, {static_cast<const half*>(bias)}, {}}, {}};
  } else if constexpr (G::kRope) {  // AccPlusBias, then the rotation
    args.epilogue.thread = {{{}, {static_cast<const half*>(bias)}, {}}, *rope};
  } else {
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = residual ? 1.0f : 0.0f;
    if constexpr (G::kHasBias) {
      args.epilogue.thread.bias_ptr = static_cast<const half*>(bias);
    }
  }
  sam3_cuda::run_cutlass<Op, /*kPdl=*/true>(args, device, stream,
                             "GEMM M=" + std::to_string(m) + " N=" + std::to_string(n) +
                                 " K=" + std::to_string(k));
}

using sam3_cuda::check;
using sam3_cuda::ptr;

// rows [row0, row0 + m) of the GEMM with kernel G: a, r and out offset by row0 rows
template <class G>
void run_rows(int64_t m, int64_t n, int64_t k, const void* pa, const void* pw, const void* bp,
              const void* rp, void* po, int dev, cudaStream_t stream, int64_t row0) {
  run<G>(m, n, k, static_cast<const half*>(pa) + row0 * k, pw, bp,
         rp ? static_cast<const half*>(rp) + row0 * n : nullptr, static_cast<half*>(po) + row0 * n,
         dev, stream);
}

// Wave quantization: a persistent 128x128 kernel runs its tiles in rounds of one per SM, so
// the ViT's fc2 (5184 x 4736 -> 1024: 41 x 8 = 328 tiles, 2.48 rounds on 132 SMs) keeps only
// 64 SMs busy in its third round. Split instead: the head rows in whole rounds of config 6's
// tiles (33 x 8 = 264: 2 rounds; config 2's 2x1 cluster would need an even count of row
// tiles), then the tail rows (960) in one round of config 7's 64x128 tiles (15 x 8 = 120).
// The second launch costs about 6 us, so only long K (>= kSplitMinK) pays; measurements and
// the tails tried: docs/kernels.md, "Wave quantization".
// Returns the head's rows, or 0 for one launch.
inline int64_t split_rows(int64_t m, int64_t n, int64_t k, int64_t sms) {
  if (g_split == 0 || g_forced_tile >= 0 || m <= 256 || sms <= 0) return 0;
  if (g_split < 0 && k < kSplitMinK) return 0;
  const int64_t tn = (n + 127) / 128, tm = (m + 127) / 128;
  const int64_t head_tm = (tm * tn / sms) * sms / tn;  // row tiles filling whole rounds
  if (head_tm <= 0 || head_tm >= tm) return 0;
  const int64_t tail_tm = (m - head_tm * 128 + 63) / 64;  // the tail's 64-row tiles
  return tail_tm * tn <= sms ? head_tm * 128 : 0;  // ... must fit one round
}

struct GemmDims {
  int64_t m, n, k;
};

// The checks every entry shares: a [.., K] (M = its rows), w [N, K] (kNK) or [K, N], out of
// M * N elements, K and N multiples of 8 (TMA's 16-byte rows). What out's shape must be
// beyond its size is each entry's own rule.
inline GemmDims gemm_dims(const TensorView& a, const TensorView& w, const TensorView& out, bool nk) {
  check(a, "a");
  check(w, "w");
  check(out, "out");
  if (w.ndim() != 2) TVM_FFI_THROW(ValueError) << "w must be 2-D";
  const int64_t k = a.shape()[a.ndim() - 1];
  const int64_t n = nk ? w.shape()[0] : w.shape()[1];
  const int64_t wk = nk ? w.shape()[1] : w.shape()[0];
  const int64_t m = a.numel() / (k ? k : 1);
  if (wk != k)
    TVM_FFI_THROW(ValueError) << "GEMM shape mismatch: a has K = " << k << " columns, w ("
                              << (nk ? "[N, K]" : "[K, N]") << ") has K = " << wk;
  if (out.numel() != m * n)
    TVM_FFI_THROW(ValueError) << "GEMM shape mismatch: out has " << out.numel() << " elements, expected M * N = "
                              << m << " * " << n;
  if (k % 8 || n % 8)
    TVM_FFI_THROW(ValueError) << "K and N must be multiples of 8, got K = " << k << ", N = " << n;
  return {m, n, k};
}

template <Epi E, bool kNK>
void gemm(TensorView a, TensorView w, const TensorView* bias, const TensorView* residual,
          TensorView out, const RopeQKArgs* rope = nullptr) {
  const GemmDims d = gemm_dims(a, w, out, kNK);
  const int64_t m = d.m, n = d.n, k = d.k;
  if (bias) check(*bias, "bias");
  if (residual) check(*residual, "residual");
  // with a residual, out (and r) may have any shape of M * N elements (see the top)
  if (!residual && out.shape()[out.ndim() - 1] != n)
    TVM_FFI_THROW(ValueError) << "GEMM shape mismatch: out's last dimension must be N = " << n;
  if (residual && residual->numel() != m * n)
    TVM_FFI_THROW(ValueError) << "residual must have M * N elements";
  if (bias && bias->numel() != n) TVM_FFI_THROW(ValueError) << "bias must have N elements";
  if (m == 0) return;
  int dev = a.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  using LB = std::conditional_t<kNK, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  const void* bp = bias ? ptr(*bias) : nullptr;
  const void* rp = residual ? ptr(*residual) : nullptr;
  void *pa = ptr(a), *pw = ptr(w), *po = ptr(out);
  if constexpr (E == Epi::kBiasRopeQK) {  // the ViT's qkv projections: one config
    run<Cfg2<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream, rope);
  } else if constexpr (!kNK) {  // kn: rare in the model, one config
    run<Cfg0<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
    return;
  } else {
    if (const int64_t head = split_rows(m, n, k, sm_count(dev))) {  // whole waves + a tail
      run_rows<Cfg6<E, LB>>(head, n, k, pa, pw, bp, rp, po, dev, stream, 0);
      return run_rows<Cfg7<E, LB>>(m - head, n, k, pa, pw, bp, rp, po, dev, stream, head);
    }
    switch (pick_tile(m, k)) {
      case 1:
        return run<Cfg1<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
      case 2:
        return run<Cfg2<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
      case 4:
        return run<Cfg4<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
      case 5:
        return run<Cfg5<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
      case 6:
        return run<Cfg6<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);

      default:
        return run<Cfg0<E, LB>>(m, n, k, pa, pw, bp, rp, po, dev, stream);
    }
  }
}

constexpr int64_t kStatsTileN = 128;  // the producer configs' tile width (2, 6, 7): one part each

// x = a @ w^T + bias + r (stored as out) and x's row statistics (ln_fold.cuh):
// stats [M, ceil(N / 128), 2] float32
inline void gemm_stats(TensorView a, TensorView w, TensorView bias, TensorView r, TensorView out,
                       TensorView stats) {
  const GemmDims d = gemm_dims(a, w, out, true);
  const int64_t m = d.m, n = d.n, k = d.k;
  check(bias, "bias");
  check(r, "residual");
  check(stats, "stats", 32);
  if (r.numel() != m * n) TVM_FFI_THROW(ValueError) << "residual must have M * N elements";
  if (bias.numel() != n) TVM_FFI_THROW(ValueError) << "bias must have N elements";
  const int64_t parts = (n + kStatsTileN - 1) / kStatsTileN;
  if (stats.ndim() != 3 || stats.shape()[0] != m || stats.shape()[1] != parts || stats.shape()[2] != 2)
    TVM_FFI_THROW(ValueError) << "row statistics must be [" << m << ", " << parts << ", 2] for "
                              << m << " rows of " << n;
  if (m == 0) return;
  const int dev = a.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  using LB = cutlass::layout::ColumnMajor;
  constexpr Epi E = Epi::kBiasResidualStats;
  const void *pa = ptr(a), *pw = ptr(w), *pb = ptr(bias), *pr = ptr(r);
  void* po = ptr(out);
  float2* ps = static_cast<float2*>(ptr(stats));
  auto rows = [&](auto g, int64_t row0, int64_t mm) {
    using G = decltype(g);
    const RowStatsArgs sa{ps + row0 * parts, int(parts)};
    run<G>(mm, n, k, static_cast<const half*>(pa) + row0 * k, pw, pb,
           static_cast<const half*>(pr) + row0 * n, static_cast<half*>(po) + row0 * n, dev, stream,
           nullptr, &sa);
  };
  if (const int64_t head = split_rows(m, n, k, sm_count(dev))) {  // as gemm's split
    rows(Cfg6<E, LB>{}, 0, head);
    return rows(Cfg7<E, LB>{}, head, m - head);
  }
  if (m <= 256 || k <= 256) return rows(Cfg6<E, LB>{}, 0, m);
  return rows(Cfg2<E, LB>{}, 0, m);
}

// A linear of LayerNorm(a) with the norm folded (ln_fold.cuh): a [.., K] the un-normalized
// rows, stats [M, parts, 2] their statistics, w' [N, K] fp16, c and b' [N] float32
template <Epi E>
void gemm_ln(TensorView a, TensorView stats, TensorView w, TensorView c, TensorView b, double eps,
             TensorView out, const RopeQKArgs* rope = nullptr) {
  const GemmDims d = gemm_dims(a, w, out, true);
  const int64_t m = d.m, n = d.n, k = d.k;
  check(stats, "stats", 32);
  check(c, "c", 32);
  check(b, "b", 32);
  if (out.shape()[out.ndim() - 1] != n)
    TVM_FFI_THROW(ValueError) << "GEMM shape mismatch: out's last dimension must be N = " << n;
  if (c.numel() != n || b.numel() != n) TVM_FFI_THROW(ValueError) << "c and b must have N elements";
  if (stats.ndim() != 3 || stats.shape()[0] != m || stats.shape()[2] != 2 || stats.shape()[1] % 2 ||
      stats.shape()[1] > kMaxLnParts)
    TVM_FFI_THROW(ValueError) << "row statistics must be [" << m << ", parts (even, <= " << kMaxLnParts
                              << "), 2]";
  if (m == 0) return;
  const int dev = a.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  LnFoldArgs ln;
  ln.apply = {static_cast<const float2*>(ptr(stats)), int(stats.shape()[1]), 1.0f / float(k), float(eps)};
  ln.c = static_cast<const float*>(ptr(c));
  ln.b = static_cast<const float*>(ptr(b));
  run<Cfg2<E, cutlass::layout::ColumnMajor>>(m, n, k, ptr(a), ptr(w), nullptr, nullptr, ptr(out), dev,
                                             stream, rope, nullptr, &ln);
}

// the RoPE epilogue's arguments for a qkv projection of a [B, N, K] (or [B, .., K]: N tokens per
// batch entry; see gemm_nk_bias_rope_qk)
inline RopeQKArgs rope_args(const TensorView& a, int64_t n, int64_t heads, int64_t window, int64_t img_h,
                            int64_t img_w, int64_t grid_h, int64_t grid_w, double rope_scale,
                            double rope_theta) {
  // a: [B, N, K], or [B, .., K] with N = the product of the middle dims
  if (a.ndim() < 3 || a.shape()[0] <= 0) TVM_FFI_THROW(ValueError) << "RoPE GEMM: a must be [B, N, K]";
  const int64_t tokens = a.numel() / a.shape()[0] / std::max<int64_t>(a.shape()[a.ndim() - 1], 1);
  if (heads <= 0 || n % (3 * heads) || n / (3 * heads) != 64)
    TVM_FFI_THROW(ValueError) << "RoPE GEMM: " << n << " columns are not q, k, v of " << heads
                              << " heads of 64";
  if (window > 0 ? (img_h * img_w != tokens || img_h % window || img_w % window ||
                    grid_h < window || grid_w < window)
                 : (grid_h <= 0 || grid_w <= 0 || grid_h * grid_w < tokens))
    TVM_FFI_THROW(ValueError) << "RoPE GEMM: " << tokens << " tokens do not fit the RoPE grid "
                              << grid_h << "x" << grid_w << " (window " << window << ", image "
                              << img_h << "x" << img_w << ")";
  if ((n / 3) % 128)  // 128-column tiles must not straddle q/k and v
    TVM_FFI_THROW(ValueError) << "RoPE GEMM: hidden width " << n / 3 << " is not a multiple of 128";
  if (a.numel() / std::max<int64_t>(a.shape()[a.ndim() - 1], 1) >= (1 << 24))
    TVM_FFI_THROW(ValueError) << "RoPE GEMM: 2^24 rows or more";
  RopeQKArgs rope;
  rope.hidden = int(n / 3);
  rope.n = FloatDivmod(int(tokens));
  rope.row_w = FloatDivmod(int(window > 0 ? img_w : grid_w));
  rope.window = FloatDivmod(int(window > 0 ? window : 1 << 20));
  rope.scale = float(rope_scale);
  rope.theta = float(rope_theta);
  rope.rows = int(window > 0 ? window : std::max(grid_h, grid_w));
  if (rope.rows > kRopeTableRows)
    TVM_FFI_THROW(ValueError) << "RoPE GEMM: " << rope.rows << " coordinates per axis, the table holds "
                              << kRopeTableRows;
  return rope;
}

}  // namespace sam3

namespace {
#if SAM3_GEMM_PART == 0
void gemm_nk(TensorView a, TensorView w, TensorView out) {
  sam3::gemm<sam3::Epi::kNone, true>(a, w, nullptr, nullptr, out);
}
void gemm_nk_residual(TensorView a, TensorView w, TensorView r, TensorView out) {
  sam3::gemm<sam3::Epi::kNone, true>(a, w, nullptr, &r, out);
}
void set_tile(int tile) { sam3::g_forced_tile = tile; }
void set_split(int split) { sam3::g_split = split; }
#elif SAM3_GEMM_PART == 1
void gemm_nk_bias(TensorView a, TensorView w, TensorView b, TensorView out) {
  sam3::gemm<sam3::Epi::kBias, true>(a, w, &b, nullptr, out);
}
void gemm_nk_bias_residual(TensorView a, TensorView w, TensorView b, TensorView r, TensorView out) {
  sam3::gemm<sam3::Epi::kBias, true>(a, w, &b, &r, out);
}
#elif SAM3_GEMM_PART == 2
void gemm_nk_bias_gelu(TensorView a, TensorView w, TensorView b, TensorView out) {
  sam3::gemm<sam3::Epi::kBiasGelu, true>(a, w, &b, nullptr, out);
}
void gemm_nk_bias_relu(TensorView a, TensorView w, TensorView b, TensorView out) {
  sam3::gemm<sam3::Epi::kBiasRelu, true>(a, w, &b, nullptr, out);
}
#elif SAM3_GEMM_PART == 4
// a [B, N, K], w [3 * hidden, K]: the qkv projection of N-token sequences with q and k rotated
// (see Sm90RopeQK; the scalars are sam3_rope_qk_cuda's, so the rewrite passes them on)
void gemm_nk_bias_rope_qk(TensorView a, TensorView w, TensorView b, int64_t heads, int64_t window,
                          int64_t img_h, int64_t img_w, int64_t grid_h, int64_t grid_w,
                          double rope_scale, double rope_theta, TensorView out) {
  const sam3::RopeQKArgs rope = sam3::rope_args(a, w.ndim() == 2 ? w.shape()[0] : 0, heads, window,
                                                img_h, img_w, grid_h, grid_w, rope_scale, rope_theta);
  sam3::gemm<sam3::Epi::kBiasRopeQK, true>(a, w, &b, nullptr, out, &rope);
}
#elif SAM3_GEMM_PART == 3
void gemm_kn(TensorView a, TensorView w, TensorView out) {
  sam3::gemm<sam3::Epi::kNone, false>(a, w, nullptr, nullptr, out);
}
void gemm_kn_bias(TensorView a, TensorView w, TensorView b, TensorView out) {
  sam3::gemm<sam3::Epi::kBias, false>(a, w, &b, nullptr, out);
}
#elif SAM3_GEMM_PART == 5
void gemm_nk_bias_residual_stats(TensorView a, TensorView w, TensorView b, TensorView r, TensorView out,
                                 TensorView stats) {
  sam3::gemm_stats(a, w, b, r, out, stats);
}
#elif SAM3_GEMM_PART == 6
// a [B, N, K] (or [B, H, W, K]) un-normalized, its statistics, w' [3 * hidden, K], c, b' float32 [3 * hidden]; the
// RoPE scalars as gemm_nk_bias_rope_qk's
void gemm_nk_lnfold_rope_qk(TensorView a, TensorView stats, TensorView w, TensorView c, TensorView b,
                            double eps, int64_t heads, int64_t window, int64_t img_h, int64_t img_w,
                            int64_t grid_h, int64_t grid_w, double rope_scale, double rope_theta,
                            TensorView out) {
  const sam3::RopeQKArgs rope = sam3::rope_args(a, w.ndim() == 2 ? w.shape()[0] : 0, heads, window,
                                                img_h, img_w, grid_h, grid_w, rope_scale, rope_theta);
  sam3::gemm_ln<sam3::Epi::kLnRopeQK>(a, stats, w, c, b, eps, out, &rope);
}
#elif SAM3_GEMM_PART == 7
void gemm_nk_lnfold_gelu(TensorView a, TensorView stats, TensorView w, TensorView c, TensorView b,
                         double eps, TensorView out) {
  sam3::gemm_ln<sam3::Epi::kLnGelu>(a, stats, w, c, b, eps, out);
}
#endif
}  // namespace

#if SAM3_GEMM_PART == 0
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk, gemm_nk);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_set_tile, set_tile);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_set_split, set_split);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_residual, gemm_nk_residual);
#elif SAM3_GEMM_PART == 1
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias, gemm_nk_bias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias_residual, gemm_nk_bias_residual);
#elif SAM3_GEMM_PART == 2
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias_gelu, gemm_nk_bias_gelu);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias_relu, gemm_nk_bias_relu);
#elif SAM3_GEMM_PART == 3
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_kn, gemm_kn);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_kn_bias, gemm_kn_bias);
#elif SAM3_GEMM_PART == 4
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias_rope_qk, gemm_nk_bias_rope_qk);
#elif SAM3_GEMM_PART == 5
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_bias_residual_stats, gemm_nk_bias_residual_stats);
#elif SAM3_GEMM_PART == 6
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_lnfold_rope_qk, gemm_nk_lnfold_rope_qk);
#elif SAM3_GEMM_PART == 7
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_gemm_nk_lnfold_gelu, gemm_nk_lnfold_gelu);
#endif
