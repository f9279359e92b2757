// A thin wrapper over oneDNN's batched matmul for the CPU backend:
// dst[b] (+)= act(A[b]·B[b] + bias[b]), any strides, f32 or bf16 inputs, f32 output.
// It keeps the primitives it makes: at decode sizes making one costs about as much as running it
// (docs/decisions.md, "oneDNN primitives are made once per shape").
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::cpu {

// One operand: a batch of matrices [batch, rows, cols] with element strides.
struct MatOperand {
  const void* data = nullptr;
  dnnl::memory::dims dims;     // {batch, rows, cols}
  dnnl::memory::dims strides;  // in elements
  dnnl::memory::data_type type = dnnl::memory::data_type::f32;
};

// [batch, rows, cols] row-major.
inline MatOperand row_major(const void* data, int64_t batch, int64_t rows, int64_t cols) {
  return {data, {batch, rows, cols}, {rows * cols, cols, 1}};
}
// The transpose of a row-major [batch, rows, cols] buffer, seen as [batch, cols, rows].
inline MatOperand transposed(const void* data, int64_t batch, int64_t rows, int64_t cols) {
  return {data, {batch, cols, rows}, {rows * cols, 1, cols}};
}

struct MatmulOptions {
  const float* bias = nullptr;  // [batch, cols of dst], broadcast over rows
  bool accumulate = false;      // dst += result instead of dst = result
  std::optional<dnnl::algorithm> activation;  // eltwise post-op
  // Per batch entry, whether it is computed: an entry whose value is 0 is skipped, its dst left
  // as it was (an expert no token was routed to). Null: every entry is.
  const int32_t* entry_in_use = nullptr;
};

// Everything that decides which primitive a call gets. oneDNN's own cache keys a primitive by its
// descriptor (dims, strides, dtypes), its attributes (post-ops; the scratchpad mode, always user
// here) and the thread count; the engine is the wrapper's own. A biased matmul's key also holds
// the batch and batch strides, which only its loop uses: a finer key, never a wrong hit. (A
// per-entry matmul is made for one entry; its key holds the batch and batch strides likewise.)
struct PrimitiveKey {
  // kMatmul: one batched call; kPerEntryMatmul: one 2-D call per batch entry (a bias per entry,
  // or entries skipped).
  enum class Kind : uint8_t { kMatmul, kPerEntryMatmul, kEltwiseForward, kEltwiseBackward };
  Kind kind = Kind::kMatmul;
  int threads = 0;  // omp_get_max_threads() where the primitive is made: oneDNN splits work by it
  bool accumulate = false;
  bool has_bias = false;
  bool has_activation = false;
  dnnl::algorithm activation = dnnl::algorithm::undef;  // the post-op, or the eltwise algorithm
  dnnl::memory::data_type a_type = dnnl::memory::data_type::undef;
  dnnl::memory::data_type b_type = dnnl::memory::data_type::undef;
  std::array<int64_t, 12> shape{};  // matmul: a dims, a strides, b dims, b strides; eltwise: {n}

  bool operator==(const PrimitiveKey&) const = default;
};

struct PrimitiveKeyHash {
  size_t operator()(const PrimitiveKey& key) const;
};

// A primitive with its memory objects, made once per key. A call sets every data handle (the
// buffers change between calls) and executes with `args`, which point at `memories`.
struct CachedPrimitive {
  dnnl::primitive primitive;
  std::vector<dnnl::memory> memories;  // in the order execute() takes its buffers
  std::vector<dnnl_exec_arg_t> args;
  size_t scratchpad_bytes = 0;  // the last memory is the scratchpad when nonzero

  // Points memories[i] at data[i] (the scratchpad last, when there is one) and executes.
  void execute(const dnnl::stream& stream, std::span<void* const> data) const;
};

// The least recently used entry goes first once `capacity` are held. Not thread-safe: it
// belongs to one OneDnnMatmul, used by one thread at a time like the backend that owns it.
class PrimitiveCache {
 public:
  explicit PrimitiveCache(size_t capacity) : capacity_(capacity) {}
  // The entry for `key`, now the most recently used; null when there is none.
  const CachedPrimitive* find(const PrimitiveKey& key);
  const CachedPrimitive& insert(const PrimitiveKey& key, CachedPrimitive entry);
  size_t size() const { return index_.size(); }

 private:
  using Entries = std::list<std::pair<PrimitiveKey, CachedPrimitive>>;
  size_t capacity_;
  Entries entries_;  // most recently used first
  std::unordered_map<PrimitiveKey, Entries::iterator, PrimitiveKeyHash> index_;
};

// Thread-safety: one thread at a time (its primitives share one scratchpad and one stream); any
// thread, since no primitive keeps oneDNN's thread-local scratchpad (scratchpad_mode::user).
class OneDnnMatmul {
 public:
  // The primitives kept at once: a layer's request makes up to ~11 (gate, experts, backward),
  // one set per token bucket and layer.
  static constexpr size_t kMaxCachedPrimitives = 128;

  OneDnnMatmul();
  // dst: row-major f32 [batch, a.rows, b.cols].
  Status run(const MatOperand& a, const MatOperand& b, float* dst, const MatmulOptions& options);
  // Elementwise forward (training) of `alg` over n floats: dst = act(src).
  Status eltwise_forward(dnnl::algorithm alg, const float* src, float* dst, int64_t n);
  // Elementwise backward: diff_src = diff_dst · act'(data) where data is src (or dst for the
  // *_use_dst_for_bwd algorithms). In place is allowed (diff_src == diff_dst).
  Status eltwise_backward(dnnl::algorithm alg, const float* data, const float* diff_dst,
                          float* diff_src, int64_t n);

  size_t cached_primitives() const { return cache_.size(); }

 private:
  // The cached primitive for `key`, made by `make()` on a miss.
  template <typename Make>
  const CachedPrimitive& primitive(const PrimitiveKey& key, Make&& make);
  // per_entry: a 2-D primitive run once per batch entry (PrimitiveKey::Kind::kPerEntryMatmul).
  CachedPrimitive make_matmul(const MatOperand& a, const MatOperand& b, const MatmulOptions& options,
                              bool per_entry) const;
  // The scratchpad every primitive shares, grown to `bytes` when smaller; null for 0 bytes.
  void* scratchpad(size_t bytes);

  dnnl::engine engine_;
  dnnl::stream stream_;
  PrimitiveCache cache_;
  // Bytes, owned by oneDNN; replaced as it grows, never shrunk: it stays the size of the largest
  // primitive's need for the wrapper's (the backend's) life.
  dnnl::memory scratchpad_;
  size_t scratchpad_bytes_ = 0;
};

}  // namespace tutel::cpu
