// The CUDA backend's small f32 ops (Backend::add, add_row_bias, add_column_sums) against the
// CPU backend on identical random inputs (skipped without a device). add and add_row_bias round
// once per element on both backends: identical bits. add_column_sums sums fixed blocks of rows
// on the GPU and row after row on the CPU: rtol 1e-5, atol 1e-5 (of max|cpu|), and the same
// bits from run to run. add_sum_squares sums fixed blocks in double on the GPU, 8 squares per
// f32 lane first on the CPU (each within 9 · 2^-24 of the exact sum): rtol 1e-6, and the same
// bits from run to run; scale rounds once per element on both:
// identical bits. Malformed arguments are refused as on the CPU, before any launch.
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "cuda_test_util.hpp"

namespace tutel::testing {
namespace {

class CudaElementwiseOps : public CpuAndCudaTest {
 protected:

  std::vector<float> normal(size_t n, double scale) { return to_f32(randn(rng_, n, scale)); }
  // Runs an op on the CPU backend, then on the CUDA one, and waits for the device.
  void run_both(const std::function<Status(Backend&, bool /*is_gpu*/)>& op) {
    const Status c = op(*cpu_, false);
    ASSERT_TRUE(c.ok()) << "cpu: " << c;
    const Status g = op(*gpu_, true);
    ASSERT_TRUE(g.ok()) << "cuda: " << g;
    ASSERT_TRUE(gpu_->synchronize().ok());
  }

};

struct Matrix {
  int64_t rows, cols, column, n;  // a [rows, cols] matrix and its columns [column, column + n)
};

// Slices at the start, middle and end, of every column and of none; up to several blocks of
// rows (the GPU's column sums combine blocks of 256) and wider than a block of threads.
std::vector<Matrix> matrices() {
  return {{1, 1, 0, 1}, {7, 15, 8, 7},    {300, 40, 0, 40},     {700, 130, 3, 100}, {5, 6, 6, 0},
          {0, 9, 2, 4}, {257, 17, 16, 1}, {4100, 600, 40, 520}, {129, 48, 24, 24}};
}

std::string describe(const Matrix& m) {
  return "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "] columns " +
         std::to_string(m.column) + " + " + std::to_string(m.n);
}

TEST_F(CudaElementwiseOps, AddMatchesCpuBitForBit) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const Shape& shape : {Shape{1}, Shape{17}, Shape{3, 5, 7}, Shape{4096, 33}, Shape{0, 4}}) {
    SCOPED_TRACE(shape.to_string());
    const size_t n = static_cast<size_t>(shape.numel());
    Mirror dst(*cpu_, *gpu_, DType::kF32, shape), src(*cpu_, *gpu_, DType::kF32, shape);
    dst.set(normal(n, 2.0));
    src.set(normal(n, 1.0));
    run_both([&](Backend& b, bool gpu) {
      return b.add(gpu ? dst.gpu() : dst.cpu(), gpu ? src.gpu() : src.cpu());
    });
    EXPECT_TRUE(same_bits("dst", dst.gpu_values(), dst.cpu_values()));
  }
}

TEST_F(CudaElementwiseOps, AddRowBiasMatchesCpuBitForBit) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const Matrix& m : matrices()) {
    SCOPED_TRACE(describe(m));
    Mirror out(*cpu_, *gpu_, DType::kF32, {m.rows, m.cols}), bias(*cpu_, *gpu_, DType::kF32, {m.n});
    out.set(normal(m.rows * m.cols, 2.0));
    bias.set(normal(m.n, 1.0));
    run_both([&](Backend& b, bool gpu) {
      return b.add_row_bias(gpu ? out.gpu() : out.cpu(), gpu ? bias.gpu() : bias.cpu(), m.column);
    });
    EXPECT_TRUE(same_bits("out", out.gpu_values(), out.cpu_values()));
  }
}

TEST_F(CudaElementwiseOps, AddColumnSumsMatchesCpuAndRepeatsItsBits) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const Matrix& m : matrices()) {
    SCOPED_TRACE(describe(m));
    const std::vector<float> start = normal(m.n, 3.0);
    Mirror src(*cpu_, *gpu_, DType::kF32, {m.rows, m.cols}), dst(*cpu_, *gpu_, DType::kF32, {m.n});
    src.set(normal(m.rows * m.cols, 1.0));
    dst.set(start);
    run_both([&](Backend& b, bool gpu) {
      return b.add_column_sums(gpu ? src.gpu() : src.cpu(), m.column, gpu ? dst.gpu() : dst.cpu());
    });
    EXPECT_TRUE(matches_cpu("dst", dst, 1e-5, 1e-5));
    const std::vector<float> first = dst.gpu_values();
    dst.set(start);
    const Status again = gpu_->add_column_sums(src.gpu(), m.column, dst.gpu());
    ASSERT_TRUE(again.ok()) << again;
    EXPECT_TRUE(same_bits("dst, second run", dst.gpu_values(), first));
  }
}

TEST_F(CudaElementwiseOps, AddSumSquaresAndScaleMatchCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  // Below one block of threads, past the grid of 1024 blocks, and none.
  for (const Shape& shape : {Shape{1}, Shape{17, 3}, Shape{300000}, Shape{4096, 600}, Shape{0, 4}}) {
    SCOPED_TRACE(shape.to_string());
    const size_t n = static_cast<size_t>(shape.numel());
    const std::vector<float> start = normal(1, 2.0);
    Mirror src(*cpu_, *gpu_, DType::kF32, shape), dst(*cpu_, *gpu_, DType::kF32, {1});
    src.set(normal(n, 1.5));
    dst.set(start);
    run_both([&](Backend& b, bool gpu) { return b.add_sum_squares(gpu ? src.gpu() : src.cpu(), gpu ? dst.gpu() : dst.cpu()); });
    EXPECT_TRUE(matches_cpu("sum of squares", dst, 1e-6, 0.0));
    const std::vector<float> first = dst.gpu_values();
    dst.set(start);
    const Status again = gpu_->add_sum_squares(src.gpu(), dst.gpu());
    ASSERT_TRUE(again.ok()) << again;
    EXPECT_TRUE(same_bits("sum of squares, second run", dst.gpu_values(), first));
    const float factor = normal(1, 1.0)[0];
    run_both([&](Backend& b, bool gpu) { return b.scale(gpu ? src.gpu() : src.cpu(), factor); });
    EXPECT_TRUE(same_bits("scaled", src.gpu_values(), src.cpu_values()));
  }
}

TEST_F(CudaElementwiseOps, MalformedArgumentsAreRefused) {
  Mirror a(*cpu_, *gpu_, DType::kF32, {4, 6}), other(*cpu_, *gpu_, DType::kF32, {6, 4}),
      ints(*cpu_, *gpu_, DType::kI32, {4, 6}), slice(*cpu_, *gpu_, DType::kF32, {3});
  auto refused = [](const Status& st, const std::string& needle) {
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
    EXPECT_NE(std::string(st.message()).find(needle), std::string::npos) << st;
  };
  refused(gpu_->add(a.gpu(), other.gpu()), "same shape");
  refused(gpu_->add(a.gpu(), ints.gpu()), "i32");
  refused(gpu_->add_row_bias(ints.gpu(), slice.gpu(), 0), "expected f32 [rows, columns]");
  refused(gpu_->add_row_bias(a.gpu(), slice.gpu(), 4), "columns [4, 7)");
  refused(gpu_->add_column_sums(a.gpu(), -1, slice.gpu()), "columns [-1, 2)");
  refused(gpu_->add_column_sums(a.gpu(), 0, a.gpu()), "expected f32 [n]");
  refused(gpu_->add_sum_squares(a.gpu(), slice.gpu()), "dst f32 of one element");
  refused(gpu_->scale(ints.gpu(), 2.f), "it must be f32");
  EXPECT_TRUE(gpu_->synchronize().ok());
}

}  // namespace
}  // namespace tutel::testing
