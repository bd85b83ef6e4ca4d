// Layout copies of float16 tensors for CUDA (sm_70+): channel-last <-> channel-first
// transposes and swaps of adjacent axes (pixel shuffle, window partition).
//
// CUDA source because TVM legalizes permute_dims to a TIR copy that dlight's fallback
// schedules with one element per thread and no shared memory, far below memory bandwidth
// (docs/kernels.md, "Layout copies on CUDA"). Both transpose directions are the same
// batched 2D transpose, [B, R, S] -> [B, S, R]:
//
//   NHWC -> NCHW (permute_dims axes [0, 3, 1, 2]): R = H * W, S = C
//   NCHW -> NHWC (permute_dims axes [0, 2, 3, 1]): R = C,     S = H * W
//
// * x, out: float16, contiguous, 16-byte aligned; R and S multiples of 8 (16-byte rows on
//   both sides).
// * One 64 x 64 tile per block of 256 threads: each thread loads two 16-byte chunks along S
//   and spreads them over shared memory rows padded to 66 halves (conflict-free 4-byte
//   stores); each then gathers 8 consecutive R values of one S column and writes them as
//   one 16-byte chunk, so both global sides move whole 16-byte chunks, coalesced.
// * No allocation, no synchronization beyond the block: capturable in a CUDA graph. Launched
//   as a programmatic dependent (pdl.cuh) on the stream tvm-ffi has for the device.
//
// Entry points (tvm-ffi, destination-passing style as Relax's call_dps_packed calls them):
//   sam3_cuda_transpose(x, split, out): x [B, d1, ..., dn] viewed as [B, R, S] with
//   R = d1 * ... * d(split-1), S = d(split) * ... * dn; out [B, d(split), ..., dn, d1, ...,
//   d(split-1)].
//   sam3_cuda_swap_axes(x, axis, out): out = x with axes axis, axis + 1 swapped, the axes
//   after them a contiguous block of a multiple of 8 elements (swap_axes_chunks below).

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "tensor_args.cuh"

namespace sam3_tr {
namespace {

constexpr int kTile = 64;           // R and S extent of a tile
constexpr int kPitch = kTile + 2;   // halves per shared-memory row (33 words: no bank conflicts)
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) transpose_tiles(const half* __restrict__ x,
                                                            half* __restrict__ out, int64_t r_len,
                                                            int64_t s_len) {
  __shared__ __align__(16) half tile[kTile * kPitch];
  sam3_cuda::pdl_wait_then_release();
  const int64_t s0 = int64_t(blockIdx.x) * kTile, r0 = int64_t(blockIdx.y) * kTile;
  const int64_t b = blockIdx.z;
  const half* xb = x + b * r_len * s_len;
  half* ob = out + b * r_len * s_len;
  const int tid = threadIdx.x;
  // load: 64 rows x 8 chunks of 8 halves; thread -> (row, chunk), a warp covers 4 rows
#pragma unroll
  for (int it = 0; it < kTile * 8 / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    const int r = idx >> 3, c = idx & 7;
    const int64_t gr = r0 + r, gs = s0 + c * 8;
    if (gr < r_len && gs < s_len) {
      const uint4 v = *reinterpret_cast<const uint4*>(xb + gr * s_len + gs);
      uint32_t* row = reinterpret_cast<uint32_t*>(tile + r * kPitch + c * 8);
      row[0] = v.x;
      row[1] = v.y;
      row[2] = v.z;
      row[3] = v.w;
    }
  }
  __syncthreads();
  // store: 64 output rows (S) x 8 chunks of 8 R values; a warp covers 4 rows of 128 bytes
#pragma unroll
  for (int it = 0; it < kTile * 8 / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    const int s = idx >> 3, c = idx & 7;
    const int64_t gs = s0 + s, gr = r0 + c * 8;
    if (gs < s_len && gr < r_len) {
      __align__(16) half v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = tile[(c * 8 + i) * kPitch + s];
      *reinterpret_cast<uint4*>(ob + gs * r_len + gr) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

// Swap of two adjacent axes above a contiguous inner block: x [A, P, Q, I] -> out [A, Q, P, I]
// with I a multiple of 8 halves; one 16-byte chunk per thread and step, so both sides move
// whole chunks at memory speed. The 2x2 transposed convolutions' pixel shuffle
// ([B, H, W, 2, 2, C] -> [B, H, 2, W, 2, C]: A = B * H, P = W, Q = 2, I = 2 * C) and the
// window partition ([B, nh, ws, nw, ws, C] -> [B, nh, nw, ws, ws, C]) are such swaps.
__global__ void __launch_bounds__(kThreads) swap_axes_chunks(const uint4* __restrict__ x,
                                                             uint4* __restrict__ out, uint32_t p_len,
                                                             uint32_t q_len, uint32_t i_chunks,
                                                             uint32_t total) {
  sam3_cuda::pdl_wait_then_release();
  const uint32_t stride = gridDim.x * kThreads;
  for (uint32_t o = blockIdx.x * kThreads + threadIdx.x; o < total; o += stride) {
    // o = ((a * Q + q) * P + p) * I + i in chunks (the output's order)
    const uint32_t i = o % i_chunks;
    uint32_t t = o / i_chunks;
    const uint32_t p = t % p_len;
    t /= p_len;
    const uint32_t q = t % q_len, a = t / q_len;
    out[o] = x[((a * p_len + p) * q_len + q) * i_chunks + i];
  }
}

}  // namespace

namespace ffi {

using tvm::ffi::TensorView;

void transpose(TensorView x, int64_t split, TensorView out) {
  sam3_cuda::check(x, "sam3 transpose: x");
  sam3_cuda::check(out, "sam3 transpose: out");
  const int nd = x.ndim();
  if (nd < 3 || split < 2 || split >= nd)
    TVM_FFI_THROW(ValueError) << "sam3 transpose: x must have >= 3 axes and 2 <= split < ndim, got "
                              << nd << " axes, split " << split;
  int64_t r_len = 1, s_len = 1;
  for (int i = 1; i < split; ++i) r_len *= x.shape()[i];
  for (int i = int(split); i < nd; ++i) s_len *= x.shape()[i];
  // out: [B, x dims split.., x dims 1..split-1]
  bool same = out.ndim() == nd && out.shape()[0] == x.shape()[0];
  for (int i = int(split), j = 1; same && i < nd; ++i, ++j) same = out.shape()[j] == x.shape()[i];
  for (int i = 1, j = nd - int(split) + 1; same && i < split; ++i, ++j) same = out.shape()[j] == x.shape()[i];
  if (!same) TVM_FFI_THROW(ValueError) << "sam3 transpose: out must be x's axes [0, split.., 1..split)";
  if (r_len % 8 || s_len % 8)
    TVM_FFI_THROW(ValueError) << "sam3 transpose: both sides (" << r_len << " x " << s_len
                              << ") must be multiples of 8";
  if (x.device().device_id != out.device().device_id)
    TVM_FFI_THROW(ValueError) << "sam3 transpose: x and out must be on one device";
  const int64_t batch = x.shape()[0];
  if (batch == 0 || r_len == 0 || s_len == 0) return;
  const int64_t gx = (s_len + kTile - 1) / kTile, gy = (r_len + kTile - 1) / kTile;
  if (gx > INT_MAX || gy > 65535 || batch > 65535)
    TVM_FFI_THROW(ValueError) << "sam3 transpose: too large (" << batch << " x " << r_len << " x "
                              << s_len << ")";
  const int dev = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  cudaError_t err = sam3_cuda::launch(transpose_tiles, dim3(unsigned(gx), unsigned(gy), unsigned(batch)),
                                      dim3(kThreads), 0, stream,
                                      static_cast<const half*>(sam3_cuda::ptr(x)),
                                      static_cast<half*>(sam3_cuda::ptr(out)), r_len, s_len);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    TVM_FFI_THROW(RuntimeError) << "sam3 transpose (" << batch << " x " << r_len << " x " << s_len
                                << "): " << cudaGetErrorString(err);
}

// out = x with axes `axis` and `axis + 1` swapped; the axes after them hold a multiple of 8
// elements (whole 16-byte chunks).
void swap_axes(TensorView x, int64_t axis, TensorView out) {
  sam3_cuda::check(x, "sam3 swap axes: x");
  sam3_cuda::check(out, "sam3 swap axes: out");
  const int nd = x.ndim();
  if (axis < 0 || axis + 2 >= nd)
    TVM_FFI_THROW(ValueError) << "sam3 swap axes: axis " << axis << " and " << axis + 1
                              << " must be followed by at least one axis of " << nd;
  bool same = out.ndim() == nd;
  for (int i = 0; same && i < nd; ++i) {
    const int j = i == axis ? int(axis) + 1 : (i == axis + 1 ? int(axis) : i);
    same = out.shape()[i] == x.shape()[j];
  }
  if (!same) TVM_FFI_THROW(ValueError) << "sam3 swap axes: out must be x with axes " << axis << ", "
                                       << axis + 1 << " swapped";
  int64_t a_len = 1, inner = 1;
  for (int i = 0; i < axis; ++i) a_len *= x.shape()[i];
  for (int i = int(axis) + 2; i < nd; ++i) inner *= x.shape()[i];
  const int64_t p_len = x.shape()[axis], q_len = x.shape()[axis + 1];
  if (inner % 8)
    TVM_FFI_THROW(ValueError) << "sam3 swap axes: the inner block (" << inner
                              << " elements) must be a multiple of 8";
  if (x.device().device_id != out.device().device_id)
    TVM_FFI_THROW(ValueError) << "sam3 swap axes: x and out must be on one device";
  const int64_t total = a_len * p_len * q_len * (inner / 8);
  if (total == 0) return;
  if (total > 0x7fffffffLL)
    TVM_FFI_THROW(ValueError) << "sam3 swap axes: too large (" << total << " chunks)";
  const int dev = x.device().device_id;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = 16LL * sam3_cuda::sm_count(dev);
  if (blocks > cap) blocks = cap;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev));
  cudaError_t err = sam3_cuda::launch(swap_axes_chunks, dim3(unsigned(blocks)), dim3(kThreads), 0, stream,
                                      static_cast<const uint4*>(sam3_cuda::ptr(x)),
                                      static_cast<uint4*>(sam3_cuda::ptr(out)), uint32_t(p_len),
                                      uint32_t(q_len), uint32_t(inner / 8), uint32_t(total));
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    TVM_FFI_THROW(RuntimeError) << "sam3 swap axes (" << a_len << " x " << p_len << " x " << q_len
                                << " x " << inner << "): " << cudaGetErrorString(err);
}

}  // namespace ffi
}  // namespace sam3_tr

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cuda_transpose, sam3_tr::ffi::transpose);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sam3_cuda_swap_axes, sam3_tr::ffi::swap_axes);
