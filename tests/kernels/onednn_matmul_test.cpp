// OneDnnMatmul's primitive cache: a cached call gives the bits of a primitive made for that call
// alone, as the wrapper made them before it cached (library scratchpad, one primitive per call),
// with new buffers on every call, after its entry was evicted, from threads other than the one
// that made it, and with several wrappers on parallel threads; the cache holds at most
// kMaxCachedPrimitives.
#include "cpu/onednn_matmul.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

namespace tutel::cpu {
namespace {

using dnnl::memory;

// One matmul call: C = act(A·B + bias) (+ C), A [batch, rows, inner], B [batch, inner, cols].
struct Case {
  int64_t batch, rows, inner, cols;
  bool a_transposed = false, b_transposed = false, bf16 = false;
  bool bias = false, accumulate = false;
  std::optional<dnnl::algorithm> activation;
};

uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>(u >> 16);  // inputs are made exactly representable
}

// The buffers of one call, filled from `seed`.
struct Buffers {
  std::vector<float> a32, b32, bias, dst;
  std::vector<uint16_t> a16, b16;

  Buffers(const Case& c, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> small(-64, 64);
    // Multiples of 1/64: exact in bf16, so both dtypes read the same numbers.
    auto fill = [&](std::vector<float>& v, size_t n) {
      v.resize(n);
      for (float& f : v) f = small(rng) / 64.f;
    };
    fill(a32, c.batch * c.rows * c.inner);
    fill(b32, c.batch * c.inner * c.cols);
    fill(bias, c.batch * c.cols);
    fill(dst, c.batch * c.rows * c.cols);
    for (float f : a32) a16.push_back(to_bf16_bits(f));
    for (float f : b32) b16.push_back(to_bf16_bits(f));
  }
  MatOperand a(const Case& c) const {
    const void* data = c.bf16 ? static_cast<const void*>(a16.data()) : a32.data();
    MatOperand m = c.a_transposed ? transposed(data, c.batch, c.inner, c.rows)
                                  : row_major(data, c.batch, c.rows, c.inner);
    m.type = c.bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    return m;
  }
  MatOperand b(const Case& c) const {
    const void* data = c.bf16 ? static_cast<const void*>(b16.data()) : b32.data();
    MatOperand m = c.b_transposed ? transposed(data, c.batch, c.cols, c.inner)
                                  : row_major(data, c.batch, c.inner, c.cols);
    m.type = c.bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    return m;
  }
};

// The call as the wrapper made it before it cached anything: a new primitive (library
// scratchpad) and new memory objects per call, one 2-D matmul per batch entry with a bias (or
// where `per_entry`, as for entries skipped), the entries in `skip` left as they were.
std::vector<float> uncached(const Case& c, const Buffers& in, bool per_entry = false,
                            const std::vector<int32_t>& skip = {}) {
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  std::vector<float> dst = in.dst;
  const MatOperand a = in.a(c), b = in.b(c);
  dnnl::post_ops ops;
  if (c.accumulate) ops.append_sum(1.0f);
  if (c.activation) ops.append_eltwise(1.0f, *c.activation, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  if (!c.bias && !per_entry) {
    const memory::desc a_md(a.dims, a.type, a.strides), b_md(b.dims, b.type, b.strides);
    const memory::desc d_md({c.batch, c.rows, c.cols}, memory::data_type::f32,
                            {c.rows * c.cols, c.cols, 1});
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, d_md), attr, engine);
    dnnl::matmul(pd).execute(stream,
                             {{DNNL_ARG_SRC, memory(a_md, engine, const_cast<void*>(a.data))},
                              {DNNL_ARG_WEIGHTS, memory(b_md, engine, const_cast<void*>(b.data))},
                              {DNNL_ARG_DST, memory(d_md, engine, dst.data())}});
    stream.wait();
    return dst;
  }
  const memory::desc a_md({c.rows, c.inner}, a.type, {a.strides[1], a.strides[2]});
  const memory::desc b_md({c.inner, c.cols}, b.type, {b.strides[1], b.strides[2]});
  const memory::desc d_md({c.rows, c.cols}, memory::data_type::f32, {c.cols, 1});
  const memory::desc bias_md({1, c.cols}, memory::data_type::f32, {c.cols, 1});
  const dnnl::matmul::primitive_desc pd =
      c.bias ? dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, bias_md, d_md), attr, engine)
             : dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, d_md), attr, engine);
  const size_t elem = c.bf16 ? 2 : 4;
  for (int64_t i = 0; i < c.batch; ++i) {
    if (i < static_cast<int64_t>(skip.size()) && skip[i] == 0) continue;
    auto at = [](const void* p, size_t bytes) {
      return const_cast<char*>(static_cast<const char*>(p)) + bytes;
    };
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(a_md, engine, at(a.data, i * a.strides[0] * elem))},
        {DNNL_ARG_WEIGHTS, memory(b_md, engine, at(b.data, i * b.strides[0] * elem))},
        {DNNL_ARG_DST, memory(d_md, engine, dst.data() + i * c.rows * c.cols)}};
    if (c.bias)
      args.emplace(DNNL_ARG_BIAS, memory(bias_md, engine, const_cast<float*>(in.bias.data()) + i * c.cols));
    dnnl::matmul(pd).execute(stream, args);
  }
  stream.wait();
  return dst;
}

std::vector<float> cached(OneDnnMatmul& mm, const Case& c, const Buffers& in,
                          const std::vector<int32_t>& in_use = {}) {
  std::vector<float> dst = in.dst;
  const Status st = mm.run(in.a(c), in.b(c), dst.data(),
                           {.bias = c.bias ? in.bias.data() : nullptr,
                            .accumulate = c.accumulate,
                            .activation = c.activation,
                            .entry_in_use = in_use.empty() ? nullptr : in_use.data()});
  EXPECT_TRUE(st.ok()) << st;
  return dst;
}

// Shapes of the layer's GEMMs (gate, fc1 with bias and relu, fc2, the backward's transposed and
// accumulating ones), in f32 and bf16, plus an odd one.
std::vector<Case> cases() {
  std::vector<Case> out;
  for (bool bf16 : {false, true}) {
    out.push_back(
        {.batch = 1, .rows = 3, .inner = 64, .cols = 8, .b_transposed = true, .bf16 = bf16});
    for (dnnl::algorithm fc1_activation : {dnnl::algorithm::eltwise_relu, dnnl::algorithm::eltwise_gelu_erf})
      out.push_back({.batch = 4,
                     .rows = 5,
                     .inner = 64,
                     .cols = 96,
                     .b_transposed = true,
                     .bf16 = bf16,
                     .bias = true,
                     .activation = fc1_activation});
    out.push_back({.batch = 4, .rows = 5, .inner = 96, .cols = 64, .bf16 = bf16, .bias = true});
    out.push_back({.batch = 4,
                   .rows = 96,
                   .inner = 5,
                   .cols = 64,
                   .a_transposed = true,
                   .bf16 = bf16,
                   .accumulate = true});
  }
  out.push_back({.batch = 3,
                 .rows = 17,
                 .inner = 33,
                 .cols = 29,
                 .a_transposed = true,
                 .b_transposed = true});
  return out;
}

void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                      const char* what) {
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << what;
}

class OneDnnMatmulCache : public ::testing::Test {
 protected:
  void SetUp() override { omp_set_num_threads(2); }
};

TEST_F(OneDnnMatmulCache, CachedCallsGiveTheUncachedBitsWithNewBuffersEachCall) {
  OneDnnMatmul mm;
  const std::vector<Case> all = cases();
  for (int round = 0; round < 3; ++round) {
    for (size_t i = 0; i < all.size(); ++i) {
      SCOPED_TRACE(testing::Message() << "round " << round << " case " << i);
      const Buffers in(all[i], 1000 * round + static_cast<uint32_t>(i));  // new buffers, new data
      expect_same_bits(cached(mm, all[i], in), uncached(all[i], in), "matmul");
    }
  }
  EXPECT_EQ(mm.cached_primitives(), all.size());
}

// Entries not in use (an expert no token reached) are left as they were; the others get the bits
// of one 2-D matmul per entry. Where every entry is in use, the call is the one without the list.
TEST_F(OneDnnMatmulCache, EntriesNotInUseAreSkipped) {
  OneDnnMatmul mm;
  for (const Case& c : cases()) {
    if (c.batch < 3) continue;
    for (uint32_t round = 0; round < 2; ++round) {  // the second from the cache
      SCOPED_TRACE(::testing::Message() << "batch " << c.batch << ", bias " << c.bias << ", bf16 " << c.bf16
                                        << ", accumulate " << c.accumulate << ", round " << round);
      const Buffers in(c, 77 + round);
      std::vector<int32_t> in_use(c.batch, 5);
      in_use[1] = 0;
      in_use[c.batch - 1] = 0;
      const std::vector<float> got = cached(mm, c, in, in_use);
      expect_same_bits(got, uncached(c, in, /*per_entry=*/true, in_use), "entries skipped");
      for (int64_t i = c.rows * c.cols; i < 2 * c.rows * c.cols; ++i) ASSERT_EQ(got[i], in.dst[i]);
      const std::vector<int32_t> all_in_use(c.batch, 1);
      expect_same_bits(cached(mm, c, in, all_in_use), uncached(c, in), "every entry in use");
    }
  }
}

TEST_F(OneDnnMatmulCache, EltwiseCachedCallsGiveTheUncachedBits) {
  OneDnnMatmul mm;
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const int64_t n = 1000;
  for (int round = 0; round < 2; ++round) {
    for (dnnl::algorithm alg :
         {dnnl::algorithm::eltwise_gelu_erf, dnnl::algorithm::eltwise_swish}) {
      std::mt19937 rng(round);
      std::normal_distribution<float> normal;
      std::vector<float> src(n), diff(n);
      for (float& f : src) f = normal(rng);
      for (float& f : diff) f = normal(rng);
      const float alpha = alg == dnnl::algorithm::eltwise_swish ? 1.f : 0.f;
      const memory::desc md({n}, memory::data_type::f32, memory::format_tag::a);
      const dnnl::eltwise_forward::primitive_desc fwd_pd(
          dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, alg, md, alpha, 0.f),
          engine);
      std::vector<float> want(n), got(n);
      dnnl::eltwise_forward(fwd_pd).execute(stream,
                                            {{DNNL_ARG_SRC, memory(md, engine, src.data())},
                                             {DNNL_ARG_DST, memory(md, engine, want.data())}});
      stream.wait();
      ASSERT_TRUE(mm.eltwise_forward(alg, src.data(), got.data(), n).ok());
      expect_same_bits(got, want, "eltwise forward");

      const dnnl::eltwise_backward::primitive_desc bwd_pd(
          dnnl::eltwise_backward::desc(alg, md, md, alpha, 0.f), engine, fwd_pd);
      std::vector<float> want_diff(n), got_diff = diff;
      dnnl::eltwise_backward(bwd_pd).execute(
          stream, {{DNNL_ARG_SRC, memory(md, engine, src.data())},
                   {DNNL_ARG_DIFF_DST, memory(md, engine, diff.data())},
                   {DNNL_ARG_DIFF_SRC, memory(md, engine, want_diff.data())}});
      stream.wait();
      ASSERT_TRUE(mm.eltwise_backward(alg, src.data(), got_diff.data(), got_diff.data(), n)
                      .ok());  // in place
      expect_same_bits(got_diff, want_diff, "eltwise backward");
    }
  }
  EXPECT_EQ(mm.cached_primitives(), 4u);
}

TEST_F(OneDnnMatmulCache, StaysBoundedAndRemakesAnEvictedPrimitive) {
  OneDnnMatmul mm;
  const size_t shapes = OneDnnMatmul::kMaxCachedPrimitives + 8;
  auto nth = [](size_t i) {
    return Case{.batch = 1,
                .rows = static_cast<int64_t>(i) + 1,
                .inner = 16,
                .cols = 8,
                .b_transposed = true};
  };
  for (size_t i = 0; i < shapes; ++i) {
    const Buffers in(nth(i), static_cast<uint32_t>(i));
    expect_same_bits(cached(mm, nth(i), in), uncached(nth(i), in), "filling");
  }
  EXPECT_EQ(mm.cached_primitives(), OneDnnMatmul::kMaxCachedPrimitives);
  const Buffers in(nth(0), 7);  // the least recently used: evicted, made again
  expect_same_bits(cached(mm, nth(0), in), uncached(nth(0), in), "after eviction");
  EXPECT_EQ(mm.cached_primitives(), OneDnnMatmul::kMaxCachedPrimitives);
}

// The daemon may hand a backend to another thread: primitives made on one thread run on others.
TEST_F(OneDnnMatmulCache, RunsOnThreadsOtherThanTheOneThatMadeItsPrimitives) {
  OneDnnMatmul mm;
  const std::vector<Case> all = cases();
  for (uint32_t turn = 0; turn < 3; ++turn) {
    std::thread([&] {
      omp_set_num_threads(2);
      for (size_t i = 0; i < all.size(); ++i) {
        const Buffers in(all[i], 100 * turn + static_cast<uint32_t>(i));
        expect_same_bits(cached(mm, all[i], in), uncached(all[i], in), "other thread");
      }
    }).join();
  }
  EXPECT_EQ(mm.cached_primitives(), all.size());
}

TEST_F(OneDnnMatmulCache, WrappersOnParallelThreadsKeepTheirOwnBits) {
  const std::vector<Case> all = cases();
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&all, t] {
      omp_set_num_threads(1 + t % 2);
      OneDnnMatmul mm;
      for (int round = 0; round < 4; ++round) {
        for (size_t i = 0; i < all.size(); ++i) {
          const Buffers in(all[i], 10000 * t + 100 * round + static_cast<uint32_t>(i));
          expect_same_bits(cached(mm, all[i], in), uncached(all[i], in), "parallel wrappers");
        }
      }
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace
}  // namespace tutel::cpu
