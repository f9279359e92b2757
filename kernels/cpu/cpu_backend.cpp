#include "cpu/cpu_backend.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "cpu/elementwise_ops.hpp"
#include "cpu/optimizers.hpp"
#include "cpu/parallel_work.hpp"
#include "cpu/onednn_matmul.hpp"
#include "tutel/kernels/gate_noise.hpp"

namespace tutel::cpu {
namespace {

using dnnl::algorithm;

// Token blocks for reductions: partial sums per block, combined in block order, so a result
// never depends on how many threads ran.
constexpr int64_t kReduceBlock = 256;

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// dst[i] = bf16(src[i]), round to nearest even: the one conversion every bf16 operand, weight
// copy and optimizer refresh goes through, so they all agree bit for bit.
void to_bf16(const float* src, int64_t n, uint16_t* dst) {
#pragma omp parallel for simd schedule(static) if (parallel: cpu::worth_a_team(n))
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

inline float stored(float v, float*) { return v; }
inline uint16_t stored(float v, uint16_t*) { return f32_to_bf16(v); }

// out[r, :] = 0 for slots[r] < 0, else (scale ? gates[a] : 1) · src[a / k, :] with a = slots[r]
// (encode, and decode's backward), written as f32, or rounded to bf16 (uint16_t) as it is
// written. Without `scale` the row is copied as it is.
template <typename Out>
void scatter_rows(const float* src, const float* gates, const int32_t* slots, int64_t rows,
                  int64_t width, int64_t k, bool scale, Out* out) {
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(rows * width))
  for (int64_t r = 0; r < rows; ++r) {
    Out* row = out + r * width;
    const int32_t a = slots[r];
    if (a < 0) {
      std::memset(row, 0, width * sizeof(Out));
      continue;
    }
    const float* in = src + (a / k) * width;
    if (scale) {
      const float g = gates[a];
#pragma omp simd
      for (int64_t m = 0; m < width; ++m) row[m] = stored(g * in[m], row);
    } else {
#pragma omp simd
      for (int64_t m = 0; m < width; ++m) row[m] = stored(in[m], row);
    }
  }
}

// The dispatched tokens as a GEMM operand: bf16 ones are read as they are.
MatOperand dispatched_operand(const TensorView& dispatched, int64_t E, int64_t C, int64_t M) {
  MatOperand m = row_major(dispatched.data(), E, C, M);
  if (dispatched.dtype() == DType::kBF16) m.type = dnnl::memory::data_type::bf16;
  return m;
}

// A weight as a matmul operand: the owner's bf16 copy when the matmul is bf16 and there is one
// (matmul() then converts nothing), else the f32 weight `m` as laid out.
MatOperand with_bf16_copy(MatOperand m, const TensorView& copy, DType matmul_dtype) {
  if (matmul_dtype != DType::kBF16 || copy.empty()) return m;
  m.data = copy.data();
  m.type = dnnl::memory::data_type::bf16;
  return m;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, std::string model) : threads_(threads), model_(std::move(model)) {}

  std::string_view name() const override { return "cpu"; }
  Device device() const override { return {DeviceKind::kCpu, 0}; }
  std::string describe() const override {
    return "cpu: " + std::to_string(threads_) + (threads_ == 1 ? " thread, " : " threads, ") + model_;
  }

  Result<DeviceBuffer> allocate(size_t bytes) override {
    // Rounding near SIZE_MAX would wrap to a tiny buffer that claims `bytes`.
    if (bytes > (size_t{1} << 62))
      return Status::ResourceExhausted("cannot allocate " + std::to_string(bytes) + " bytes of host memory");
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, std::max<size_t>(rounded, 64));
    if (!p) return Status::ResourceExhausted("cannot allocate " + std::to_string(bytes) + " bytes of host memory");
    return DeviceBuffer(this, p, bytes);
  }
  void release(void* data, size_t) override {
    {
      std::lock_guard<std::mutex> lock(shared_mutex_);
      if (auto it = shared_.find(data); it != shared_.end()) {
        shared_.erase(it);  // unmaps; other processes keep their own mappings
        return;
      }
    }
    std::free(data);
  }

  // A sealed memfd: the other process maps the same pages, which stay mapped there after this
  // side unmaps them (until discard_shareable), so nothing here can ever show it this process's
  // later data.
  Result<ShareableBuffer> allocate_shareable(size_t bytes) override {
    TUTEL_ASSIGN_OR_RETURN(SharedMemory memory, SharedMemory::create(bytes, "shared device memory"));
    ShareableBuffer out;
    out.exported.kind = "host_memfd";
    out.exported.device_id = "cpu";
    // The descriptor goes to the other process; this side keeps only the mapping.
    out.exported.fd = memory.take_fd();
    out.buffer = DeviceBuffer(this, memory.data(), memory.bytes());
    std::lock_guard<std::mutex> lock(shared_mutex_);
    shared_.emplace(memory.data(), std::move(memory));
    return out;
  }
  // Its pages are punched out of the memfd: the other process may keep the descriptor, and
  // with it this process's memory, for as long as it likes.
  void discard_shareable(void* data) override {
    std::lock_guard<std::mutex> lock(shared_mutex_);
    if (auto it = shared_.find(data); it != shared_.end()) it->second.discard_pages();
  }

  Status copy(void* dst, const void* src, size_t bytes, CopyKind) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return Status::OK();
  }

  Status fill_zero(TensorView t) override {
    threads_scope();
    auto* p = static_cast<char*>(t.data());
    const int64_t n = static_cast<int64_t>(t.nbytes());
    constexpr int64_t kChunk = 1 << 20;
#pragma omp parallel for schedule(static) if (parallel: n > kChunk)
    for (int64_t off = 0; off < n; off += kChunk) std::memset(p + off, 0, std::min(kChunk, n - off));
    return Status::OK();
  }

  Status synchronize() override { return Status::OK(); }

  Status convert(TensorView src, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(src, dst, "convert's dst"));
    threads_scope();
    to_bf16(src.data_as<float>(), src.numel(), dst.data_as<uint16_t>());
    return Status::OK();
  }

  // The small f32 ops live in elementwise_ops.cpp.
  Status add(TensorView dst, TensorView src) override {
    threads_scope();
    return cpu::add(dst, src);
  }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    threads_scope();
    return cpu::add_row_bias(out, bias, column);
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    threads_scope();
    return cpu::add_column_sums(src, column, dst);
  }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    threads_scope();
    return cpu::add_sum_squares(src, dst);
  }
  Status scale(TensorView t, float factor) override {
    threads_scope();
    return cpu::scale(t, factor);
  }

  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override {
    threads_scope();
    float* o = out.data_as<float>();
    const int64_t n = out.numel();
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(16 * n))  // a hash, a log and a sine each
    for (int64_t i = 0; i < n; ++i) o[i] = scale * gate_noise_at(seed, counter, static_cast<uint64_t>(i));
    return Status::OK();
  }

  Status gate_forward(const GateForwardArgs& a) override;
  Status locations(const LocationsArgs& a) override;
  Status slot_map(const SlotMapArgs& a) override;
  Status encode(const EncodeArgs& a) override;
  Status decode(const DecodeArgs& a) override;
  size_t expert_workspace_bytes(const ExpertShape& s, DType matmul_dtype) const override;
  Status expert_forward(const ExpertForwardArgs& a) override;
  Status expert_backward(const ExpertBackwardArgs& a) override;
  Status decode_backward(const DecodeBackwardArgs& a) override;
  Status encode_backward(const EncodeBackwardArgs& a) override;
  Status gate_backward(const GateBackwardArgs& a) override;
  Status sgd_step(const SgdArgs& a) override;
  Status adamw_step(const AdamWArgs& a) override;

 private:
  // oneDNN and our loops both run on the calling thread's OpenMP team; size it per call so
  // several backends on different threads (virtual ranks) each get their own thread count.
  void threads_scope() const { omp_set_num_threads(threads_); }

  // Converts the operand's underlying buffer (numel elements) to bf16 in `scratch`.
  MatOperand as_bf16(const MatOperand& m, uint16_t* scratch) const;
  // With bf16, f32 operands are converted into the two halves of the workspace first; operands
  // already in bf16 (weight copies) are used as they are.
  Status matmul(const MatOperand& a, const MatOperand& b, float* dst, const MatmulOptions& o,
                DType matmul_dtype, const TensorView& workspace);
  // dbias[e, :] += Σ_c d[e, c, :] for d of shape [E, C, N].
  void accumulate_bias_grad(const float* d, int64_t E, int64_t C, int64_t N, float* dbias) const;

  int threads_;
  const std::string model_;  // the processor's model name
  OneDnnMatmul dnnl_;
  std::vector<int32_t> order_;  // token order scratch for batch-prioritized routing
  // allocate_shareable()'s mappings by address. Locked because a buffer may be freed from a
  // thread other than the one running ops (a client's region closes on the event loop).
  std::mutex shared_mutex_;
  std::map<void*, SharedMemory> shared_;
};

Status CpuBackend::gate_forward(const GateForwardArgs& a) {
  threads_scope();
  const int64_t S = a.x.dim(0), M = a.x.dim(1), E = a.gate_weight.dim(0), k = a.k;
  float* scores = a.scores.data_as<float>();
  TUTEL_RETURN_IF_ERROR(dnnl_.run(row_major(a.x.data(), 1, S, M),
                                  transposed(a.gate_weight.data(), 1, E, M), scores, {}));
  const float* noise = a.noise.empty() ? nullptr : a.noise.data_as<float>();
  int32_t* idx = a.expert_index.data_as<int32_t>();
  float* gates = a.gates.data_as<float>();
  const bool normalize = k > 1 && a.normalize_gate;
  const float eps = std::numeric_limits<float>::epsilon();

#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(8 * S * E))  // a softmax and a top-k per row
  for (int64_t s = 0; s < S; ++s) {
    float* row = scores + s * E;
    if (noise)
      for (int64_t e = 0; e < E; ++e) row[e] += noise[s * E + e];
    float mx = row[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, row[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      row[e] = std::exp(row[e] - mx);
      sum += row[e];
    }
    const float inv = 1.f / sum;
    for (int64_t e = 0; e < E; ++e) row[e] *= inv;
    // Top-k: the higher score first, the lower index on ties. A row holds NaN everywhere or
    // nowhere (one NaN makes the softmax's sum NaN), so an all-NaN row takes experts 0..k-1, as
    // every comparison of its scores is false. The k best so far are kept in a heap in ix,
    // whose top is the worst of them: O(E log k), where k may be as large as E.
    int32_t* ix = idx + s * k;
    float* g = gates + s * k;
    auto before = [row](int32_t a, int32_t b) {
      if (row[a] > row[b]) return true;
      if (row[b] > row[a]) return false;
      return a < b;
    };
    int32_t* heap_end = ix;
    for (int64_t e = 0; e < E; ++e) {
      const auto expert = static_cast<int32_t>(e);
      if (heap_end - ix < k) {
        *heap_end++ = expert;
        std::push_heap(ix, heap_end, before);
      } else if (before(expert, ix[0])) {
        std::pop_heap(ix, heap_end, before);
        heap_end[-1] = expert;
        std::push_heap(ix, heap_end, before);
      }
    }
    std::sort_heap(ix, heap_end, before);
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      g[j] = row[ix[j]];
      total += g[j];
    }
    if (normalize) {
      const float denom = std::max(total, eps);
      for (int64_t j = 0; j < k; ++j) g[j] /= denom;
    }
  }

  // GShard loss: E · Σ_e mean(scores[:, e]) · fraction(top1 == e).
  const int64_t blocks = (S + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> partial(blocks * E, 0.0);
  std::vector<int64_t> top1(E, 0);
  for (int64_t s = 0; s < S; ++s) ++top1[idx[s * k]];
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(blocks * kReduceBlock * E))
  for (int64_t b = 0; b < blocks; ++b) {
    double* p = partial.data() + b * E;
    for (int64_t s = b * kReduceBlock; s < std::min(S, (b + 1) * kReduceBlock); ++s)
      for (int64_t e = 0; e < E; ++e) p[e] += scores[s * E + e];
  }
  double l_aux = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    double me = 0.0;
    for (int64_t b = 0; b < blocks; ++b) me += partial[b * E + e];
    l_aux += (me / S) * (static_cast<double>(top1[e]) / S);
  }
  a.l_aux.data_as<float>()[0] = static_cast<float>(l_aux * E);
  return Status::OK();
}

Status CpuBackend::locations(const LocationsArgs& a) {
  const int64_t S = a.expert_index.dim(0), k = a.expert_index.dim(1), E = a.expert_count.dim(0);
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  int32_t* loc = a.location.data_as<int32_t>();
  int32_t* count = a.expert_count.data_as<int32_t>();
  std::fill(count, count + E, 0);
  order_.resize(S);
  std::iota(order_.begin(), order_.end(), 0);
  if (a.batch_prioritized) {
    const float* scores = a.scores.data_as<float>();
    // The largest score that is a number: a token whose scores are NaN (its input was) ranks
    // last, as on the GPU (fmaxf), instead of making the comparison below no ordering at all,
    // which let it reorder the valid tokens around it.
    std::vector<float> importance(S);
    for (int64_t s = 0; s < S; ++s) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e)
        if (scores[s * E + e] > mx) mx = scores[s * E + e];
      importance[s] = mx;
    }
    std::stable_sort(order_.begin(), order_.end(),
                     [&](int32_t x, int32_t y) { return importance[x] > importance[y]; });
  }
  // A running count per expert; all choice-0 assignments precede all choice-1 ones.
  for (int64_t j = 0; j < k; ++j)
    for (int32_t s : order_) {
      const int32_t e = idx[s * k + j];
      loc[s * k + j] = count[e]++;
    }
  return Status::OK();
}

Status CpuBackend::slot_map(const SlotMapArgs& a) {
  const int64_t S = a.expert_index.dim(0), k = a.expert_index.dim(1), C = a.capacity;
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  const int32_t* loc = a.location.data_as<int32_t>();
  int32_t* slots = a.slot_assignment.data_as<int32_t>();
  std::fill(slots, slots + a.slot_assignment.numel(), -1);
  for (int64_t i = 0; i < S * k; ++i)
    if (loc[i] < C) slots[idx[i] * C + loc[i]] = static_cast<int32_t>(i);
  return Status::OK();
}

Status CpuBackend::encode(const EncodeArgs& a) {
  threads_scope();
  const int64_t M = a.x.dim(1), k = a.gates.dim(1);
  const float* x = a.x.data_as<float>();
  const float* gates = a.gates.data_as<float>();
  const int32_t* slots = a.slot_assignment.data_as<int32_t>();
  const int64_t rows = a.slot_assignment.numel();
  switch (a.dispatched.dtype()) {
    case DType::kF32:
      scatter_rows(x, gates, slots, rows, M, k, !a.is_postscore, a.dispatched.data_as<float>());
      return Status::OK();
    case DType::kBF16:
      // Each row rounded as it is written: the bits of encoding in f32 and converting after,
      // without the f32 rows ever reaching memory.
      scatter_rows(x, gates, slots, rows, M, k, !a.is_postscore, a.dispatched.data_as<uint16_t>());
      return Status::OK();
    default:
      return Status::InvalidArgument("encode: dispatched has dtype " +
                                     std::string(dtype_name(a.dispatched.dtype())) + "; give f32 or bf16");
  }
}

Status CpuBackend::decode(const DecodeArgs& a) {
  threads_scope();
  const int64_t S = a.y.dim(0), O = a.y.dim(1), k = a.gates.dim(1), C = a.capacity;
  const float* yexp = a.expert_out.data_as<float>();
  const float* gates = a.gates.data_as<float>();
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  const int32_t* loc = a.location.data_as<int32_t>();
  float* y = a.y.data_as<float>();
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(S * k * O))
  for (int64_t s = 0; s < S; ++s) {
    float* out = y + s * O;
    std::memset(out, 0, O * sizeof(float));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t l = loc[s * k + j];
      if (l >= C) continue;
      const float g = a.is_postscore ? gates[s * k + j] : 1.f;
      const float* in = yexp + (idx[s * k + j] * C + l) * O;
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) out[o] += g * in[o];
    }
  }
  return Status::OK();
}

Status CpuBackend::decode_backward(const DecodeBackwardArgs& a) {
  threads_scope();
  const int64_t S = a.dy.dim(0), O = a.dy.dim(1), k = a.gates.dim(1);
  const int64_t C = a.slot_assignment.dim(1), rows = a.slot_assignment.numel();
  const float* dy = a.dy.data_as<float>();
  const float* yexp = a.expert_out.data_as<float>();
  const float* gates = a.gates.data_as<float>();
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  const int32_t* loc = a.location.data_as<int32_t>();
  const int32_t* slots = a.slot_assignment.data_as<int32_t>();
  float* d_yexp = a.d_expert_out.data_as<float>();
  float* d_gates = a.d_gates.data_as<float>();
  scatter_rows(dy, gates, slots, rows, O, k, a.is_postscore, d_yexp);
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(S * k * O))
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t l = loc[s * k + j];
      d_gates[s * k + j] = (a.is_postscore && l < C)
                               ? dot(yexp + (idx[s * k + j] * C + l) * O, dy + s * O, O)
                               : 0.f;
    }
  return Status::OK();
}

Status CpuBackend::encode_backward(const EncodeBackwardArgs& a) {
  threads_scope();
  const int64_t S = a.x.dim(0), M = a.x.dim(1), k = a.gates.dim(1), C = a.capacity;
  const float* d_disp = a.d_dispatched.data_as<float>();
  const float* x = a.x.data_as<float>();
  const float* gates = a.gates.data_as<float>();
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  const int32_t* loc = a.location.data_as<int32_t>();
  float* dx = a.dx.data_as<float>();
  float* d_gates = a.d_gates.data_as<float>();
#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(S * k * M))
  for (int64_t s = 0; s < S; ++s) {
    float* out = dx + s * M;
    std::memset(out, 0, M * sizeof(float));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t l = loc[s * k + j];
      if (l >= C) continue;
      const float* in = d_disp + (idx[s * k + j] * C + l) * M;
      if (a.is_postscore) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) out[m] += in[m];
      } else {
        const float g = gates[s * k + j];
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) out[m] += g * in[m];
        d_gates[s * k + j] += dot(x + s * M, in, M);
      }
    }
  }
  return Status::OK();
}

Status CpuBackend::gate_backward(const GateBackwardArgs& a) {
  threads_scope();
  const int64_t S = a.x.dim(0), M = a.x.dim(1), E = a.gate_weight.dim(0), k = a.expert_index.dim(1);
  const float* scores = a.scores.data_as<float>();
  const int32_t* idx = a.expert_index.data_as<int32_t>();
  const float* d_gates = a.d_gates.data_as<float>();
  float* d_logits = a.d_logits.data_as<float>();
  const bool normalized = k > 1 && a.normalize_gate;
  const float eps = std::numeric_limits<float>::epsilon();

  // d l_aux / d scores[s, e] = dl_aux · E · ce[e] / S, with ce the top-1 fraction.
  std::vector<float> aux_grad(E, 0.f);
  {
    std::vector<int64_t> top1(E, 0);
    for (int64_t s = 0; s < S; ++s) ++top1[idx[s * k]];
    for (int64_t e = 0; e < E; ++e)
      aux_grad[e] = static_cast<float>(static_cast<double>(a.dl_aux) * E * top1[e] / (double(S) * S));
  }

#pragma omp parallel for schedule(static) if (parallel: cpu::worth_a_team(8 * S * E))
  for (int64_t s = 0; s < S; ++s) {
    const float* p = scores + s * E;
    float* d = d_logits + s * E;
    for (int64_t e = 0; e < E; ++e) d[e] = aux_grad[e];
    const int32_t* ix = idx + s * k;
    const float* dg = d_gates + s * k;
    if (normalized) {
      float total = 0.f, weighted = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        total += p[ix[j]];
        weighted += dg[j] * p[ix[j]];
      }
      const float denom = std::max(total, eps);
      // With the clamp active the denominator is a constant.
      const float cross = total >= eps ? weighted / (denom * denom) : 0.f;
      for (int64_t j = 0; j < k; ++j) d[ix[j]] += dg[j] / denom - cross;
    } else {
      for (int64_t j = 0; j < k; ++j) d[ix[j]] += dg[j];
    }
    // softmax': d_logits = p ⊙ (d − Σ d⊙p)
    float inner = 0.f;
    for (int64_t e = 0; e < E; ++e) inner += d[e] * p[e];
    for (int64_t e = 0; e < E; ++e) d[e] = p[e] * (d[e] - inner);
  }
  // d_wg += d_logitsᵀ · x ; dx += d_logits · wg
  TUTEL_RETURN_IF_ERROR(dnnl_.run(transposed(d_logits, 1, S, E), row_major(a.x.data(), 1, S, M),
                                  a.d_gate_weight.data_as<float>(), {.accumulate = true}));
  TUTEL_RETURN_IF_ERROR(dnnl_.run(row_major(d_logits, 1, S, E), row_major(a.gate_weight.data(), 1, E, M),
                                  a.dx.data_as<float>(), {.accumulate = true}));
  return Status::OK();
}

size_t CpuBackend::expert_workspace_bytes(const ExpertShape& s, DType matmul_dtype) const {
  if (matmul_dtype != DType::kBF16) return 0;
  const int64_t C = s.capacity, M = s.model_dim, H = s.hidden, O = s.output_dim;
  // Two operands at a time: the weight gradients' GEMMs convert two activations even when the
  // weights come in bf16.
  int64_t per_operand = std::max({C * M, C * H, C * O});
  if (!s.weights_bf16) per_operand = std::max({per_operand, H * M, H * O});
  return static_cast<size_t>(2 * s.experts * per_operand) * sizeof(uint16_t);
}

MatOperand CpuBackend::as_bf16(const MatOperand& m, uint16_t* scratch) const {
  // The operand may be a transposed view: convert the whole underlying buffer, keep strides.
  to_bf16(static_cast<const float*>(m.data), m.dims[0] * m.dims[1] * m.dims[2], scratch);
  MatOperand out = m;
  out.data = scratch;
  out.type = dnnl::memory::data_type::bf16;
  return out;
}

Status CpuBackend::matmul(const MatOperand& a, const MatOperand& b, float* dst, const MatmulOptions& o,
                          DType matmul_dtype, const TensorView& workspace) {
  if (matmul_dtype != DType::kBF16) return dnnl_.run(a, b, dst, o);
  const size_t half = workspace.nbytes() / 2 / sizeof(uint16_t);
  auto* scratch = static_cast<uint16_t*>(workspace.data());
  auto needs_room = [half](const MatOperand& m) {
    return m.type == dnnl::memory::data_type::f32 &&
           static_cast<size_t>(m.dims[0] * m.dims[1] * m.dims[2]) > half;
  };
  if (needs_room(a) || needs_room(b))
    return Status::InvalidArgument(
        "expert workspace too small for the bf16 matmul; size it with "
        "expert_workspace_bytes() (weights_bf16 only when both weights come with bf16 copies)");
  auto operand = [this](const MatOperand& m, uint16_t* slot) {
    return m.type == dnnl::memory::data_type::bf16 ? m : as_bf16(m, slot);
  };
  return dnnl_.run(operand(a, scratch), operand(b, scratch + half), dst, o);
}

void CpuBackend::accumulate_bias_grad(const float* d, int64_t E, int64_t C, int64_t N, float* dbias) const {
  constexpr int64_t kCols = 256;  // columns per task: a strip that stays in L1 while rows stream
  const int64_t strips = (N + kCols - 1) / kCols;
#pragma omp parallel for collapse(2) schedule(static) if (parallel: cpu::worth_a_team(E * C * N))
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < strips; ++t) {
      const int64_t n0 = t * kCols, n1 = std::min(N, n0 + kCols);
      float acc[kCols] = {};
      for (int64_t c = 0; c < C; ++c) {
        const float* row = d + (e * C + c) * N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) acc[n - n0] += row[n];
      }
      for (int64_t n = n0; n < n1; ++n) dbias[e * N + n] += acc[n - n0];
    }
}

algorithm eltwise_of(Activation act) {
  switch (act) {
    case Activation::kRelu: return algorithm::eltwise_relu;
    case Activation::kGelu: return algorithm::eltwise_gelu_erf;
    case Activation::kSilu: return algorithm::eltwise_swish;  // x·sigmoid(αx), α = 1
  }
  return algorithm::eltwise_relu;
}

Status CpuBackend::expert_forward(const ExpertForwardArgs& a) {
  threads_scope();
  const int64_t E = a.dispatched.dim(0), C = a.dispatched.dim(1), M = a.dispatched.dim(2);
  const int64_t H = a.weights.fc1_weight.dim(1), O = a.weights.fc2_weight.dim(2);
  if (C == 0) return Status::OK();
  const float* b1 = a.weights.fc1_bias.empty() ? nullptr : a.weights.fc1_bias.data_as<float>();
  const float* b2 = a.weights.fc2_bias.empty() ? nullptr : a.weights.fc2_bias.data_as<float>();
  TUTEL_RETURN_IF_ERROR(check_dispatched(a.dispatched, a.matmul_dtype, "expert_forward:"));
  if (a.matmul_dtype == DType::kBF16)
    TUTEL_RETURN_IF_ERROR(a.weights.check_bf16_copies("expert_forward:"));
  float* hidden = a.hidden.data_as<float>();
  const MatOperand fc1 = with_bf16_copy(transposed(a.weights.fc1_weight.data(), E, H, M),
                                        a.weights.fc1_weight_bf16, a.matmul_dtype);
  const MatOperand fc2 = with_bf16_copy(row_major(a.weights.fc2_weight.data(), E, H, O),
                                        a.weights.fc2_weight_bf16, a.matmul_dtype);
  const MatOperand disp = dispatched_operand(a.dispatched, E, C, M);
  // An inference skips the experts no token was routed to (ExpertForwardArgs::expert_count).
  const int32_t* in_use = nullptr;
  if (!a.keep_hidden && !a.expert_count.empty()) {
    TUTEL_RETURN_IF_ERROR(a.expert_count.expect("expert_forward: expert_count", DType::kI32, {E}));
    in_use = a.expert_count.data_as<int32_t>();
  }
  // Fuse the activation into fc1 unless backward needs the pre-activation (gelu, silu).
  if (a.pre_activation.empty()) {
    TUTEL_RETURN_IF_ERROR(matmul(disp, fc1, hidden,
                                 {.bias = b1, .activation = eltwise_of(a.activation), .entry_in_use = in_use},
                                 a.matmul_dtype, a.workspace));
  } else {
    float* pre = a.pre_activation.data_as<float>();
    TUTEL_RETURN_IF_ERROR(matmul(disp, fc1, pre, {.bias = b1, .entry_in_use = in_use}, a.matmul_dtype,
                                 a.workspace));
    TUTEL_RETURN_IF_ERROR(dnnl_.eltwise_forward(eltwise_of(a.activation), pre, hidden, E * C * H));
  }
  float* out = a.expert_out.data_as<float>();
  TUTEL_RETURN_IF_ERROR(matmul(row_major(hidden, E, C, H), fc2, out, {.bias = b2, .entry_in_use = in_use},
                               a.matmul_dtype, a.workspace));
  // A skipped expert's rows hold zeros, not what the buffer held before: nothing here reads them,
  // but the expert-parallel layer sends every row back to the tokens' ranks.
  if (in_use)
    for (int64_t e = 0; e < E; ++e)
      if (in_use[e] == 0) std::fill_n(out + e * C * O, C * O, 0.f);
  return Status::OK();
}

Status CpuBackend::expert_backward(const ExpertBackwardArgs& a) {
  threads_scope();
  const int64_t E = a.dispatched.dim(0), C = a.dispatched.dim(1), M = a.dispatched.dim(2);
  const int64_t H = a.weights.fc1_weight.dim(1), O = a.weights.fc2_weight.dim(2);
  if (C == 0) return Status::OK();  // no slots: nothing flows to the weights, d_dispatched is empty
  const float* d_out = a.d_expert_out.data_as<float>();
  const float* hidden = a.hidden.data_as<float>();
  float* d_hidden = a.d_hidden.data_as<float>();
  const DType dt = a.matmul_dtype;
  TUTEL_RETURN_IF_ERROR(check_dispatched(a.dispatched, dt, "expert_backward:"));
  if (dt == DType::kBF16) TUTEL_RETURN_IF_ERROR(a.weights.check_bf16_copies("expert_backward:"));
  const MatOperand fc1 = with_bf16_copy(row_major(a.weights.fc1_weight.data(), E, H, M),
                                        a.weights.fc1_weight_bf16, dt);
  const MatOperand fc2_t = with_bf16_copy(transposed(a.weights.fc2_weight.data(), E, H, O),
                                          a.weights.fc2_weight_bf16, dt);

  // fc2: dW2 += hᵀ·d_out, db2 += Σ_c d_out, d_hidden = d_out·W2ᵀ.
  TUTEL_RETURN_IF_ERROR(matmul(transposed(hidden, E, C, H), row_major(d_out, E, C, O),
                               a.grads.fc2_weight.data_as<float>(), {.accumulate = true}, dt, a.workspace));
  if (!a.grads.fc2_bias.empty()) accumulate_bias_grad(d_out, E, C, O, a.grads.fc2_bias.data_as<float>());
  TUTEL_RETURN_IF_ERROR(matmul(row_major(d_out, E, C, O), fc2_t, d_hidden, {}, dt, a.workspace));
  // act': in place, d_hidden becomes d_pre.
  if (a.activation == Activation::kRelu) {
    TUTEL_RETURN_IF_ERROR(dnnl_.eltwise_backward(algorithm::eltwise_relu_use_dst_for_bwd, hidden,
                                                 d_hidden, d_hidden, E * C * H));
  } else {
    TUTEL_RETURN_IF_ERROR(dnnl_.eltwise_backward(eltwise_of(a.activation), a.pre_activation.data_as<float>(),
                                                 d_hidden, d_hidden, E * C * H));
  }
  // fc1: dW1 += d_preᵀ·disp, db1 += Σ_c d_pre, d_disp = d_pre·W1.
  TUTEL_RETURN_IF_ERROR(matmul(transposed(d_hidden, E, C, H), dispatched_operand(a.dispatched, E, C, M),
                               a.grads.fc1_weight.data_as<float>(), {.accumulate = true}, dt, a.workspace));
  if (!a.grads.fc1_bias.empty()) accumulate_bias_grad(d_hidden, E, C, H, a.grads.fc1_bias.data_as<float>());
  return matmul(row_major(d_hidden, E, C, H), fc1, a.d_dispatched.data_as<float>(), {}, dt,
                a.workspace);
}

Status CpuBackend::sgd_step(const SgdArgs& a) {
  threads_scope();
  return cpu::sgd_step(a);
}

Status CpuBackend::adamw_step(const AdamWArgs& a) {
  threads_scope();
  return cpu::adamw_step(a);
}

}  // namespace

namespace {

// The processor's model as /proc/cpuinfo gives it: x86's "model name", else (Arm, which has
// none) its implementer and part numbers; "unknown processor" where it gives neither.
std::string processor_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string implementer, part;
  for (std::string line; std::getline(cpuinfo, line);) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    const size_t begin = line.find_first_not_of(" \t", colon + 1);
    const std::string value = begin == std::string::npos ? "" : line.substr(begin);
    if (key == "model name" && !value.empty()) return value;
    if (key == "CPU implementer" && implementer.empty()) implementer = value;
    if (key == "CPU part" && part.empty()) part = value;
  }
  if (!implementer.empty() || !part.empty()) return "implementer " + implementer + " part " + part;
  return "unknown processor";
}

}  // namespace

Result<std::unique_ptr<Backend>> make_cpu_backend(const BackendOptions& options) {
  if (options.threads < 0) return Status::InvalidArgument("threads must be >= 0 (0 = all cores)");
  int threads = options.threads;
  if (threads == 0) threads = std::max(1, omp_get_num_procs());
  return std::unique_ptr<Backend>(new CpuBackend(threads, processor_model()));
}

}  // namespace tutel::cpu
