// AdaptiveSpin: the spin a ring's consumer takes for its next wait, from what its last waits took.
#include "tutel/ipc/adaptive_spin.hpp"

#include <gtest/gtest.h>

namespace tutel::ipc {
namespace {

using namespace std::chrono_literals;

TEST(AdaptiveSpin, SpinsUntilAWaitOutlastsTheBudgetThenSleepsAtOnce) {
  AdaptiveSpin spin(50us);
  EXPECT_EQ(spin.next(), 50us);  // nothing seen yet: spin
  spin.observe(3us);
  EXPECT_EQ(spin.next(), 50us);
  spin.observe(50us);  // within the budget, to the microsecond
  EXPECT_EQ(spin.next(), 50us);
  spin.observe(51us);  // a long wait: the next one sleeps at once
  EXPECT_EQ(spin.next(), 0us);
  spin.observe(2ms);
  EXPECT_EQ(spin.next(), 0us);
  spin.observe(20us);  // woken within the budget: the work got short, spin again
  EXPECT_EQ(spin.next(), 50us);
}

// Waits that sleep at once cannot show a short wait once wake-ups take longer than the budget (a
// busy machine): every kProbeEvery-th of them in a row spins, and one that ends within the budget
// brings the spin back.
TEST(AdaptiveSpin, ProbesWithTheBudgetWhileWaitsSleepAtOnce) {
  AdaptiveSpin spin(50us);
  spin.observe(1ms);
  for (int round = 0; round < 3; ++round) {
    for (uint32_t i = 1; i < AdaptiveSpin::kProbeEvery; ++i) {
      ASSERT_EQ(spin.next(), 0us) << "round " << round << ", wait " << i;
      spin.observe(80us);  // a 5 µs request behind a slow wake-up
    }
    ASSERT_EQ(spin.next(), 50us) << "round " << round << ": the probe";
    spin.observe(300us);  // still long: back to sleeping, counted afresh
  }
  EXPECT_EQ(spin.next(), 0us);
  // A new run of long waits counts from its start, not from the earlier one.
  spin.observe(5us);
  EXPECT_EQ(spin.next(), 50us);
  spin.observe(1ms);
  for (uint32_t i = 1; i < AdaptiveSpin::kProbeEvery; ++i) {
    ASSERT_EQ(spin.next(), 0us) << i;
    spin.observe(1ms);
  }
  ASSERT_EQ(spin.next(), 50us);
  spin.observe(10us);  // the probe met a short wait
  for (int i = 0; i < 5; ++i) EXPECT_EQ(spin.next(), 50us);
}

TEST(AdaptiveSpin, AZeroBudgetNeverSpins) {
  AdaptiveSpin spin(0us);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(spin.next(), 0us);
    spin.observe(i % 2 ? 0us : 1ms);
  }
}

}  // namespace
}  // namespace tutel::ipc
