// SAM 3's 2D axial RoPE factors, shared by the attention kernels' cos/sin tables
// (attention.cu) and the qkv GEMM's RoPE epilogue (gemm_sm90.cu), so that both rotate with
// the same float32 values: (cos, sin) of coordinate c times frequency i of a head of
// dimension d, f[i] = 1 / theta ** (2 i / (d / 2)) (the reference's order of operations).
#pragma once

#include <cuda_runtime.h>

namespace sam3_cuda {

__device__ __forceinline__ float2 rope_cos_sin(int c, int i, int head_dim, float scale, float theta) {
  const float inv = 1.0f / powf(theta, float(2 * i) / float(head_dim / 2));
  float sn, cs;
  sincosf((float(c) * scale) * inv, &sn, &cs);
  return make_float2(cs, sn);
}

}  // namespace sam3_cuda
