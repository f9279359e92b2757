// Launchers of the CUDA backend's kernels: the boundary between the C++20 host code
// (cuda_backend.cpp) and the C++17 .cu files. Plain pointers and sizes only, no core/ types.
//
// Every launcher queues work on `stream` and returns the launch's error (cudaSuccess when
// there is nothing to do). Scratch memory is the caller's: each op that needs some says how
// much through its *_scratch_bytes function. Every reduction here runs over fixed blocks
// combined in a fixed order, so no result depends on the launch configuration or the GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tutel::cuda {

enum class ActKind : int { kNone, kRelu, kGelu, kSilu };

// ---- gate_kernels.cu --------------------------------------------------------------------
// out[i] = scale · gate_noise_at(seed, counter, i).
cudaError_t launch_gate_noise(uint64_t seed, uint64_t counter, float scale, float* out, int64_t n,
                              cudaStream_t stream);
// scores holds the logits [S, E] on entry and softmax(logits + noise) on return; top-k by
// repeated selection (ties to the lower expert), gates normalised by their sum when asked.
cudaError_t launch_gate_softmax_topk(float* scores, const float* noise, int64_t S, int64_t E, int k,
                                     bool normalize, int32_t* expert_index, float* gates,
                                     cudaStream_t stream);
// GShard loss E · Σ_e mean_s(scores[:, e]) · fraction(top1 == e), into l_aux[0].
size_t gate_loss_scratch_bytes(int64_t S, int64_t E);
cudaError_t launch_gate_loss(const float* scores, const int32_t* expert_index, int64_t S, int64_t E, int k,
                             void* scratch, float* l_aux, cudaStream_t stream);
// d_logits [S, E] from d_gates through the normalisation, the loss and the softmax.
size_t gate_backward_scratch_bytes(int64_t E);
cudaError_t launch_gate_backward_logits(const float* scores, const int32_t* expert_index,
                                        const float* d_gates, int64_t S, int64_t E, int k, float dl_aux,
                                        bool normalized, void* scratch, float* d_logits,
                                        cudaStream_t stream);

// ---- routing_kernels.cu -----------------------------------------------------------------
// location [S, k] and expert_count [E] as CpuBackend::locations. scores is read only when
// batch_prioritized. scratch_bytes must be at least locations_scratch_bytes().
size_t locations_scratch_bytes(int64_t S, int64_t E, int k, bool batch_prioritized);
cudaError_t launch_locations(const float* scores, const int32_t* expert_index, int64_t S, int64_t E, int k,
                             bool batch_prioritized, void* scratch, size_t scratch_bytes,
                             int32_t* location, int32_t* expert_count, cudaStream_t stream);
// slots [E, C]: -1, then assignment i = s·k + j at (idx[i], loc[i]) for every loc[i] < C.
cudaError_t launch_slot_map(const int32_t* expert_index, const int32_t* location, int64_t assignments,
                            int64_t E, int64_t C, int32_t* slots, cudaStream_t stream);

// ---- dispatch_kernels.cu ----------------------------------------------------------------
// out[r, :] = 0 for slots[r] < 0, else (scale ? gates[a] : 1) · src[a / k, :] with a = slots[r].
// (encode; decode' for d_expert_out.)
cudaError_t launch_scatter_rows(const float* src, const float* gates, const int32_t* slots, int64_t rows,
                                int64_t width, int k, bool scale, float* out, cudaStream_t stream);
// The same rows rounded to bf16 as they are written (encode into bf16 dispatched tokens).
cudaError_t launch_scatter_rows_to_bf16(const float* src, const float* gates, const int32_t* slots, int64_t rows,
                                        int64_t width, int k, bool scale, void* out, cudaStream_t stream);
// out[s, :] = Σ_j over kept choices, in j order, (scale ? gates[s, j] : 1) · rows[idx·C + loc, :].
// (decode; encode' for dx.)
cudaError_t launch_gather_rows(const float* rows, const float* gates, const int32_t* expert_index,
                               const int32_t* location, int64_t S, int k, int64_t C, int64_t width,
                               bool scale, float* out, cudaStream_t stream);
// out[s·k + j] = (accumulate ? out[s·k + j] : 0) + (kept ? rows[idx·C + loc, :] · tokens[s, :] : 0).
// (decode' and encode' for d_gates.)
cudaError_t launch_assignment_dot(const float* rows, const float* tokens, const int32_t* expert_index,
                                  const int32_t* location, int64_t S, int k, int64_t C, int64_t width,
                                  bool accumulate, float* out, cudaStream_t stream);

// ---- expert_kernels.cu ------------------------------------------------------------------
// For x = in[e, r, n] + bias[e, n] (bias may be null): pre_out = x, out = act(x) and
// out_bf16 (__nv_bfloat16) = bf16(act(x)) as launch_to_bf16 rounds it, each where not null.
// in may alias pre_out or out. 16-byte accesses where the width and the pointers allow.
cudaError_t launch_bias_activation(const float* in, const float* bias, int64_t experts, int64_t rows,
                                   int64_t width, ActKind act, float* pre_out, float* out, void* out_bf16,
                                   cudaStream_t stream);
// d ← d · act'(x) in place; x is the activation's output for relu, its input for gelu/silu.
cudaError_t launch_activation_backward(const float* x, ActKind act, int64_t n, float* d, cudaStream_t stream);
// dbias[e, n] += Σ_r d[e, r, n].
size_t bias_grad_scratch_bytes(int64_t experts, int64_t rows, int64_t width);
cudaError_t launch_bias_grad(const float* d, int64_t experts, int64_t rows, int64_t width, void* scratch,
                             float* dbias, cudaStream_t stream);
// dst[i] += src[i] for i < n.
cudaError_t launch_add(float* dst, const float* src, int64_t n, cudaStream_t stream);
// dst[0] += Σ src[i]² (double sums of fixed blocks, then the blocks in order); scratch is
// sum_squares_scratch_bytes() long.
size_t sum_squares_scratch_bytes();
cudaError_t launch_sum_squares(const float* src, int64_t n, void* scratch, float* dst, cudaStream_t stream);
cudaError_t launch_scale(float* t, int64_t n, float factor, cudaStream_t stream);
// out[r·ld + c] += bias[c] for r < rows, c < n.
cudaError_t launch_add_row_bias(float* out, int64_t rows, int64_t ld, const float* bias, int64_t n,
                                cudaStream_t stream);
// dst[c] += Σ_r src[r·ld + c] for c < n, as launch_bias_grad (fixed blocks of rows, in order);
// scratch is bias_grad_scratch_bytes(1, rows, n) long.
cudaError_t launch_column_sums(const float* src, int64_t rows, int64_t ld, int64_t n, void* scratch,
                               float* dst, cudaStream_t stream);
// out[i] = bf16(in[i]), round to nearest even; out is __nv_bfloat16[n]. 16-byte loads where
// n and the pointers allow.
cudaError_t launch_to_bf16(const float* in, int64_t n, void* out, cudaStream_t stream);

// PyTorch's SGD (dampening 0) and AdamW, elementwise, with the CPU backend's operation order.
// param_bf16 (__nv_bfloat16[n], may be null) gets bf16(updated param), rounded as launch_to_bf16.
struct SgdParams {
  float lr, momentum, weight_decay;
  bool nesterov, first_step;
};
cudaError_t launch_sgd(float* param, const float* grad, float* momentum_buffer, void* param_bf16,
                       int64_t n, SgdParams p, cudaStream_t stream);
struct AdamWParams {
  // The factors rounded from the double betas (AdamWArgs); step_size = lr / bc1, decay = 1 − lr·wd.
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, decay;
};
cudaError_t launch_adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                         void* param_bf16, int64_t n, AdamWParams p, cudaStream_t stream);

}  // namespace tutel::cuda
