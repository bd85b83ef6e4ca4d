// fp16 2-D convolution (fprop) for Hopper (sm_90a): CUTLASS 3.x implicit GEMM, the
// activation tile gathered by TMA in im2col mode, wgmma, warp-specialized (one producer,
// one consumer warpgroup; CUTLASS 4.2 has no persistent sm90 conv schedule).
//
//   out[b, p, q, k] = bias[k] + sum_{r, s, c} x[b, p + r - pad, q + s - pad, c] * w[k, r, s, c]
//
// stride 1, dilation 1, symmetric zero padding, channel-last tensors:
//   x [B, H, W, C], w [K, R, S, C] (OHWI: the rewrite permutes the OIHW parameter),
//   bias [K], out [B, H*W, K] (or [B, H, W, K]); C and K multiples of 8.
// Entry points (DPS: out is last):
//   sam3_cutlass_conv2d(x, w, out)  sam3_cutlass_conv2d_bias(x, w, bias, out)
// (the padding is the one that gives out's spatial size: (R - 1) / 2 for the model's
// "same" convolutions)
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "tensor_args.cuh"
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

using namespace cute;
using tvm::ffi::TensorView;

namespace sam3_conv {

using half = cutlass::half_t;
constexpr auto kFprop = cutlass::conv::Operator::kFprop;

template <bool kBias>
struct Conv {
  using Layout = cutlass::layout::TensorNHWC;
  using Tile = Shape<_128, _128, Shape<_64>>;
  using Cluster = Shape<_1, _1, _1>;
  using Fusion = cute::conditional_t<
      kBias, cutlass::epilogue::fusion::LinCombPerColBias<half, float, half, half, float>,
      cutlass::epilogue::fusion::LinearCombination<half, float, half, float>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, half, Layout, 8, half, Layout, 8,
      cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kFprop, half, Layout, 8, half, Layout, 8,
      float, Tile, Cluster,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<kFprop, Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue, void>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

using sam3_cuda::check;
using sam3_cuda::ptr;

template <bool kBias>
void conv(TensorView x, TensorView w, const TensorView* bias, TensorView out) {
  using C = Conv<kBias>;
  using Op = typename C::Op;
  using Kernel = typename C::Kernel;
  check(x, "x");
  check(w, "w");
  check(out, "out");
  if (bias) check(*bias, "bias");
  if (x.ndim() != 4 || w.ndim() != 4) TVM_FFI_THROW(ValueError) << "x and w must be 4-D";
  int n = int(x.shape()[0]), h = int(x.shape()[1]), wd = int(x.shape()[2]), c = int(x.shape()[3]);
  int k = int(w.shape()[0]), r = int(w.shape()[1]), s = int(w.shape()[2]);
  if (w.shape()[3] != c) TVM_FFI_THROW(ValueError) << "w must be [K, R, S, C]";
  int pad = -1;
  for (int t = 0; t <= r && pad < 0; ++t)
    if (out.numel() == int64_t(n) * (h + 2 * t - r + 1) * (wd + 2 * t - s + 1) * k) pad = t;
  if (pad < 0) TVM_FFI_THROW(ValueError) << "output size matches no padding";
  if (bias && bias->numel() != k) TVM_FFI_THROW(ValueError) << "bias must have K elements";
  if (c % 8 || k % 8) TVM_FFI_THROW(ValueError) << "C and K must be multiples of 8";
  if (n == 0) return;
  int dev = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));

  using Problem = typename C::Problem;
  Problem problem(cutlass::conv::Mode::kCrossCorrelation, {n, h, wd, c}, {k, r, s, c},
                  {int(pad), int(pad)}, {int(pad), int(pad)}, {1, 1}, {1, 1}, 1);
  typename Kernel::StrideC sc{};
  typename Kernel::StrideD sd{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(sc) = problem.stride_C[Problem::RankT - 2 - i];
  });
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(sd) = problem.stride_C[Problem::RankT - 2 - i];
  });
  typename Op::Arguments args{};
  args.problem_shape = problem;
  args.mainloop.ptr_A = static_cast<const half*>(ptr(x));
  args.mainloop.ptr_B = static_cast<const half*>(ptr(w));
  args.epilogue.ptr_C = static_cast<const half*>(ptr(out));  // beta = 0: never read
  args.epilogue.dC = sc;
  args.epilogue.ptr_D = static_cast<half*>(ptr(out));
  args.epilogue.dD = sd;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  if constexpr (kBias) args.epilogue.thread.bias_ptr = static_cast<const half*>(ptr(*bias));
  args.hw_info.device_id = dev;
  args.hw_info.sm_count = sam3_cuda::sm_count(dev);
  sam3_cuda::run_cutlass<Op>(args, dev, stream,
                             "conv " + std::to_string(n) + "x" + std::to_string(h) + "x" +
                                 std::to_string(wd) + "x" + std::to_string(c) + " -> " +
                                 std::to_string(k));
}

}  // namespace sam3_conv

namespace {
void conv2d(TensorView x, TensorView w, TensorView out) { sam3_conv::conv<false>(x, w, nullptr, out); }
void conv2d_bias(TensorView x, TensorView w, TensorView b, TensorView out) {
  sam3_conv::conv<true>(x, w, &b, out);
}
}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_conv2d, conv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cutlass_conv2d_bias, conv2d_bias);
