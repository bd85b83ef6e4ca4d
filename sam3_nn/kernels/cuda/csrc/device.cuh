// Device queries and scratch buffers shared by the hand-written kernels' launchers; plain
// CUDA runtime, no tvm-ffi (the standalone attention build includes it too).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

#include <mutex>

namespace sam3_cuda {

// Multiprocessors of `device` (cached; 132 if the query fails).
inline int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cudaGetLastError();  // clear a failed query
    counts[device] = n > 0 ? n : 132;
  }
  return counts[device];
}

// What a scratch buffer is for: each kind has its own buffer per device.
enum ScratchKind { kCutlassWorkspace = 0, kAttentionSplits = 1, kScratchKinds = 2 };

// One growing scratch buffer per (kind, device), for kernels that use it one after another
// on one stream; at least `min_bytes` are allocated when it grows, for few regrowths. A
// buffer that is outgrown is kept, not freed: a CUDA graph captured earlier may still point
// at it. It cannot grow while `stream` is being captured (cudaMalloc is not capturable; TVM
// runs every function once uncaptured before capturing it, so the sizes a graph needs are
// allocated by then). Returns nullptr, with the reason in `*why`, where it cannot grow.
inline void* scratch(ScratchKind kind, size_t bytes, int device, cudaStream_t stream,
                     size_t min_bytes, const char** why) {
  static std::mutex mu;
  static void* bufs[kScratchKinds][64] = {};
  static size_t sizes[kScratchKinds][64] = {};
  if (bytes == 0) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) {
    *why = "device index out of range";
    return nullptr;
  }
  if (sizes[kind][device] < bytes) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &capturing);
    if (capturing != cudaStreamCaptureStatusNone) {
      *why = "needed while capturing a CUDA graph; run the function once without capture first";
      return nullptr;
    }
    bytes = bytes < min_bytes ? min_bytes : bytes;
    void* buf = nullptr;
    if (cudaMalloc(&buf, bytes) != cudaSuccess) {
      cudaGetLastError();
      *why = "cudaMalloc failed";
      return nullptr;
    }
    bufs[kind][device] = buf;  // the old buffer stays allocated (see above)
    sizes[kind][device] = bytes;
  }
  return bufs[kind][device];
}

}  // namespace sam3_cuda
