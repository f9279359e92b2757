#include "cpu/onednn_matmul.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <string>

namespace tutel::cpu {

using dnnl::memory;

namespace {

memory::desc desc_of(const MatOperand& m) { return memory::desc(m.dims, m.type, m.strides); }

// swish is x·sigmoid(αx): α = 1 gives silu. For relu α is the negative slope: 0.
float eltwise_alpha(dnnl::algorithm alg) { return alg == dnnl::algorithm::eltwise_swish ? 1.f : 0.f; }

Status dnnl_failure(const char* what, const dnnl::error& e) {
  return Status::Internal(std::string("oneDNN ") + what + " failed: " + e.what() +
                          " (status " + std::to_string(static_cast<int>(e.status)) + ")");
}

// A cached primitive outlives the call and may next run on another thread: it must not hold
// oneDNN's thread-local library scratchpad, so every primitive here takes ours.
dnnl::primitive_attr user_scratchpad_attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Memory objects without buffers for `descs` (and the scratchpad of `pd`, when it has one),
// with the argument list that names them.
template <typename PrimitiveDesc>
CachedPrimitive with_memories(dnnl::primitive primitive, const PrimitiveDesc& pd,
                              const dnnl::engine& engine,
                              std::initializer_list<std::pair<int, memory::desc>> descs) {
  CachedPrimitive out;
  out.primitive = std::move(primitive);
  std::vector<int> arg_ids;
  for (const auto& [arg, md] : descs) {
    out.memories.emplace_back(md, engine, nullptr);
    arg_ids.push_back(arg);
  }
  out.scratchpad_bytes = pd.scratchpad_desc().get_size();
  if (out.scratchpad_bytes) {
    out.memories.emplace_back(pd.scratchpad_desc(), engine, nullptr);
    arg_ids.push_back(DNNL_ARG_SCRATCHPAD);
  }
  for (size_t i = 0; i < out.memories.size(); ++i)
    out.args.push_back({arg_ids[i], out.memories[i].get()});
  return out;
}

void set_matrix(std::array<int64_t, 12>& shape, size_t at, const MatOperand& m) {
  assert(m.dims.size() == 3 && m.strides.size() == 3);
  std::copy(m.dims.begin(), m.dims.end(), shape.begin() + at);
  std::copy(m.strides.begin(), m.strides.end(), shape.begin() + at + 3);
}

// The key of an eltwise primitive of `alg` over n f32 values.
PrimitiveKey eltwise_key(PrimitiveKey::Kind kind, dnnl::algorithm alg, int64_t n) {
  PrimitiveKey key;
  key.kind = kind;
  key.threads = omp_get_max_threads();
  key.has_activation = true;
  key.activation = alg;
  key.shape[0] = n;
  return key;
}

}  // namespace

size_t PrimitiveKeyHash::operator()(const PrimitiveKey& key) const {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
  mix(static_cast<uint64_t>(key.kind));
  mix(static_cast<uint64_t>(key.threads));
  mix(key.accumulate);
  mix(key.has_bias);
  mix(key.has_activation);
  mix(static_cast<uint64_t>(key.activation));
  mix(static_cast<uint64_t>(key.a_type));
  mix(static_cast<uint64_t>(key.b_type));
  for (int64_t v : key.shape) mix(static_cast<uint64_t>(v));
  return static_cast<size_t>(h);
}

void CachedPrimitive::execute(const dnnl::stream& stream, std::span<void* const> data) const {
  assert(data.size() == memories.size());
  for (size_t i = 0; i < memories.size(); ++i) memories[i].set_data_handle(data[i]);
  // The C call takes `args` as they are; the C++ execute() would copy a map into a new vector.
  dnnl::error::wrap_c_api(dnnl_primitive_execute(primitive.get(), stream.get(),
                                                 static_cast<int>(args.size()), args.data()),
                          "could not execute a primitive");
}

const CachedPrimitive* PrimitiveCache::find(const PrimitiveKey& key) {
  const auto it = index_.find(key);
  if (it == index_.end()) return nullptr;
  entries_.splice(entries_.begin(), entries_, it->second);
  return &it->second->second;
}

const CachedPrimitive& PrimitiveCache::insert(const PrimitiveKey& key, CachedPrimitive entry) {
  assert(!index_.contains(key));
  entries_.emplace_front(key, std::move(entry));
  try {
    index_[key] = entries_.begin();
  } catch (...) {  // no entry the index does not know: its eviction would erase another's key
    entries_.pop_front();
    throw;
  }
  while (entries_.size() > capacity_) {
    index_.erase(entries_.back().first);
    entries_.pop_back();
  }
  return entries_.front().second;
}

OneDnnMatmul::OneDnnMatmul()
    : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_), cache_(kMaxCachedPrimitives) {}

template <typename Make>
const CachedPrimitive& OneDnnMatmul::primitive(const PrimitiveKey& key, Make&& make) {
  if (const CachedPrimitive* hit = cache_.find(key)) return *hit;
  return cache_.insert(key, make());
}

void* OneDnnMatmul::scratchpad(size_t bytes) {
  if (bytes == 0) return nullptr;
  if (bytes > scratchpad_bytes_) {
    scratchpad_ = memory(memory::desc({static_cast<memory::dim>(bytes)}, memory::data_type::u8,
                                      memory::format_tag::a),
                         engine_);
    scratchpad_bytes_ = bytes;
  }
  return scratchpad_.get_data_handle();
}

CachedPrimitive OneDnnMatmul::make_matmul(const MatOperand& a, const MatOperand& b,
                                          const MatmulOptions& options, bool per_entry) const {
  const int64_t batch = a.dims[0], rows = a.dims[1], cols = b.dims[2];
  dnnl::post_ops ops;
  if (options.accumulate) ops.append_sum(1.0f);
  if (options.activation)
    ops.append_eltwise(1.0f, *options.activation, eltwise_alpha(*options.activation), 0.f);
  dnnl::primitive_attr attr = user_scratchpad_attr();
  attr.set_post_ops(ops);
  if (!per_entry) {
    assert(!options.bias);
    const memory::desc a_md = desc_of(a), b_md = desc_of(b);
    const memory::desc dst_md({batch, rows, cols}, memory::data_type::f32, {rows * cols, cols, 1});
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, dst_md), attr, engine_);
    return with_memories(dnnl::matmul(pd), pd, engine_,
                         {{DNNL_ARG_SRC, a_md}, {DNNL_ARG_WEIGHTS, b_md}, {DNNL_ARG_DST, dst_md}});
  }
  // A bias that differs per batch entry sends oneDNN 2.6 to its reference kernel (~1000x
  // slower), so one 2-D matmul runs per entry, each with its own bias row; so it does where
  // entries are skipped.
  auto matrix = [](const MatOperand& m) {
    return memory::desc({m.dims[1], m.dims[2]}, m.type, {m.strides[1], m.strides[2]});
  };
  const memory::desc a_md = matrix(a), b_md = matrix(b);
  const memory::desc dst_md({rows, cols}, memory::data_type::f32, {cols, 1});
  if (!options.bias) {
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, dst_md), attr, engine_);
    return with_memories(dnnl::matmul(pd), pd, engine_,
                         {{DNNL_ARG_SRC, a_md}, {DNNL_ARG_WEIGHTS, b_md}, {DNNL_ARG_DST, dst_md}});
  }
  const memory::desc bias_md({1, cols}, memory::data_type::f32, {cols, 1});
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, bias_md, dst_md), attr,
                                        engine_);
  return with_memories(dnnl::matmul(pd), pd, engine_,
                       {{DNNL_ARG_SRC, a_md},
                        {DNNL_ARG_WEIGHTS, b_md},
                        {DNNL_ARG_DST, dst_md},
                        {DNNL_ARG_BIAS, bias_md}});
}

Status OneDnnMatmul::run(const MatOperand& a, const MatOperand& b, float* dst,
                         const MatmulOptions& options) {
  const int64_t batch = a.dims[0], rows = a.dims[1], cols = b.dims[2];
  if (batch == 0 || rows == 0 || cols == 0) return Status::OK();
  if (a.dims[2] == 0) {  // empty inner dimension (no tokens): the product is zero
    if (options.accumulate) return Status::OK();
    if (options.bias || options.activation)
      return Status::Unimplemented("matmul with an empty inner dimension and a bias or activation");
    std::fill(dst, dst + batch * rows * cols, 0.f);
    return Status::OK();
  }
  const int32_t* in_use = options.entry_in_use;
  const bool skips = in_use && std::find(in_use, in_use + batch, 0) != in_use + batch;
  const bool per_entry = options.bias || skips;
  PrimitiveKey key;
  key.kind = per_entry ? PrimitiveKey::Kind::kPerEntryMatmul : PrimitiveKey::Kind::kMatmul;
  key.has_bias = options.bias != nullptr;
  key.threads = omp_get_max_threads();
  key.accumulate = options.accumulate;
  key.has_activation = options.activation.has_value();
  key.activation = options.activation.value_or(dnnl::algorithm::undef);
  key.a_type = a.type;
  key.b_type = b.type;
  set_matrix(key.shape, 0, a);
  set_matrix(key.shape, 6, b);
  try {
    const CachedPrimitive& prim =
        primitive(key, [&] { return make_matmul(a, b, options, per_entry); });
    void* const scratch = scratchpad(prim.scratchpad_bytes);
    auto* const a_data = const_cast<char*>(static_cast<const char*>(a.data));
    auto* const b_data = const_cast<char*>(static_cast<const char*>(b.data));
    if (!per_entry) {
      void* const data[] = {a_data, b_data, dst, scratch};
      prim.execute(stream_, std::span(data, prim.memories.size()));
    } else {
      const size_t a_step = a.strides[0] * memory::data_type_size(a.type);
      const size_t b_step = b.strides[0] * memory::data_type_size(b.type);
      for (int64_t i = 0; i < batch; ++i) {
        if (in_use && in_use[i] == 0) continue;
        // In the order of make_matmul's memories: src, weights, dst, bias if any, scratchpad.
        std::array<void*, 5> data{a_data + i * a_step, b_data + i * b_step, dst + i * rows * cols};
        size_t n = 3;
        if (options.bias) data[n++] = const_cast<float*>(options.bias) + i * cols;
        data[n] = scratch;
        prim.execute(stream_, std::span(data.data(), prim.memories.size()));
      }
    }
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("matmul", e);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of host memory making a oneDNN matmul primitive");
  }
  return Status::OK();
}

Status OneDnnMatmul::eltwise_forward(dnnl::algorithm alg, const float* src, float* dst, int64_t n) {
  if (n == 0) return Status::OK();
  const PrimitiveKey key = eltwise_key(PrimitiveKey::Kind::kEltwiseForward, alg, n);
  try {
    const CachedPrimitive& prim = primitive(key, [&] {
      const memory::desc md({n}, memory::data_type::f32, memory::format_tag::a);
      const dnnl::eltwise_forward::desc desc(dnnl::prop_kind::forward_training, alg, md,
                                             eltwise_alpha(alg), 0.f);
      const dnnl::eltwise_forward::primitive_desc pd(desc, user_scratchpad_attr(), engine_);
      return with_memories(dnnl::eltwise_forward(pd), pd, engine_,
                           {{DNNL_ARG_SRC, md}, {DNNL_ARG_DST, md}});
    });
    void* const data[] = {const_cast<float*>(src), dst, scratchpad(prim.scratchpad_bytes)};
    prim.execute(stream_, std::span(data, prim.memories.size()));
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("eltwise forward", e);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of host memory making a oneDNN eltwise forward primitive");
  }
  return Status::OK();
}

Status OneDnnMatmul::eltwise_backward(dnnl::algorithm alg, const float* data, const float* diff_dst,
                                      float* diff_src, int64_t n) {
  if (n == 0) return Status::OK();
  const PrimitiveKey key = eltwise_key(PrimitiveKey::Kind::kEltwiseBackward, alg, n);
  const bool use_dst = alg == dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
  try {
    const CachedPrimitive& prim = primitive(key, [&] {
      const memory::desc md({n}, memory::data_type::f32, memory::format_tag::a);
      const dnnl::eltwise_forward::desc fwd_desc(dnnl::prop_kind::forward_training, alg, md,
                                                 eltwise_alpha(alg), 0.f);
      const dnnl::eltwise_forward::primitive_desc fwd_pd(fwd_desc, engine_);
      const dnnl::eltwise_backward::desc desc(alg, md, md, eltwise_alpha(alg), 0.f);
      const dnnl::eltwise_backward::primitive_desc pd(desc, user_scratchpad_attr(), engine_,
                                                      fwd_pd);
      return with_memories(dnnl::eltwise_backward(pd), pd, engine_,
                           {{use_dst ? DNNL_ARG_DST : DNNL_ARG_SRC, md},
                            {DNNL_ARG_DIFF_DST, md},
                            {DNNL_ARG_DIFF_SRC, md}});
    });
    void* const buffers[] = {const_cast<float*>(data), const_cast<float*>(diff_dst), diff_src,
                             scratchpad(prim.scratchpad_bytes)};
    prim.execute(stream_, std::span(buffers, prim.memories.size()));
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("eltwise backward", e);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of host memory making a oneDNN eltwise backward primitive");
  }
  return Status::OK();
}

}  // namespace tutel::cpu
