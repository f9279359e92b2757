// bf16 weight copies and bf16 dispatched tokens on the CPU backend (the checks are in
// bf16_copy_checks.hpp and bf16_dispatch_checks.hpp, shared with the CUDA suite): convert's
// rounding, the layer and the expert ops with copies against the on-the-fly conversion bit for
// bit, the optimizers' param_bf16, malformed copies refused; encode into bf16 and the expert
// ops reading bf16 rows against the f32 rows bit for bit.
#include <gtest/gtest.h>

#include <random>

#include "bf16_copy_checks.hpp"
#include "bf16_dispatch_checks.hpp"
#include "layer_cases.hpp"

namespace tutel::testing {
namespace {

std::unique_ptr<Backend> cpu_backend() {
  auto backend = make_backend("cpu", {.threads = 2});
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(backend).value() : nullptr;
}

TEST(CpuBf16Copies, ConvertRoundsToNearestEvenLikeTheMatmuls) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_convert(*b, rng, /*same_as_host=*/true);
}

TEST(CpuBf16Copies, ExpertOpsWithCopiesMatchOnTheFlyBitForBit) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_expert_ops_with_copies(*b, rng);
}

TEST(CpuBf16Copies, TheMatmulsReadTheCopies) {
  std::mt19937_64 rng(std::random_device{}());
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_copies_are_read(*b, rng);
}

class CpuBf16LayerTest : public ::testing::TestWithParam<LayerCase> {};

TEST_P(CpuBf16LayerTest, WithCopiesMatchesOnTheFlyBitForBit) {
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_layer_with_copies(*b, GetParam().spec, GetParam().tokens, std::random_device{}());
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuBf16LayerTest, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<LayerCase>& info) {
                           return info.param.name;
                         });

TEST(CpuBf16Copies, OptimizersWriteBf16OfTheUpdatedParam) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_optimizers_refresh_copies(*b, rng);
}

TEST(CpuBf16Copies, MalformedCopiesAreRefused) {
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_malformed_copies_refused(*b);
}

// Both copies shrink the bf16 workspace to the activations: at the bench's large shape the
// weights are the largest operands.
TEST(CpuBf16Copies, WorkspaceForWeightsInBf16HoldsActivationsOnly) {
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  ExpertShape shape{8, 1024, 1024, 2048, 1024};
  const size_t full = b->expert_workspace_bytes(shape, DType::kBF16);
  shape.weights_bf16 = true;
  EXPECT_EQ(full, size_t{2} * 8 * 2048 * 1024 * 2);  // two operands of E·H·M bf16
  EXPECT_EQ(b->expert_workspace_bytes(shape, DType::kBF16),
            size_t{2} * 8 * 1024 * 2048 * 2);  // E·C·H
  EXPECT_EQ(b->expert_workspace_bytes(shape, DType::kF32), 0u);
}

TEST(CpuBf16Dispatch, EncodeIntoBf16IsTheRoundingOfTheF32Rows) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_encode_to_bf16(*b, rng);
}

TEST(CpuBf16Dispatch, ExpertOpsGiveTheSameBitsFromBf16Rows) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_expert_ops_read_bf16_dispatched(*b, rng);
}

TEST(CpuBf16Dispatch, MisuseIsRefused) {
  auto b = cpu_backend();
  ASSERT_TRUE(b);
  check_bf16_dispatched_misuse_refused(*b);
}

}  // namespace
}  // namespace tutel::testing
