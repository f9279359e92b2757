// Encode/decode and their backward on the GPU: row gathers and scatters through the routing,
// with 16-byte (float4) accesses when the row length and the pointers allow, floats otherwise.
#include <initializer_list>

#include "cuda/cuda_kernels.hpp"
#include "cuda/device_utils.cuh"

namespace tutel::cuda {
namespace {

__device__ inline void store_row_value(float* out, int64_t i, float v) { out[i] = v; }
__device__ inline void store_row_value(float4* out, int64_t i, float4 v) { out[i] = v; }
__device__ inline void store_row_value(__nv_bfloat16* out, int64_t i, float v) { store_bf16(out, i, v); }
__device__ inline void store_row_value(Bf16x4* out, int64_t i, float4 v) { store_bf16(out, i, v); }

// V: float or float4; O: the same, or their bf16 counterparts (__nv_bfloat16, Bf16x4), which
// get the f32 value's rounding.
template <typename V, typename O>
__global__ void scatter_rows_kernel(const V* src, const float* gates, const int32_t* slots, int64_t rows,
                                    int64_t vecs, int k, bool scale, O* out) {
  const int64_t n = rows * vecs;
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const int64_t r = i / vecs, v = i - r * vecs;
    const int32_t a = slots[r];
    V value = zero_of<V>();
    if (a >= 0) {
      value = src[(a / k) * vecs + v];
      if (scale) value = gates[a] * value;
    }
    store_row_value(out, i, value);
  }
}

// Choices are summed in j order, as the CPU.
template <typename V>
__global__ void gather_rows_kernel(const V* rows, const float* gates, const int32_t* expert_index,
                                   const int32_t* location, int64_t S, int k, int64_t C, int64_t vecs,
                                   bool scale, V* out) {
  const int64_t n = S * vecs;
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const int64_t s = i / vecs, v = i - s * vecs;
    V acc = zero_of<V>();
    for (int j = 0; j < k; ++j) {
      const int64_t a = s * k + j;
      const int64_t l = location[a];
      if (l < 0 || l >= C) continue;
      const float g = scale ? gates[a] : 1.f;
      acc += g * rows[(expert_index[a] * C + l) * vecs + v];
    }
    out[i] = acc;
  }
}

// One warp per assignment (s, j).
template <typename V>
__global__ void assignment_dot_kernel(const V* rows, const V* tokens, const int32_t* expert_index,
                                      const int32_t* location, int64_t S, int k, int64_t C, int64_t vecs,
                                      bool accumulate, float* out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const int64_t n = S * k;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize; a < n;
       a += warps) {
    const int64_t l = location[a];
    float acc = 0.f;
    if (l >= 0 && l < C) {
      const V* row = rows + (expert_index[a] * C + l) * vecs;
      const V* token = tokens + (a / k) * vecs;
      for (int64_t v = lane; v < vecs; v += kWarpSize) acc += dot_of(row[v], token[v]);
      acc = warp_sum(acc);
    }
    if (lane == 0) out[a] = accumulate ? out[a] + acc : acc;
  }
}

bool use_float4(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % 4 != 0) return false;
  for (const void* p : pointers)
    if (p && !aligned16(p)) return false;
  return true;
}

}  // namespace

cudaError_t launch_scatter_rows(const float* src, const float* gates, const int32_t* slots, int64_t rows,
                                int64_t width, int k, bool scale, float* out, cudaStream_t stream) {
  if (rows * width <= 0) return cudaSuccess;
  if (use_float4(width, {src, out})) {
    const int64_t vecs = width / 4;
    scatter_rows_kernel<<<grid_for(rows * vecs), kThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(src), gates, slots, rows, vecs, k, scale, reinterpret_cast<float4*>(out));
  } else {
    scatter_rows_kernel<<<grid_for(rows * width), kThreads, 0, stream>>>(src, gates, slots, rows, width, k, scale,
                                                                         out);
  }
  return cudaGetLastError();
}

cudaError_t launch_scatter_rows_to_bf16(const float* src, const float* gates, const int32_t* slots, int64_t rows,
                                        int64_t width, int k, bool scale, void* out, cudaStream_t stream) {
  if (rows * width <= 0) return cudaSuccess;
  // Four values a lane: 16 bytes read, 8 written.
  if (use_float4(width, {src}) && (reinterpret_cast<uintptr_t>(out) & 7u) == 0) {
    const int64_t vecs = width / 4;
    scatter_rows_kernel<<<grid_for(rows * vecs), kThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(src), gates, slots, rows, vecs, k, scale, static_cast<Bf16x4*>(out));
  } else {
    scatter_rows_kernel<<<grid_for(rows * width), kThreads, 0, stream>>>(src, gates, slots, rows, width, k, scale,
                                                                         static_cast<__nv_bfloat16*>(out));
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_rows(const float* rows, const float* gates, const int32_t* expert_index,
                               const int32_t* location, int64_t S, int k, int64_t C, int64_t width, bool scale,
                               float* out, cudaStream_t stream) {
  if (S * width <= 0) return cudaSuccess;
  if (use_float4(width, {rows, out})) {
    const int64_t vecs = width / 4;
    gather_rows_kernel<<<grid_for(S * vecs), kThreads, 0, stream>>>(reinterpret_cast<const float4*>(rows), gates,
                                                                    expert_index, location, S, k, C, vecs, scale,
                                                                    reinterpret_cast<float4*>(out));
  } else {
    gather_rows_kernel<<<grid_for(S * width), kThreads, 0, stream>>>(rows, gates, expert_index, location, S, k, C,
                                                                     width, scale, out);
  }
  return cudaGetLastError();
}

cudaError_t launch_assignment_dot(const float* rows, const float* tokens, const int32_t* expert_index,
                                  const int32_t* location, int64_t S, int k, int64_t C, int64_t width,
                                  bool accumulate, float* out, cudaStream_t stream) {
  const int64_t n = S * k;
  if (n <= 0) return cudaSuccess;
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks > kMaxBlocks ? kMaxBlocks : blocks);
  if (use_float4(width, {rows, tokens})) {
    assignment_dot_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const float4*>(rows),
                                                         reinterpret_cast<const float4*>(tokens), expert_index,
                                                         location, S, k, C, width / 4, accumulate, out);
  } else {
    assignment_dot_kernel<<<grid, kThreads, 0, stream>>>(rows, tokens, expert_index, location, S, k, C, width,
                                                         accumulate, out);
  }
  return cudaGetLastError();
}

}  // namespace tutel::cuda
