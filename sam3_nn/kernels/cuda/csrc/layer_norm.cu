// LayerNorm over the last axis of float16 activations, for CUDA (sm_70+).
//
// CUDA source because TVM's legalized layer_norm, scheduled by dlight, runs well below memory
// bandwidth on the ViT's [5184, 1024] rows (docs/kernels.md, "LayerNorm on CUDA"); this
// kernel reads each row once into registers and writes it once, with 16-byte accesses.
//
//   out[r, c] = (x[r, c] - mean_r) / sqrt(var_r + eps) * gamma[c] + beta[c]
//   mean_r = sum_c x[r, c] / C,   var_r = sum_c (x[r, c] - mean_r)^2 / C   (biased, as torch)
//
// * x, out: [..., C] float16, contiguous (the leading dims are the rows); gamma, beta: [C]
//   float16; all 16-byte aligned; C a multiple of 8 in [8, kMaxC].
// * One warp per row: lane l holds the row's 16-byte chunks l, l + 32, l + 64, ... in
//   registers (V chunks per lane, a template parameter: V = ceil(C / 256), rounded up to an
//   instantiated value; chunks past the row end are masked). Statistics in fp32, two
//   passes over the registers (the mean, then the squared deviations from it: no
//   cancellation as with E[x^2] - mean^2), each a warp-shuffle reduction.
// * No shared memory, no allocation, no synchronization: capturable in a CUDA graph.
//   Launched on the stream tvm-ffi has for the device (TVMFFIEnvGetStream), like TVM's
//   own kernels.
//
// Entry point (tvm-ffi, destination-passing style as Relax's call_dps_packed calls it):
//   sam3_cuda_layer_norm(x, gamma, beta, eps: float64, out)

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "tensor_args.cuh"

namespace sam3_ln {
namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 8;         // halves per 16-byte chunk
constexpr int kRowsPerBlock = 4;  // one warp per row
constexpr int kMaxChunksPerLane = 16;
constexpr int64_t kMaxC = int64_t(kMaxChunksPerLane) * kWarp * kChunk;  // 4096

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void unpack(const uint4& u, float f[kChunk]) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < kChunk / 2; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 pack(const float f[kChunk]) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int i = 0; i < kChunk / 2; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

// Blocks per SM asked of the register allocator: for rows of up to 1024 elements (V <= 4),
// <= 48 registers, so that 10 blocks (40 warps) fit per SM and the ViT's [5184, 1024] (1296
// blocks) runs in one wave on 132 SMs (53 registers would fit 9: a second, tail wave of 108
// blocks). Larger rows keep all of theirs in registers.
constexpr int min_blocks(int v) { return v <= 4 ? 10 : 1; }

// x, out: rows x chunks 16-byte chunks; gamma, beta: chunks chunks.
template <int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, min_blocks(V))
    layer_norm_rows(const uint4* __restrict__ x, const uint4* __restrict__ gamma,
                    const uint4* __restrict__ beta, uint4* __restrict__ out, int64_t rows,
                    int chunks, float inv_c, float eps) {
  sam3_cuda::pdl_wait_then_release();
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // a whole warp: the shuffles below see full warps only
  const uint4* xr = x + row * chunks;
  uint4 v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = lane + i * kWarp;
    v[i] = c < chunks ? xr[c] : make_uint4(0, 0, 0, 0);  // zeros add nothing to the sum
  }
  float f[kChunk];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    unpack(v[i], f);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) sum += f[j];
  }
  const float mean = warp_sum(sum) * inv_c;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (lane + i * kWarp < chunks) {
      unpack(v[i], f);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) sq += (f[j] - mean) * (f[j] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) * inv_c + eps);
  uint4* orow = out + row * chunks;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = lane + i * kWarp;
    if (c < chunks) {
      float g[kChunk], b[kChunk];
      unpack(__ldg(gamma + c), g);
      unpack(__ldg(beta + c), b);
      unpack(v[i], f);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) f[j] = (f[j] - mean) * rstd * g[j] + b[j];
      orow[c] = pack(f);
    }
  }
}

template <int V>
cudaError_t launch_v(const void* x, const void* gamma, const void* beta, void* out, int64_t rows,
                     int64_t c, float eps, cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  cudaError_t err = sam3_cuda::launch(
      layer_norm_rows<V>, dim3(unsigned(blocks)), dim3(kRowsPerBlock * kWarp), 0, stream,
      static_cast<const uint4*>(x), static_cast<const uint4*>(gamma),
      static_cast<const uint4*>(beta), static_cast<uint4*>(out), rows, int(c / kChunk),
      1.0f / float(c), eps);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

// The instantiation with the fewest chunks per lane that holds a row of c elements
// (c % 8 == 0, 8 <= c <= kMaxC; rows > 0, rows / kRowsPerBlock < 2^31: checked by the caller).
cudaError_t launch(const void* x, const void* gamma, const void* beta, void* out, int64_t rows,
                   int64_t c, float eps, cudaStream_t stream) {
  const int64_t per_lane = (c / kChunk + kWarp - 1) / kWarp;
  if (per_lane <= 1) return launch_v<1>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 2) return launch_v<2>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 3) return launch_v<3>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 4) return launch_v<4>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 6) return launch_v<6>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 8) return launch_v<8>(x, gamma, beta, out, rows, c, eps, stream);
  if (per_lane <= 12) return launch_v<12>(x, gamma, beta, out, rows, c, eps, stream);
  return launch_v<kMaxChunksPerLane>(x, gamma, beta, out, rows, c, eps, stream);
}

}  // namespace

namespace ffi {

using tvm::ffi::TensorView;

void layer_norm(TensorView x, TensorView gamma, TensorView beta, double eps, TensorView out) {
  sam3_cuda::check(x, "sam3 layer norm: x");
  sam3_cuda::check(gamma, "sam3 layer norm: gamma");
  sam3_cuda::check(beta, "sam3 layer norm: beta");
  sam3_cuda::check(out, "sam3 layer norm: out");
  if (x.ndim() < 1) TVM_FFI_THROW(ValueError) << "sam3 layer norm: x must have at least one axis";
  const int64_t c = x.shape()[x.ndim() - 1];
  if (c % kChunk != 0 || c < kChunk || c > kMaxC)
    TVM_FFI_THROW(ValueError) << "sam3 layer norm: the last axis (" << c
                              << ") must be a multiple of 8 in [8, " << kMaxC << "]";
  if (gamma.ndim() != 1 || gamma.shape()[0] != c || beta.ndim() != 1 || beta.shape()[0] != c)
    TVM_FFI_THROW(ValueError) << "sam3 layer norm: gamma and beta must be [" << c << "]";
  bool same = out.ndim() == x.ndim();
  for (int i = 0; same && i < x.ndim(); ++i) same = out.shape()[i] == x.shape()[i];
  if (!same) TVM_FFI_THROW(ValueError) << "sam3 layer norm: out must have x's shape";
  const int dev = x.device().device_id;
  if (gamma.device().device_id != dev || beta.device().device_id != dev ||
      out.device().device_id != dev)
    TVM_FFI_THROW(ValueError) << "sam3 layer norm: x, gamma, beta and out must be on one device";
  if (!(eps >= 0.0)) TVM_FFI_THROW(ValueError) << "sam3 layer norm: eps must be >= 0, not " << eps;
  const int64_t rows = x.numel() / c;
  if (rows == 0) return;
  if ((rows + kRowsPerBlock - 1) / kRowsPerBlock > INT_MAX)
    TVM_FFI_THROW(ValueError) << "sam3 layer norm: too many rows (" << rows << ")";
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const cudaError_t err = launch(sam3_cuda::ptr(x), sam3_cuda::ptr(gamma), sam3_cuda::ptr(beta),
                                 sam3_cuda::ptr(out), rows, c, float(eps), stream);
  if (err != cudaSuccess)
    TVM_FFI_THROW(RuntimeError) << "sam3 layer norm (" << rows << " rows of " << c
                                << "): " << cudaGetErrorString(err);
}

}  // namespace ffi
}  // namespace sam3_ln

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cuda_layer_norm, sam3_ln::ffi::layer_norm);
