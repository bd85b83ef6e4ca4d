// LayerNorm folded into the GEMMs around it (included by gemm_sm90.cu), and the base of the
// argument-only epilogue nodes (ArgsOnlyNode, also under gemm_sm90.cu's Sm90RopeQK).
//
// A ViT block's LayerNorms sit between a residual GEMM (o_proj or fc2: x = A W^T + b + r) and a
// linear layer (qkv or fc1). With W' = W diag(gamma), c[n] = sum_k W'[n, k] and
// b'[n] = b[n] + sum_k W[n, k] beta[k] (weight-only terms, computed once when weights are
// bound), the linear of the normalized rows is
//
//   LN(x) W^T + b = rstd * (x W'^T - mean * c) + b',   mean, rstd: x's row statistics,
//
// so the linear can read x itself and apply the statistics in its epilogue (Sm90LnApply),
// and the residual GEMM, which holds x's rows in registers anyway, emits them
// (Sm90RowStats): no LayerNorm kernel, and no normalized copy of x written and read back.
//
// Statistics layout: stats[row, part] = (sum, sum of squares) of the fp16-rounded x over one
// 128-column tile of the producer (float2, [M, parts], parts = ceil(N / 128)); the consumer
// adds the parts of a row.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"

namespace sam3 {

namespace fus = cutlass::epilogue::fusion;

// The parts of an epilogue-visitor node that only carries its arguments: no workspace, no
// loads by the producer warp, no source (C) read. A node adds can_implement, its
// constructors and its consumer callbacks (and a SharedStorage of its own if it needs one).
template <class Args>
struct ArgsOnlyNode {
  struct SharedStorage {};
  using Arguments = Args;
  using Params = Args;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... A>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fus::detail::ProducerLoadArgs<A...> const&) {
    return fus::detail::EmptyProducerLoadCallbacks{};
  }
};

struct RowStatsArgs {
  float2* stats = nullptr;  // [M, parts] of the launch's first row
  int parts = 0;            // column tiles of the whole GEMM (its N / the tile's N)
};

// ColReduction-style partition of a per-row value: (CPY, CPY_M, CPY_N, EPI_M, EPI_N) registers
// with stride 0 along N (one register per row the thread holds), as Sm90ColReduction and
// Sm90ColBroadcast lay out theirs
template <bool ReferenceSrc, class Element = float, class Args>
CUTLASS_DEVICE auto row_registers(Args const& args) {
  using namespace cute;
  auto [M, N, K, L] = args.problem_shape_mnkl;
  auto [m, n, k, l] = args.tile_coord_mnkl;
  Tensor mRow = make_tensor(make_gmem_ptr<float>(nullptr), make_shape(M, N, L), Stride<_1, _0, _0>{});
  Tensor gRow = local_tile(mRow, take<0, 2>(args.tile_shape_mnk), make_coord(m, n, _));
  Tensor tCgRow = fus::detail::sm90_partition_for_epilogue<ReferenceSrc>(gRow(_, _, l), args.epi_tile,
                                                                        args.tiled_copy, args.thread_idx);
  return make_tensor_like<Element>(tCgRow);
}

// The lanes' layout over an epilogue subtile and this lane's (m, n) in it, as Sm90ColReduction
// finds them; a row's values must sit in one warp (one warp along N), as they do in the wgmma
// accumulator layouts of our configs
template <bool ReferenceSrc, class Args>
CUTLASS_DEVICE auto lane_layout(Args const& args) {
  using namespace cute;
  Layout ref_layout_MN = [&]() {
    auto mn_shape = shape(typename decltype(args.tiled_copy)::Tiler_MN{});
    if constexpr (ReferenceSrc) {
      return right_inverse(args.tiled_copy.get_layoutS_TV()).with_shape(mn_shape);
    } else {
      return right_inverse(args.tiled_copy.get_layoutD_TV()).with_shape(mn_shape);
    }
  }();
  using _W = Int<decltype(args.tiled_copy)::TiledNumThr::value / cutlass::NumThreadsPerWarp>;
  Layout tv2lane = Layout<Shape<Int<cutlass::NumThreadsPerWarp>, _W, _1>, Stride<_1, _0, _0>>{};
  Layout ref2lane = composition(tv2lane, ref_layout_MN);
  Layout lane_layout_MN = make_layout(filter(get<0>(ref2lane)), filter(get<1>(ref2lane)));
  Layout inv_lane_layout_MN = right_inverse(lane_layout_MN);
  auto lane_mn = idx2crd(inv_lane_layout_MN(cutlass::canonical_lane_idx()), shape(lane_layout_MN));
  Layout tv2warp = Layout<Shape<Int<cutlass::NumThreadsPerWarp>, _W, _1>, Stride<_0, _1, _0>>{};
  Layout ref2warp = composition(tv2warp, ref_layout_MN);
  Layout warp_layout_MN = make_layout(filter(get<0>(ref2warp)), filter(get<1>(ref2warp)));
  static_assert(decltype(size<1>(warp_layout_MN))::value == 1, "row statistics need one warp along N");
  return cute::make_tuple(lane_layout_MN, lane_mn);
}

// The residual GEMM's top node: rounds x = its child's value to fp16 (the stored output) and
// accumulates each row's sum and sum of squares of the rounded values over the tile; after the
// tile's last subtile the lanes holding a row add theirs (shuffles) and one writes the part.
struct Sm90RowStats : ArgsOnlyNode<RowStatsArgs> {
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.stats != nullptr && args.parts > 0;
  }

  CUTLASS_HOST_DEVICE Sm90RowStats() {}
  CUTLASS_HOST_DEVICE Sm90RowStats(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  template <class RTensor, class CTensor, class Residue, class LaneLayout, class LaneMN>
  struct ConsumerStoreCallbacks : fus::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(RTensor s, RTensor q, CTensor c, Residue res, LaneLayout ll,
                                          LaneMN lmn, int m_base_, int n_tile_, int m_, Params const& p)
        : sum(s), sq(q), tCcD(c), residue(res), lane_layout_MN(ll), lane_mn(lmn), m_base(m_base_),
          n_tile(n_tile_), M(m_), params(p) {}
    RTensor sum, sq;  // per row (stride 0 along N)
    CTensor tCcD;     // coordinates relative to the thread's first element
    Residue residue;  // (M, N) minus that element's coordinates
    LaneLayout lane_layout_MN;
    LaneMN lane_mn;
    int m_base, n_tile, M;
    Params const& params;

    template <class ElementAccumulator, class ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<cutlass::half_t, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& x) {
      using namespace cute;
      auto out = cutlass::NumericArrayConverter<cutlass::half_t, ElementInput, FragmentSize>{}(x);
      Tensor s = sum(_, _, _, epi_m, epi_n);
      Tensor q = sq(_, _, _, epi_m, epi_n);
      Tensor c = tCcD(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        if (elem_less(c(epi_v * FragmentSize + i), residue)) {
          const float v = float(out[i]);
          s(epi_v * FragmentSize + i) += v;
          q(epi_v * FragmentSize + i) = fmaf(v, v, q(epi_v * FragmentSize + i));
        }
      }
      return out;
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&&, SyncFn const&, int, int, bool is_last_iteration, VTensor) {
      using namespace cute;
      if (!is_last_iteration) return;
      Tensor fs = filter_zeros(sum);
      Tensor fq = filter_zeros(sq);
      Tensor fc = filter_zeros(tCcD, sum.stride());
      // the lanes holding one row: shuffle-add along the lane layout's N mode
      CUTLASS_PRAGMA_UNROLL
      for (int cols = size<1>(lane_layout_MN) / 2; cols > 0; cols /= 2) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(fs); ++i) {
          fs(i) += __shfl_down_sync(0xFFFFFFFF, fs(i), lane_layout_MN(_0{}, cols));
          fq(i) += __shfl_down_sync(0xFFFFFFFF, fq(i), lane_layout_MN(_0{}, cols));
        }
      }
      if (get<1>(lane_mn) != 0) return;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(fs); ++i) {
        const int row = m_base + int(get<0>(fc(i)));
        if (row < M) params.stats[int64_t(row) * params.parts + n_tile] = make_float2(fs(i), fq(i));
      }
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fus::detail::ConsumerStoreArgs<Args...> const& args) {
    using namespace cute;
    auto [lane_layout_MN, lane_mn] = lane_layout<ReferenceSrc>(args);
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    auto s = row_registers<ReferenceSrc>(args);
    auto q = row_registers<ReferenceSrc>(args);
    fill(s, 0.0f);
    fill(q, 0.0f);
    const int m_base = int(M) - int(get<0>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(s), decltype(args.tCcD), decltype(args.residue_tCcD),
                                  decltype(lane_layout_MN), decltype(lane_mn)>(
        s, q, args.tCcD, args.residue_tCcD, lane_layout_MN, lane_mn, m_base, int(n), int(M), params);
  }
};

constexpr int kMaxLnParts = 8;  // statistics parts a consumer reads per row: widths up to 1024

struct LnApplyArgs {
  const float2* stats = nullptr;  // [M, parts] (Sm90RowStats)
  int parts = 0;                  // even (16-byte loads), at most kMaxLnParts
  float inv_width = 1.0f;         // 1 / the normalized width (the GEMM's K)
  float eps = 1e-6f;
};

// y = rstd * (acc - mean * c) + b' from its children (acc, c[col], b'[col]), mean and rstd of
// each of the thread's rows computed from the parts when the tile's epilogue begins
// (fp32: var = E[x^2] - mean^2, clamped at 0)
struct Sm90LnApply : ArgsOnlyNode<LnApplyArgs> {
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.stats != nullptr && args.parts > 0 && args.parts % 2 == 0 && args.parts <= kMaxLnParts;
  }

  CUTLASS_HOST_DEVICE Sm90LnApply() {}
  CUTLASS_HOST_DEVICE Sm90LnApply(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  template <class RTensor, class CTensor, class LaneLayout>
  struct ConsumerStoreCallbacks : fus::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(RTensor r, RTensor nm, CTensor c, LaneLayout ll, int lane_n_,
                                          int m_base_, int m_, Params const& p)
        : rstd(r), neg_mean_rstd(nm), tCcD(c), lane_layout_MN(ll), lane_n(lane_n_), m_base(m_base_),
          M(m_), params(p) {}
    RTensor rstd, neg_mean_rstd;  // per row (stride 0 along N)
    CTensor tCcD;
    LaneLayout lane_layout_MN;    // the lanes over the subtile (lane_n: this lane's N index)
    int lane_n, m_base, M;
    Params const& params;

    // The kLanes lanes holding a row split its parts (lane n reads parts n, n + kLanes, ..., one
    // 8-byte load each) and add them with xor shuffles; all loads of the tile's rows are issued
    // before the first is used (static trip counts): one round trip to L2 per tile, and few
    // registers in the epilogue, which runs beside the other warpgroup's mainloop.
    CUTLASS_DEVICE void begin() {
      using namespace cute;
      Tensor fr = filter_zeros(rstd);
      Tensor fn = filter_zeros(neg_mean_rstd);
      Tensor fc = filter_zeros(tCcD, rstd.stride());
      constexpr int kRows = decltype(size(fr))::value;
      constexpr int kLanes = decltype(size<1>(LaneLayout{}))::value;
      static_assert(kLanes > 0 && (kLanes & (kLanes - 1)) == 0, "lanes per row: a power of two");
      constexpr int kLoads = (kMaxLnParts + kLanes - 1) / kLanes;
      float2 v[kRows][kLoads];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int row = m_base + int(get<0>(fc(i)));
        const float2* p = params.stats + int64_t(row) * params.parts;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kLoads; ++j) {
          const int part = lane_n + j * kLanes;
          v[i][j] = row < M && part < params.parts ? __ldg(p + part) : make_float2(0.f, 0.f);
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        float s = 0.0f, q = 0.0f;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kLoads; ++j) {
          s += v[i][j].x;
          q += v[i][j].y;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int c = 1; c < kLanes; c *= 2) {
          s += __shfl_xor_sync(0xFFFFFFFF, s, lane_layout_MN(_0{}, c));
          q += __shfl_xor_sync(0xFFFFFFFF, q, lane_layout_MN(_0{}, c));
        }
        const float mean = s * params.inv_width;
        const float var = fmaxf(fmaf(q, params.inv_width, -mean * mean), 0.0f);
        const float r = rsqrtf(var + params.eps);
        fr(i) = r;
        fn(i) = -mean * r;
      }
    }

    template <class ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<float, FragmentSize> const& acc, cutlass::Array<float, FragmentSize> const& c,
        cutlass::Array<float, FragmentSize> const& b) {
      using namespace cute;
      Tensor r = rstd(_, _, _, epi_m, epi_n);
      Tensor nm = neg_mean_rstd(_, _, _, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> y;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const int e = epi_v * FragmentSize + i;
        y[i] = fmaf(r(e), acc[i], fmaf(nm(e), c[i], b[i]));
      }
      return y;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fus::detail::ConsumerStoreArgs<Args...> const& args) {
    using namespace cute;
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto r = row_registers<ReferenceSrc>(args);
    auto nm = row_registers<ReferenceSrc>(args);
    auto [lane_layout_MN, lane_mn] = lane_layout<ReferenceSrc>(args);
    const int m_base = int(M) - int(get<0>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(r), decltype(args.tCcD), decltype(lane_layout_MN)>(
        r, nm, args.tCcD, lane_layout_MN, int(get<1>(lane_mn)), m_base, int(M), params);
  }
};

}  // namespace sam3
