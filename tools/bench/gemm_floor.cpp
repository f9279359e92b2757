#include "gemm_floor.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#include <cstddef>
#include <random>
#include <vector>

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
    auto md = [&](int64_t batch, int64_t rows, int64_t cols, bool transposed, memory::data_type t) {
      return transposed ? memory::desc({batch, rows, cols}, t, {rows * cols, 1, rows})
                        : memory::desc({batch, rows, cols}, t, {rows * cols, cols, 1});
    };
    // The floor is the best oneDNN does for the step: one batched call, or one 2-D call per
    // expert (what the layer runs when a bias is fused), whichever is faster.
    double best = 0;
    for (const int64_t per_call : {g.batch, int64_t{1}}) {
      const memory::desc a_md = md(per_call, g.m, g.k, g.a_transposed, in_type);
      const memory::desc b_md = md(per_call, g.k, g.n, g.b_transposed, in_type);
      const memory::desc c_md = md(per_call, g.m, g.n, false, memory::data_type::f32);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), engine);
      const dnnl::matmul prim(pd);
      std::vector<memory> a, b, c;
      for (int64_t i = 0; i < g.batch / per_call; ++i) {
        a.emplace_back(a_md, engine);
        b.emplace_back(b_md, engine);
        c.emplace_back(c_md, engine);
        // Small ordinary numbers, so the timing is not of denormals or zeros.
        for (memory* mem : {&a.back(), &b.back()}) {
          const size_t n = mem->get_desc().get_size();
          auto* bytes = static_cast<uint8_t*>(mem->get_data_handle());
          std::mt19937 rng(7);
          for (size_t j = 0; j < n; ++j) bytes[j] = (j % 2) ? 0x3c : static_cast<uint8_t>(rng());
        }
      }
      const double secs = median_seconds(1, repeats, [&] {
        for (size_t i = 0; i < a.size(); ++i)
          prim.execute(stream, {{DNNL_ARG_SRC, a[i]}, {DNNL_ARG_WEIGHTS, b[i]}, {DNNL_ARG_DST, c[i]}});
        stream.wait();
      });
      if (best == 0 || secs < best) best = secs;
    }
    total.flops += g.flops();
    total.seconds += best;
  }
  return total;
}

}  // namespace tutel::bench
