// Elementwise and reduction kernels around the expert GEMMs (bias, activation and their
// backward, bias gradients, bf16 conversion), the optimizers, and the small f32 ops
// (Backend::add, add_row_bias, add_column_sums).
#include <cuda_bf16.h>

#include <cmath>
#include <type_traits>

#include "cuda/cuda_kernels.hpp"
#include "cuda/device_utils.cuh"

namespace tutel::cuda {
namespace {

constexpr int kBiasRows = 256;  // rows per partial sum of a bias gradient

// gelu is the exact erf form; silu is x·sigmoid(x) (oneDNN's swish with alpha 1).
__device__ inline float activate(ActKind act, float x) {
  switch (act) {
    case ActKind::kRelu: return x > 0.f ? x : 0.f;
    case ActKind::kGelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case ActKind::kSilu: return x / (1.f + expf(-x));
    case ActKind::kNone: break;
  }
  return x;
}

// act'(x) · d; x is the output for relu (positive exactly where the input is), else the input.
__device__ inline float activation_grad(ActKind act, float x, float d) {
  switch (act) {
    case ActKind::kRelu: return x > 0.f ? d : 0.f;
    case ActKind::kGelu: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;  // 1/sqrt(2π)
      return d * (cdf + x * pdf);
    }
    case ActKind::kSilu: {
      const float sig = 1.f / (1.f + expf(-x));
      return d * (sig * (1.f + x * (1.f - sig)));
    }
    case ActKind::kNone: break;
  }
  return d;
}

__device__ inline float4 activate4(ActKind act, float4 x) {
  return {activate(act, x.x), activate(act, x.y), activate(act, x.z), activate(act, x.w)};
}

// A block walks whole rows, its threads over the row: one division per row, none per element.
// One element type for the whole row walk: float (any width) or float4 (width % 4 == 0, every
// pointer 16-byte aligned; the bf16 output then goes 8 bytes at a time). Both do the same f32
// operations per element, so they give the same bits.
template <typename V, typename B>
__global__ void bias_activation_kernel(const V* in, const V* bias, int64_t experts, int64_t rows, int64_t width,
                                       ActKind act, V* pre_out, V* out, B* out_bf16) {
  const int64_t total_rows = experts * rows;
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    const V* b = bias ? bias + (row / rows) * width : nullptr;
    const int64_t base = row * width;
    for (int64_t n = threadIdx.x; n < width; n += blockDim.x) {
      V x = in[base + n];
      if (b) x = x + b[n];
      if (pre_out) pre_out[base + n] = x;
      V y;
      if constexpr (std::is_same_v<V, float4>) {
        y = activate4(act, x);
      } else {
        y = activate(act, x);
      }
      if (out) out[base + n] = y;
      if (out_bf16) store_bf16(out_bf16, base + n, y);
    }
  }
}

__global__ void activation_backward_kernel(const float* x, ActKind act, int64_t n, float* d) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) d[i] = activation_grad(act, x[i], d[i]);
}

// partial[e, chunk, n] = Σ over the chunk's rows of d[e, r, n], in row order; row (e, r) starts
// at d + (e·rows + r)·ld (ld = width for a dense [E, rows, width]).
__global__ void bias_grad_partial_kernel(const float* d, int64_t experts, int64_t rows, int64_t width,
                                         int64_t ld, int64_t chunks, float* partial) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= width) return;
  for (int64_t ec = blockIdx.y; ec < experts * chunks; ec += gridDim.y) {
    const int64_t e = ec / chunks, c = ec - e * chunks;
    const int64_t r0 = c * kBiasRows, r1 = min(rows, r0 + kBiasRows);
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) acc += d[(e * rows + r) * ld + n];
    partial[ec * width + n] = acc;
  }
}

// dbias[e, n] += Σ_chunk partial[e, chunk, n], in chunk order.
__global__ void bias_grad_final_kernel(const float* partial, int64_t experts, int64_t chunks, int64_t width,
                                       float* dbias) {
  for (int64_t i = grid_index(); i < experts * width; i += grid_stride()) {
    const int64_t e = i / width, n = i - e * width;
    float acc = 0.f;
    for (int64_t c = 0; c < chunks; ++c) acc += partial[(e * chunks + c) * width + n];
    dbias[i] += acc;
  }
}

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) dst[i] += src[i];
}

// A block walks whole rows of out (row stride ld), its threads over the n bias columns.
__global__ void add_row_bias_kernel(float* out, int64_t rows, int64_t ld, const float* bias, int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) out[r * ld + c] += bias[c];
}

// The two passes of a bias gradient over `experts` blocks of `rows` rows, each row `width`
// floats read from a row stride of `ld`.
cudaError_t column_sums(const float* d, int64_t experts, int64_t rows, int64_t width, int64_t ld,
                        void* scratch, float* dbias, cudaStream_t stream) {
  if (experts * rows * width <= 0) return cudaSuccess;
  const int64_t chunks = (rows + kBiasRows - 1) / kBiasRows;
  auto* partial = static_cast<float*>(scratch);
  const dim3 grid(static_cast<unsigned>((width + kThreads - 1) / kThreads),
                  static_cast<unsigned>(experts * chunks > kMaxBlocks ? kMaxBlocks : experts * chunks));
  bias_grad_partial_kernel<<<grid, kThreads, 0, stream>>>(d, experts, rows, width, ld, chunks, partial);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  bias_grad_final_kernel<<<grid_for(experts * width), kThreads, 0, stream>>>(partial, experts, chunks, width, dbias);
  return cudaGetLastError();
}

__global__ void to_bf16_kernel(const float* in, int64_t n, __nv_bfloat16* out) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void to_bf16x4_kernel(const float4* in, int64_t vecs, Bf16x4* out) {
  for (int64_t i = grid_index(); i < vecs; i += grid_stride()) out[i] = to_bf16x4(in[i]);
}

bool vectorizable(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % 4 != 0) return false;
  for (const void* p : pointers)
    if (p && !aligned16(p)) return false;
  return true;
}

__global__ void sgd_kernel(float* param, const float* grad, float* buf, __nv_bfloat16* param_bf16,
                           int64_t n, SgdParams p) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    float d = grad[i] + p.weight_decay * param[i];
    if (buf) {
      buf[i] = p.first_step ? d : p.momentum * buf[i] + d;
      d = p.nesterov ? d + p.momentum * buf[i] : buf[i];
    }
    const float w = param[i] - p.lr * d;
    param[i] = w;
    if (param_bf16) param_bf16[i] = __float2bfloat16_rn(w);
  }
}

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v,
                             __nv_bfloat16* param_bf16, int64_t n, AdamWParams p) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float g = grad[i];
    float w = param[i] * p.decay;
    const float mi = p.beta1 * m[i] + p.one_minus_beta1 * g;
    const float vi = p.beta2 * v[i] + p.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    w -= p.step_size * mi / (sqrtf(vi) / p.bc2_sqrt + p.eps);
    param[i] = w;
    if (param_bf16) param_bf16[i] = __float2bfloat16_rn(w);
  }
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

cudaError_t launch_bias_activation(const float* in, const float* bias, int64_t experts, int64_t rows,
                                   int64_t width, ActKind act, float* pre_out, float* out, void* out_bf16,
                                   cudaStream_t stream) {
  const int64_t total_rows = experts * rows;
  if (total_rows <= 0 || width <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(total_rows > kMaxBlocks ? kMaxBlocks : total_rows);
  auto threads_for = [](int64_t items) {
    return items >= kThreads ? kThreads : static_cast<int>((items + kWarpSize - 1) / kWarpSize * kWarpSize);
  };
  // The bf16 row is half as wide in bytes: 8-byte alignment is what its stores need.
  const bool bf16_ok = !out_bf16 || (reinterpret_cast<uintptr_t>(out_bf16) & 7u) == 0;
  if (bf16_ok && vectorizable(width, {in, bias, pre_out, out})) {
    const int64_t vecs = width / 4;
    bias_activation_kernel<<<grid, threads_for(vecs), 0, stream>>>(
        reinterpret_cast<const float4*>(in), reinterpret_cast<const float4*>(bias), experts, rows, vecs, act,
        reinterpret_cast<float4*>(pre_out), reinterpret_cast<float4*>(out), static_cast<Bf16x4*>(out_bf16));
  } else {
    bias_activation_kernel<<<grid, threads_for(width), 0, stream>>>(
        in, bias, experts, rows, width, act, pre_out, out, static_cast<__nv_bfloat16*>(out_bf16));
  }
  return cudaGetLastError();
}

cudaError_t launch_activation_backward(const float* x, ActKind act, int64_t n, float* d, cudaStream_t stream) {
  if (n <= 0 || act == ActKind::kNone) return cudaSuccess;
  activation_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, act, n, d);
  return cudaGetLastError();
}

size_t bias_grad_scratch_bytes(int64_t experts, int64_t rows, int64_t width) {
  const int64_t chunks = (rows + kBiasRows - 1) / kBiasRows;
  return align256(static_cast<size_t>(experts * chunks * width) * sizeof(float));
}

cudaError_t launch_bias_grad(const float* d, int64_t experts, int64_t rows, int64_t width, void* scratch,
                             float* dbias, cudaStream_t stream) {
  return column_sums(d, experts, rows, width, width, scratch, dbias, stream);
}

cudaError_t launch_add(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  add_kernel<<<grid_for(n), kThreads, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

namespace {

// A fixed grid: the partial of block b sums the elements b·kThreads + t + j·(grid·kThreads) in a
// fixed tree, so the result depends on n alone, never on the device.
constexpr int kSquareBlocks = 1024;

__global__ void sum_squares_partial_kernel(const float* src, int64_t n, double* partial) {
  __shared__ double lane[kThreads];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const double v = src[i];
    acc += v * v;
  }
  lane[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) lane[threadIdx.x] += lane[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = lane[0];
}

// One thread: the blocks' partials in order (at most kSquareBlocks of them).
__global__ void sum_squares_final_kernel(const double* partial, int blocks, float* dst) {
  double sum = 0;
  for (int b = 0; b < blocks; ++b) sum += partial[b];
  dst[0] = static_cast<float>(static_cast<double>(dst[0]) + sum);
}

__global__ void scale_kernel(float* t, int64_t n, float factor) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) t[i] *= factor;
}

}  // namespace

size_t sum_squares_scratch_bytes() { return kSquareBlocks * sizeof(double); }

cudaError_t launch_sum_squares(const float* src, int64_t n, void* scratch, float* dst, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < kSquareBlocks ? wanted : kSquareBlocks);
  auto* partial = static_cast<double*>(scratch);
  sum_squares_partial_kernel<<<blocks, kThreads, 0, stream>>>(src, n, partial);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  sum_squares_final_kernel<<<1, 1, 0, stream>>>(partial, blocks, dst);
  return cudaGetLastError();
}

cudaError_t launch_scale(float* t, int64_t n, float factor, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  scale_kernel<<<grid_for(n), kThreads, 0, stream>>>(t, n, factor);
  return cudaGetLastError();
}

cudaError_t launch_add_row_bias(float* out, int64_t rows, int64_t ld, const float* bias, int64_t n,
                                cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const int threads = n >= kThreads ? kThreads : static_cast<int>((n + kWarpSize - 1) / kWarpSize * kWarpSize);
  const unsigned grid = static_cast<unsigned>(rows > kMaxBlocks ? kMaxBlocks : rows);
  add_row_bias_kernel<<<grid, threads, 0, stream>>>(out, rows, ld, bias, n);
  return cudaGetLastError();
}

cudaError_t launch_column_sums(const float* src, int64_t rows, int64_t ld, int64_t n, void* scratch,
                               float* dst, cudaStream_t stream) {
  return column_sums(src, 1, rows, n, ld, scratch, dst, stream);
}

cudaError_t launch_to_bf16(const float* in, int64_t n, void* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (vectorizable(n, {in}) && (reinterpret_cast<uintptr_t>(out) & 7u) == 0) {
    to_bf16x4_kernel<<<grid_for(n / 4), kThreads, 0, stream>>>(reinterpret_cast<const float4*>(in), n / 4,
                                                                static_cast<Bf16x4*>(out));
  } else {
    to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(in, n, static_cast<__nv_bfloat16*>(out));
  }
  return cudaGetLastError();
}

cudaError_t launch_sgd(float* param, const float* grad, float* momentum_buffer, void* param_bf16,
                       int64_t n, SgdParams p, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  sgd_kernel<<<grid_for(n), kThreads, 0, stream>>>(param, grad, momentum_buffer,
                                                   static_cast<__nv_bfloat16*>(param_bf16), n, p);
  return cudaGetLastError();
}

cudaError_t launch_adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                         void* param_bf16, int64_t n, AdamWParams p, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  adamw_kernel<<<grid_for(n), kThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq,
                                                     static_cast<__nv_bfloat16*>(param_bf16), n, p);
  return cudaGetLastError();
}

}  // namespace tutel::cuda
