// The gate on the GPU: noise, fused softmax + top-k + normalisation (one warp per token), the
// GShard loss and the gate's backward through the normalisation, the loss and the softmax.
#include <cmath>

#include "cuda/cuda_kernels.hpp"
#include "cuda/device_utils.cuh"
#include "tutel/kernels/gate_noise.hpp"

namespace tutel::cuda {
namespace {

constexpr int kTokensPerBlock = 4;  // warps per block in the per-token kernels
constexpr int kLossBlock = 256;     // tokens per partial sum of the loss (the CPU's kReduceBlock)

__global__ void gate_noise_kernel(uint64_t seed, uint64_t counter, float scale, float* out, int64_t n) {
  for (int64_t i = grid_index(); i < n; i += grid_stride())
    out[i] = scale * gate_noise_at(seed, counter, static_cast<uint64_t>(i));
}

// Whether (a, ia) ranks before (b, ib): higher score first, the lower expert on ties. NaN ranks
// below every score (scores are >= 0), so a NaN row still yields k distinct experts, 0, 1, ...,
// as the CPU's repeated selection does.
__device__ inline bool ranks_before(float a, int ia, float b, int ib) {
  a = isnan(a) ? -1.f : a;
  b = isnan(b) ? -1.f : b;
  return a > b || (a == b && ia < ib);
}

// One warp per token. Top-k by repeated selection: choice j is the best expert ranking after
// choice j-1, which is the CPU's "best not yet taken" since the ranking is a strict total order.
__global__ void gate_softmax_topk_kernel(float* scores, const float* noise, int64_t S, int E, int k,
                                         bool normalize, int32_t* expert_index, float* gates) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       s < S; s += warps) {
    float* row = scores + s * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarpSize) {
      float v = row[e];
      if (noise) {
        v += noise[s * E + e];
        row[e] = v;
      }
      mx = fmaxf(mx, v);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += kWarpSize) {
      const float v = expf(row[e] - mx);
      row[e] = v;
      sum += v;
    }
    const float inv = 1.f / warp_sum(sum);
    // Each lane rereads only the elements it wrote itself: no cross-lane traffic through memory.
    for (int e = lane; e < E; e += kWarpSize) row[e] *= inv;

    float prev_v = 0.f, total = 0.f;
    int prev_i = -1;
    for (int j = 0; j < k; ++j) {
      float best_v = 0.f;
      int best_i = -1;
      for (int e = lane; e < E; e += kWarpSize) {
        const float v = row[e];
        if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v, e)) continue;
        if (best_i < 0 || ranks_before(v, e, best_v, best_i)) best_v = v, best_i = e;
      }
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, offset);
        const int oi = __shfl_xor_sync(kFullMask, best_i, offset);
        if (oi >= 0 && (best_i < 0 || ranks_before(ov, oi, best_v, best_i))) best_v = ov, best_i = oi;
      }
      if (lane == 0) {
        expert_index[s * k + j] = best_i;
        gates[s * k + j] = best_v;
      }
      total += best_v;
      prev_v = best_v, prev_i = best_i;
    }
    if (normalize && lane == 0) {
      const float denom = fmaxf(total, 1.1920928955078125e-07f);  // FLT_EPSILON, as the CPU
      for (int j = 0; j < k; ++j) gates[s * k + j] /= denom;
    }
  }
}

// Partial column sums of scores over a block of kLossBlock tokens (double, in token order, as
// the CPU), and the top-1 histogram (integer atomics: exact in any order).
__global__ void gate_loss_partial_kernel(const float* scores, const int32_t* expert_index, int64_t S,
                                         int64_t E, int k, double* partial, int32_t* top1) {
  const int64_t block = blockIdx.x;
  const int64_t s0 = block * kLossBlock, s1 = min(S, s0 + kLossBlock);
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    double acc = 0.0;
    for (int64_t s = s0; s < s1; ++s) acc += scores[s * E + e];
    partial[block * E + e] = acc;
  }
  const int64_t s = s0 + threadIdx.x;
  if (s < s1) {
    const int32_t e = expert_index[s * k];
    if (e >= 0 && e < E) atomicAdd(&top1[e], 1);
  }
}

// One block: per expert the blocks are combined in block order; the experts' terms then meet
// in a fixed tree over the block's threads.
__global__ void gate_loss_final_kernel(const double* partial, const int32_t* top1, int64_t blocks, int64_t S,
                                       int64_t E, float* l_aux) {
  __shared__ double terms[kLossBlock];
  double local = 0.0;
  const double tokens = static_cast<double>(S);
  for (int64_t e = threadIdx.x; e < E; e += kLossBlock) {
    double me = 0.0;
    for (int64_t b = 0; b < blocks; ++b) me += partial[b * E + e];
    local += (me / tokens) * (static_cast<double>(top1[e]) / tokens);
  }
  terms[threadIdx.x] = local;
  __syncthreads();
  for (int width = kLossBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) terms[threadIdx.x] += terms[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) l_aux[0] = static_cast<float>(terms[0] * static_cast<double>(E));
}

__global__ void top1_count_kernel(const int32_t* expert_index, int64_t S, int64_t E, int k, int32_t* top1) {
  for (int64_t s = grid_index(); s < S; s += grid_stride()) {
    const int32_t e = expert_index[s * k];
    if (e >= 0 && e < E) atomicAdd(&top1[e], 1);
  }
}

// d l_aux / d scores[s, e] = dl_aux · E · top1[e] / S², evaluated in the CPU's order.
__global__ void aux_grad_kernel(const int32_t* top1, int64_t S, int64_t E, float dl_aux, float* aux_grad) {
  for (int64_t e = grid_index(); e < E; e += grid_stride())
    aux_grad[e] = static_cast<float>(static_cast<double>(dl_aux) * static_cast<double>(E) *
                                     static_cast<double>(top1[e]) /
                                     (static_cast<double>(S) * static_cast<double>(S)));
}

// One warp per token: d = aux_grad + normalisation'(d_gates) at the chosen experts, then
// softmax'. The k chosen experts are distinct, so the lanes adding them never collide.
__global__ void gate_backward_logits_kernel(const float* scores, const int32_t* expert_index,
                                            const float* d_gates, const float* aux_grad, int64_t S, int E,
                                            int k, bool normalized, float* d_logits) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const float eps = 1.1920928955078125e-07f;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       s < S; s += warps) {
    const float* p = scores + s * E;
    float* d = d_logits + s * E;
    const int32_t* ix = expert_index + s * k;
    const float* dg = d_gates + s * k;
    for (int e = lane; e < E; e += kWarpSize) d[e] = aux_grad[e];
    __syncwarp();
    if (normalized) {
      // Every lane sums in j order, as the CPU.
      float total = 0.f, weighted = 0.f;
      for (int j = 0; j < k; ++j) {
        total += p[ix[j]];
        weighted += dg[j] * p[ix[j]];
      }
      const float denom = fmaxf(total, eps);
      const float cross = total >= eps ? weighted / (denom * denom) : 0.f;  // clamped: constant
      for (int j = lane; j < k; j += kWarpSize) d[ix[j]] += dg[j] / denom - cross;
    } else {
      for (int j = lane; j < k; j += kWarpSize) d[ix[j]] += dg[j];
    }
    __syncwarp();  // orders the lanes' writes above before the reads below
    float inner = 0.f;
    for (int e = lane; e < E; e += kWarpSize) inner += d[e] * p[e];
    inner = warp_sum(inner);
    for (int e = lane; e < E; e += kWarpSize) d[e] = p[e] * (d[e] - inner);
    __syncwarp();
  }
}

unsigned warp_grid(int64_t tokens) {
  const int64_t blocks = (tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  return static_cast<unsigned>(blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

cudaError_t launch_gate_noise(uint64_t seed, uint64_t counter, float scale, float* out, int64_t n,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  gate_noise_kernel<<<grid_for(n), kThreads, 0, stream>>>(seed, counter, scale, out, n);
  return cudaGetLastError();
}

cudaError_t launch_gate_softmax_topk(float* scores, const float* noise, int64_t S, int64_t E, int k,
                                     bool normalize, int32_t* expert_index, float* gates, cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  gate_softmax_topk_kernel<<<warp_grid(S), kTokensPerBlock * kWarpSize, 0, stream>>>(
      scores, noise, S, static_cast<int>(E), k, normalize && k > 1, expert_index, gates);
  return cudaGetLastError();
}

size_t gate_loss_scratch_bytes(int64_t S, int64_t E) {
  const int64_t blocks = (S + kLossBlock - 1) / kLossBlock;
  return align256(static_cast<size_t>(blocks * E) * sizeof(double)) + align256(static_cast<size_t>(E) * 4);
}

cudaError_t launch_gate_loss(const float* scores, const int32_t* expert_index, int64_t S, int64_t E, int k,
                             void* scratch, float* l_aux, cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  const int64_t blocks = (S + kLossBlock - 1) / kLossBlock;
  auto* partial = static_cast<double*>(scratch);
  auto* top1 = reinterpret_cast<int32_t*>(static_cast<char*>(scratch) +
                                          align256(static_cast<size_t>(blocks * E) * sizeof(double)));
  if (cudaError_t err = cudaMemsetAsync(top1, 0, static_cast<size_t>(E) * 4, stream); err != cudaSuccess)
    return err;
  gate_loss_partial_kernel<<<static_cast<unsigned>(blocks), kLossBlock, 0, stream>>>(scores, expert_index, S, E,
                                                                                    k, partial, top1);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  gate_loss_final_kernel<<<1, kLossBlock, 0, stream>>>(partial, top1, blocks, S, E, l_aux);
  return cudaGetLastError();
}

size_t gate_backward_scratch_bytes(int64_t E) { return 2 * align256(static_cast<size_t>(E) * 4); }

cudaError_t launch_gate_backward_logits(const float* scores, const int32_t* expert_index, const float* d_gates,
                                        int64_t S, int64_t E, int k, float dl_aux, bool normalized,
                                        void* scratch, float* d_logits, cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  auto* top1 = static_cast<int32_t*>(scratch);
  auto* aux_grad = reinterpret_cast<float*>(static_cast<char*>(scratch) + align256(static_cast<size_t>(E) * 4));
  if (cudaError_t err = cudaMemsetAsync(top1, 0, static_cast<size_t>(E) * 4, stream); err != cudaSuccess)
    return err;
  top1_count_kernel<<<grid_for(S), kThreads, 0, stream>>>(expert_index, S, E, k, top1);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  aux_grad_kernel<<<grid_for(E), kThreads, 0, stream>>>(top1, S, E, dl_aux, aux_grad);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  gate_backward_logits_kernel<<<warp_grid(S), kTokensPerBlock * kWarpSize, 0, stream>>>(
      scores, expert_index, d_gates, aux_grad, S, static_cast<int>(E), k, normalized && k > 1, d_logits);
  return cudaGetLastError();
}

}  // namespace tutel::cuda
