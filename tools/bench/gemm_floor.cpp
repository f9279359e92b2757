#include "gemm_floor.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#include <random>

#include "bench_util.hpp"

namespace tutel::bench {

std::vector<GemmShape> expert_forward_gemms(int64_t E, int64_t C, int64_t M, int64_t H, int64_t O) {
  return {{"fc1 [E,C,M]x[E,M,H]", E, C, M, H, false, true},
          {"fc2 [E,C,H]x[E,H,O]", E, C, H, O, false, false}};
}

std::vector<GemmShape> expert_backward_gemms(int64_t E, int64_t C, int64_t M, int64_t H, int64_t O) {
  return {{"dW2 hᵀ·dY", E, H, C, O, true, false},
          {"dH dY·W2ᵀ", E, C, O, H, false, true},
          {"dW1 dPᵀ·X", E, H, C, M, true, false},
          {"dX dP·W1", E, C, H, M, false, false}};
}

GemmTiming time_gemms(const std::vector<GemmShape>& gemms, bool bf16, int repeats) {
  using dnnl::memory;
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const auto in_type = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  GemmTiming total;
  for (const GemmShape& g : gemms) {
    // Row-major [batch, rows, cols] or its transpose, as the layer stores them.
    auto md = [&](int64_t rows, int64_t cols, bool transposed, memory::data_type t) {
      return transposed ? memory::desc({g.batch, rows, cols}, t, {rows * cols, 1, rows})
                        : memory::desc({g.batch, rows, cols}, t, {rows * cols, cols, 1});
    };
    const memory::desc a_md = md(g.m, g.k, g.a_transposed, in_type);
    const memory::desc b_md = md(g.k, g.n, g.b_transposed, in_type);
    const memory::desc c_md = md(g.m, g.n, false, memory::data_type::f32);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), engine);
    const dnnl::matmul prim(pd);
    memory a(a_md, engine), b(b_md, engine), c(c_md, engine);
    // Fill with small values so the timing is of ordinary numbers, not denormals or zeros.
    for (memory* mem : {&a, &b}) {
      auto* bytes = static_cast<uint8_t*>(mem->get_data_handle());
      const size_t n = mem->get_desc().get_size();
      std::mt19937 rng(7);
      for (size_t i = 0; i < n; ++i) bytes[i] = (i % 2) ? 0x3c : static_cast<uint8_t>(rng());
    }
    const double s = median_seconds(1, repeats, [&] {
      prim.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream.wait();
    });
    total.flops += g.flops();
    total.seconds += s;
  }
  return total;
}

}  // namespace tutel::bench
