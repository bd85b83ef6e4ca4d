// Argument checks and the CUTLASS launch shared by the CUTLASS entry points
// (gemm_sm90.cu, conv_sm90.cu).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include "device.cuh"
#include "pdl.cuh"

namespace sam3_cuda {

using tvm::ffi::TensorView;

inline void* ptr(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// float16 (or float of `bits` bits), on CUDA, contiguous, 16-byte aligned: what the TMA
// kernels assume
inline void check(const TensorView& t, const char* what, int bits = 16) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != bits)
    TVM_FFI_THROW(TypeError) << what << " must be float" << bits;
  if (t.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << what << " must be on CUDA";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << what << " must be contiguous";
  if (reinterpret_cast<uintptr_t>(ptr(t)) % 16 != 0)
    TVM_FFI_THROW(ValueError) << what << " must be 16-byte aligned";
}

// CUTLASS's workspace: the kCutlassWorkspace scratch buffer (device.cuh), at least 4 MB.
inline void* workspace(size_t bytes, int device, cudaStream_t stream) {
  const char* why = "";
  void* buf = scratch(kCutlassWorkspace, bytes, device, stream, size_t(4) << 20, &why);
  if (buf == nullptr && bytes != 0)
    TVM_FFI_THROW(RuntimeError) << "CUTLASS workspace of " << bytes << " bytes on device " << device
                                << ": " << why;
  return buf;
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
