#include "cpu/onednn_matmul.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

namespace tutel::cpu {

using dnnl::memory;

OneDnnMatmul::OneDnnMatmul() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {}

namespace {

memory::desc desc_of(const MatOperand& m) { return memory::desc(m.dims, m.type, m.strides); }

// swish is x·sigmoid(αx): α = 1 gives silu. For relu α is the negative slope: 0.
float eltwise_alpha(dnnl::algorithm alg) { return alg == dnnl::algorithm::eltwise_swish ? 1.f : 0.f; }

Status dnnl_failure(const char* what, const dnnl::error& e) {
  return Status::Internal(std::string("oneDNN ") + what + " failed: " + e.what() +
                          " (status " + std::to_string(static_cast<int>(e.status)) + ")");
}

}  // namespace

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
  try {
    dnnl::post_ops ops;
    if (options.accumulate) ops.append_sum(1.0f);
    if (options.activation) ops.append_eltwise(1.0f, *options.activation, eltwise_alpha(*options.activation), 0.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    if (!options.bias) {
      const memory::desc dst_md({batch, rows, cols}, memory::data_type::f32, {rows * cols, cols, 1});
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(desc_of(a), desc_of(b), dst_md), attr, engine_);
      // oneDNN's primitive cache makes re-creating the same primitive cheap.
      dnnl::matmul(pd).execute(stream_, {{DNNL_ARG_SRC, memory(desc_of(a), engine_, const_cast<void*>(a.data))},
                                         {DNNL_ARG_WEIGHTS, memory(desc_of(b), engine_, const_cast<void*>(b.data))},
                                         {DNNL_ARG_DST, memory(dst_md, engine_, dst)}});
      stream_.wait();
      return Status::OK();
    }
    // A bias that differs per batch entry sends oneDNN 2.6 to its reference kernel (~1000x
    // slower), so run one 2-D matmul per entry, each with its own bias row.
    auto matrix = [](const MatOperand& m) {
      return memory::desc({m.dims[1], m.dims[2]}, m.type, {m.strides[1], m.strides[2]});
    };
    const memory::desc a_md = matrix(a), b_md = matrix(b);
    const memory::desc dst_md({rows, cols}, memory::data_type::f32, {cols, 1});
    const memory::desc bias_md({1, cols}, memory::data_type::f32, {cols, 1});
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, bias_md, dst_md), attr, engine_);
    const dnnl::matmul prim(pd);
    const size_t a_elem = memory::data_type_size(a.type), b_elem = memory::data_type_size(b.type);
    memory a_mem(a_md, engine_, nullptr), b_mem(b_md, engine_, nullptr), dst_mem(dst_md, engine_, nullptr),
        bias_mem(bias_md, engine_, nullptr);
    for (int64_t i = 0; i < batch; ++i) {
      a_mem.set_data_handle(const_cast<char*>(static_cast<const char*>(a.data)) + i * a.strides[0] * a_elem);
      b_mem.set_data_handle(const_cast<char*>(static_cast<const char*>(b.data)) + i * b.strides[0] * b_elem);
      dst_mem.set_data_handle(dst + i * rows * cols);
      bias_mem.set_data_handle(const_cast<float*>(options.bias) + i * cols);
      prim.execute(stream_, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, dst_mem},
                             {DNNL_ARG_BIAS, bias_mem}});
    }
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("matmul", e);
  }
  return Status::OK();
}

Status OneDnnMatmul::eltwise_forward(dnnl::algorithm alg, const float* src, float* dst, int64_t n) {
  if (n == 0) return Status::OK();
  try {
    const memory::desc md({n}, memory::data_type::f32, memory::format_tag::a);
    const dnnl::eltwise_forward::desc desc(dnnl::prop_kind::forward_training, alg, md, eltwise_alpha(alg), 0.f);
    const dnnl::eltwise_forward::primitive_desc pd(desc, engine_);
    dnnl::eltwise_forward(pd).execute(
        stream_, {{DNNL_ARG_SRC, memory(md, engine_, const_cast<float*>(src))},
                  {DNNL_ARG_DST, memory(md, engine_, dst)}});
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("eltwise forward", e);
  }
  return Status::OK();
}

Status OneDnnMatmul::eltwise_backward(dnnl::algorithm alg, const float* data, const float* diff_dst,
                                      float* diff_src, int64_t n) {
  if (n == 0) return Status::OK();
  try {
    const memory::desc md({n}, memory::data_type::f32, memory::format_tag::a);
    const dnnl::eltwise_forward::desc fwd_desc(dnnl::prop_kind::forward_training, alg, md, eltwise_alpha(alg), 0.f);
    const dnnl::eltwise_forward::primitive_desc fwd_pd(fwd_desc, engine_);
    const dnnl::eltwise_backward::desc desc(alg, md, md, eltwise_alpha(alg), 0.f);
    const dnnl::eltwise_backward::primitive_desc pd(desc, engine_, fwd_pd);
    const bool use_dst = alg == dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
    dnnl::eltwise_backward(pd).execute(
        stream_, {{use_dst ? DNNL_ARG_DST : DNNL_ARG_SRC, memory(md, engine_, const_cast<float*>(data))},
                  {DNNL_ARG_DIFF_DST, memory(md, engine_, const_cast<float*>(diff_dst))},
                  {DNNL_ARG_DIFF_SRC, memory(md, engine_, diff_src)}});
    stream_.wait();
  } catch (const dnnl::error& e) {
    return dnnl_failure("eltwise backward", e);
  }
  return Status::OK();
}

}  // namespace tutel::cpu
