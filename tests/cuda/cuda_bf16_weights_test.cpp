// bf16 weight copies and bf16 dispatched tokens on the CUDA backend: the checks of
// tests/kernels/bf16_copy_checks.hpp and bf16_dispatch_checks.hpp that the CPU suite runs, here
// on the device (skipped without one). NaN keeps only its NaN-ness:
// the device's conversion writes its canonical NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "bf16_dispatch_checks.hpp"
#include "cuda_test_util.hpp"
#include "layer_cases.hpp"

namespace tutel::testing {
namespace {

class CudaBf16Copies : public CpuAndCudaTest {};

TEST_F(CudaBf16Copies, ConvertRoundsToNearestEvenLikeTheMatmuls) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_convert(*gpu_, rng_, /*same_as_host=*/false);
}

TEST_F(CudaBf16Copies, ExpertOpsWithCopiesMatchOnTheFlyBitForBit) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_expert_ops_with_copies(*gpu_, rng_);
}

TEST_F(CudaBf16Copies, TheMatmulsReadTheCopies) { check_copies_are_read(*gpu_, rng_); }

TEST_F(CudaBf16Copies, LayerWithCopiesMatchesOnTheFlyBitForBit) {
  for (const LayerCase& c : all_cases()) {
    SCOPED_TRACE(c.name);
    check_layer_with_copies(*gpu_, c.spec, c.tokens, rng_());
  }
}

TEST_F(CudaBf16Copies, OptimizersWriteBf16OfTheUpdatedParam) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_optimizers_refresh_copies(*gpu_, rng_);
}

TEST_F(CudaBf16Copies, MalformedCopiesAreRefused) { check_malformed_copies_refused(*gpu_); }

// The copies convert() makes on the device equal the CPU backend's for every non-NaN input, so
// a layer's copies may be made on either side.
TEST_F(CudaBf16Copies, ConvertMatchesTheCpuBackend) {
  auto cpu = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::vector<float> in = conversion_inputs(rng_);
  std::erase_if(in, [](float f) { return std::isnan(f); });
  const int64_t n = static_cast<int64_t>(in.size());
  Mirror src(**cpu, *gpu_, DType::kF32, {n}), dst(**cpu, *gpu_, DType::kBF16, {n});
  src.set(in);
  ASSERT_TRUE((*cpu)->convert(src.cpu(), dst.cpu()).ok());
  ASSERT_TRUE(gpu_->convert(src.gpu(), dst.gpu()).ok());
  EXPECT_EQ(dst.gpu_values<uint16_t>(), dst.cpu_values<uint16_t>());
}

class CudaBf16Dispatch : public CpuAndCudaTest {};

TEST_F(CudaBf16Dispatch, EncodeIntoBf16IsTheRoundingOfTheF32Rows) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_encode_to_bf16(*gpu_, rng_);
}

TEST_F(CudaBf16Dispatch, ExpertOpsGiveTheSameBitsFromBf16Rows) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_expert_ops_read_bf16_dispatched(*gpu_, rng_);
}

TEST_F(CudaBf16Dispatch, MisuseIsRefused) { check_bf16_dispatched_misuse_refused(*gpu_); }

}  // namespace
}  // namespace tutel::testing
