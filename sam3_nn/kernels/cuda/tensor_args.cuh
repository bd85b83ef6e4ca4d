// Argument checks and the scratch buffer shared by the CUTLASS entry points
// (gemm_sm90.cu, conv_sm90.cu).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include "pdl.cuh"

namespace sam3_cuda {

using tvm::ffi::TensorView;

inline void* ptr(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// float16, on CUDA, contiguous, 16-byte aligned: what the TMA kernels assume
inline void check(const TensorView& t, const char* what) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 16)
    TVM_FFI_THROW(TypeError) << what << " must be float16";
  if (t.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << what << " must be on CUDA";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << what << " must be contiguous";
  if (reinterpret_cast<uintptr_t>(ptr(t)) % 16 != 0)
    TVM_FFI_THROW(ValueError) << what << " must be 16-byte aligned";
}

// One growing scratch buffer per device for CUTLASS's workspace (kernels on one stream
// use it one after another). A buffer that is outgrown is kept, not freed: a CUDA graph
// captured earlier may still point at it. It cannot grow while a stream is being
// captured (cudaMalloc is not capturable); TVM runs every function once uncaptured before
// capturing it, so the sizes a graph needs are allocated by then.
inline void* workspace(size_t bytes, int device, cudaStream_t stream) {
  static std::mutex mu;
  static void* bufs[64] = {};
  static size_t sizes[64] = {};
  if (bytes == 0) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) TVM_FFI_THROW(RuntimeError) << "bad device " << device;
  if (sizes[device] < bytes) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &capturing);
    if (capturing != cudaStreamCaptureStatusNone)
      TVM_FFI_THROW(RuntimeError) << "CUTLASS workspace of " << bytes
                                  << " bytes needed while capturing a CUDA graph; run the "
                                     "function once without capture first";
    bytes = bytes < (size_t(4) << 20) ? (size_t(4) << 20) : bytes;  // few regrowths
    void* buf = nullptr;
    if (cudaMalloc(&buf, bytes) != cudaSuccess)
      TVM_FFI_THROW(RuntimeError) << "cudaMalloc of " << bytes << " bytes of CUTLASS workspace failed";
    bufs[device] = buf;  // the old buffer stays allocated (see above)
    sizes[device] = bytes;
  }
  return bufs[device];
}

// Multiprocessors of `device` (cached; 132 if the query fails).
inline int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    counts[device] = n > 0 ? n : 132;
  }
  return counts[device];
}

// Check, initialise (workspace from `workspace`) and launch a CUTLASS device operator;
// `what` names the problem in the error messages. `kPdl`: launch it as a programmatic
// dependent (pdl.cuh), for kernels built with CUTLASS_ENABLE_GDC_FOR_SM90 that wait on
// the previous grid (the sm90 GEMMs; not the conv kernels, which have no wait).
template <class Op, bool kPdl = false>
void run_cutlass(const typename Op::Arguments& args, int device, cudaStream_t stream,
                 const std::string& what) {
  Op op;
  auto st = op.can_implement(args);
  if (st != decltype(st)::kSuccess)
    TVM_FFI_THROW(RuntimeError) << "CUTLASS " << what << " cannot run: " << cutlassGetStatusString(st);
  void* ws = workspace(Op::get_workspace_size(args), device, stream);
  st = op.initialize(args, ws, stream);
  if (st != decltype(st)::kSuccess)
    TVM_FFI_THROW(RuntimeError) << "CUTLASS " << what << " init failed: " << cutlassGetStatusString(st);
  if constexpr (kPdl)
    st = op.run(stream, nullptr, pdl_on(device));
  else
    st = op.run(stream);
  cudaError_t e = cudaGetLastError();
  if (st != decltype(st)::kSuccess || e != cudaSuccess)
    TVM_FFI_THROW(RuntimeError) << "CUTLASS " << what << " launch failed: " << cutlassGetStatusString(st)
                                << " / " << cudaGetErrorString(e);
}

}  // namespace sam3_cuda
