// Programmatic dependent launch (PDL, Hopper and newer) for the hand-written kernels.
//
// A kernel launched with `launch` below may be scheduled while the kernel before it on the
// stream is still finishing its last blocks, so its launch latency and prologue overlap
// that tail (in a CUDA graph too: stream capture records the programmatic edge). The
// contract for every kernel launched this way: call `pdl_wait_then_release()` before its
// first global memory access. The wait returns once the previous kernel has completed and
// its writes are visible (so reads see its results and writes cannot race its reads of a
// reused buffer); the release then lets the next PDL-launched kernel be scheduled as this
// one's blocks drain. Without the launch attribute (older GPUs, built with SAM3_NO_PDL) both are
// no-ops. The CUTLASS GEMMs do the same with CUTLASS_ENABLE_GDC_FOR_SM90 and
// `run(..., launch_with_pdl)`; the CUTLASS conv kernels have no wait and launch plainly.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace sam3_cuda {

__device__ __forceinline__ void pdl_wait_then_release() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launches on `device` carry the PDL attribute: compute capability >= 9.0, unless the
// library was built without PDL (the build option, defined as SAM3_NO_PDL).
inline bool pdl_on(int device) {
#ifdef SAM3_NO_PDL
  (void)device;
  return false;
#endif
  static int state[64];
  if (device < 0 || device >= 64) return false;
  if (state[device] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaGetLastError();
    state[device] = major >= 9 ? 1 : 2;
  }
  return state[device] == 1;
}

// kern<<<grid, block, smem, stream>>>(args...), with the PDL attribute where `pdl_on`.
template <class... KArgs, class... Args>
cudaError_t launch(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess && pdl_on(device)) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kern, std::forward<Args>(args)...);
}

}  // namespace sam3_cuda
