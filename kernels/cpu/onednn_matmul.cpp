#include "cpu/onednn_matmul.hpp"

#include <algorithm>
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
    const memory::desc dst_md({batch, rows, cols}, memory::data_type::f32, {rows * cols, cols, 1});
    dnnl::post_ops ops;
    if (options.accumulate) ops.append_sum(1.0f);
    if (options.activation) ops.append_eltwise(1.0f, *options.activation, eltwise_alpha(*options.activation), 0.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    const memory::desc bias_md({batch, 1, cols}, memory::data_type::f32, {cols, cols, 1});
    const dnnl::matmul::desc desc = options.bias
        ? dnnl::matmul::desc(desc_of(a), desc_of(b), bias_md, dst_md)
        : dnnl::matmul::desc(desc_of(a), desc_of(b), dst_md);
    // oneDNN's primitive cache makes re-creating the same primitive cheap.
    const dnnl::matmul::primitive_desc pd(desc, attr, engine_);
    const dnnl::matmul prim(pd);
    memory a_mem(desc_of(a), engine_, const_cast<void*>(a.data));
    memory b_mem(desc_of(b), engine_, const_cast<void*>(b.data));
    memory dst_mem(dst_md, engine_, dst);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, dst_mem}};
    if (options.bias) args.emplace(DNNL_ARG_BIAS, memory(bias_md, engine_, const_cast<float*>(options.bias)));
    prim.execute(stream_, args);
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
