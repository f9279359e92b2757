// Small device helpers shared by the .cu files of the CUDA backend.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tutel::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // threads per block of the elementwise kernels
// Grid-stride loops cap the grid here; every loop is correct for any grid size.
constexpr int64_t kMaxBlocks = 65535;

inline unsigned grid_for(int64_t items, int threads = kThreads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// First global index and stride of a grid-stride loop.
__device__ inline int64_t grid_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Butterfly reductions: every lane ends with the result, combined in a fixed order.
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// float4 arithmetic for the vectorised row kernels.
__device__ inline float4 operator*(float g, float4 v) { return make_float4(g * v.x, g * v.y, g * v.z, g * v.w); }
__device__ inline float4 operator+(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ inline float4& operator+=(float4& a, float4 b) {
  a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
  return a;
}
__device__ inline float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

template <typename V>
__device__ inline V zero_of();
template <>
__device__ inline float zero_of<float>() { return 0.f; }
template <>
__device__ inline float4 zero_of<float4>() { return make_float4(0.f, 0.f, 0.f, 0.f); }

__device__ inline float dot_of(float a, float b) { return a * b; }
__device__ inline float dot_of(float4 a, float4 b) { return dot4(a, b); }

// Four bf16 values, in memory order x, y, z, w: stored with one 8-byte access.
struct alignas(8) Bf16x4 {
  uint2 bits;
};

__device__ inline uint32_t bits_of(__nv_bfloat162 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof u);
  return u;
}

__device__ inline Bf16x4 to_bf16x4(float4 v) {
  // __floats2bfloat162_rn(a, b) puts a in the low half, the lower address.
  return {make_uint2(bits_of(__floats2bfloat162_rn(v.x, v.y)), bits_of(__floats2bfloat162_rn(v.z, v.w)))};
}

// The one rounding of every bf16 the kernels write (round to nearest even, as the CPU's
// f32_to_bf16), one value or four at a time.
__device__ inline void store_bf16(__nv_bfloat16* out, int64_t i, float v) { out[i] = __float2bfloat16_rn(v); }
__device__ inline void store_bf16(Bf16x4* out, int64_t i, float4 v) { out[i] = to_bf16x4(v); }

}  // namespace tutel::cuda
