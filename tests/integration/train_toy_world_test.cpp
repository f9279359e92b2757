// train_toy's launcher mode (--world W) against two real daemons: W ranks train one
// expert-parallel MoE layer, each on a 1/W slice of every batch, and the loss curve is the one
// of the single-daemon run. Also: the launcher refuses a world size that cannot split the batch,
// and a rank that fails takes the whole launch down instead of leaving the others waiting.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include "daemon_fixture.hpp"

namespace tutel::testing {
namespace {

// What train_toy printed: the training loss per step and the held-out loss before and after.
struct Curve {
  std::map<int, double> loss;
  double initial = NAN, final = NAN;
};

Curve parse(const std::string& out) {
  Curve c;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    int step = 0;
    double loss = 0, initial = 0, final = 0;
    if (std::sscanf(line.c_str(), "step %d loss %lf", &step, &loss) == 2) c.loss[step] = loss;
    if (std::sscanf(line.c_str(), "held-out loss: initial %lf, final %lf", &initial, &final) == 2) {
      c.initial = initial;
      c.final = final;
    }
  }
  return c;
}

class TrainToyWorld : public ::testing::Test {
 protected:
  void SetUp() override {
    ::setenv("UCX_NET_DEVICES", "lo", 1);  // the daemons inherit it: loopback only
    for (auto& d : daemons_) {
      d = std::make_unique<DaemonProcess>(DaemonOptions{});
      ASSERT_TRUE(d->start());
    }
  }
  void TearDown() override {
    for (auto& d : daemons_) {
      if (!d) continue;  // SetUp failed before it
      EXPECT_TRUE(d->alive()) << d->log();
      EXPECT_EQ(d->stop(), 0) << d->log();
    }
  }

  // train_toy over both daemons (rank r on daemon r % 2) with the given flags; the layer name
  // differs per run so no run replaces another's layer.
  std::pair<int, std::string> train_toy(int world, const std::string& flags) {
    std::string cmd = std::string(TRAIN_TOY_BIN) + " --world " + std::to_string(world) +
                      " --layer-name w" + std::to_string(world) + "_" + std::to_string(++runs_) +
                      " " + flags;
    for (int d = 0; d < std::min(world, 2); ++d) cmd += " --socket " + daemons_[d]->client_socket();
    return run_command(cmd);
  }
  std::string logs() const { return daemons_[0]->log() + daemons_[1]->log(); }

  std::unique_ptr<DaemonProcess> daemons_[2];
  int runs_ = 0;
};

// Without the load-balancing loss the group's loss is exactly the single run's loss, so the
// curves differ only by float32 summation order: each rank's partial sums of the dense
// gradients, and the expert GEMMs over the all-to-all's [E_l, W*C, M] rows instead of [E, C, M].
// That is a few ulps per step, which Adam carries forward: over 30 steps (seeds 1..6, W = 2, 4,
// 8) the largest relative difference measured was 2e-7, the resolution of the printed %.7g. The
// bound is 1e-5. Past ~50 steps a top-k choice between two nearly equal gate scores can flip on
// one ulp and the curves part visibly, hence 30 steps.
TEST_F(TrainToyWorld, LossCurvesMatchTheSingleDaemonRunWithoutTheAuxLoss) {
  constexpr int kSteps = 30;
  constexpr double kRelTol = 1e-5;
  const std::string flags = "--steps " + std::to_string(kSteps) + " --print-every 1 --aux-weight 0";
  auto [single_code, single_out] = train_toy(1, flags);
  // Whether 30 steps halve the held-out loss is not the point here (the next test checks the
  // training); the curves are, and the exit codes must agree.
  const Curve single = parse(single_out);
  ASSERT_EQ(single.loss.size(), size_t(kSteps)) << single_out << logs();
  for (int world : {2, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    auto [code, out] = train_toy(world, flags);
    EXPECT_EQ(code, single_code) << out << logs();
    const Curve group = parse(out);
    ASSERT_EQ(group.loss.size(), size_t(kSteps)) << out << logs();
    for (const auto& [step, want] : single.loss)
      EXPECT_NEAR(group.loss.at(step), want, kRelTol * want) << "step " << step;
    EXPECT_NEAR(group.initial, single.initial, 1e-4);  // no training yet: the same numbers
    EXPECT_NEAR(group.final, single.final, 2e-4);      // printed with 4 decimals
  }
}

// With the aux loss each rank's l_aux is that of its slice, not of the whole batch, so the gate
// gradient differs a little from the single run's. Measured over seeds 1..6 at 100 steps, the
// final held-out losses agree within 0.2%. The bound, 1%, leaves five times that, and still
// notices a wrong scaling: dl_aux not divided by W (the aux weight doubled) moves the final loss
// by 1.5%, and a loss gradient scaled by the rank's instead of the global token count by 2.4%
// (Adam cancels a uniform gradient scale, so only its ratio to the aux gradient shows; the
// aux-free curves above cannot see it).
TEST_F(TrainToyWorld, WithTheAuxLossWorldTwoTrainsLikeTheSingleRun) {
  const std::string flags = "--steps 100";
  auto [single_code, single_out] = train_toy(1, flags);
  ASSERT_EQ(single_code, 0) << single_out << logs();
  auto [code, out] = train_toy(2, flags);
  ASSERT_EQ(code, 0) << out << logs();
  const Curve single = parse(single_out), group = parse(out);
  ASSERT_FALSE(std::isnan(group.final)) << out;
  EXPECT_LT(group.final, 0.5 * group.initial) << out;
  EXPECT_NEAR(group.final, single.final, 0.01 * single.final) << out << single_out;
  EXPECT_NE(out.find("expert-parallel over 2 ranks"), std::string::npos) << out;
  // Only rank 0 prints the losses.
  EXPECT_EQ(out.find("held-out loss: initial"), out.rfind("held-out loss: initial")) << out;
}

TEST_F(TrainToyWorld, ARankThatFailsStopsTheWholeLaunch) {
  // Rank 1 cannot connect; rank 0 would wait for it in the group's bootstrap (30 s) unless the
  // launcher stops it.
  const auto start = std::chrono::steady_clock::now();
  auto [code, out] =
      run_command(std::string(TRAIN_TOY_BIN) + " --world 2 --steps 5 --layer-name orphan --socket " +
          daemons_[0]->client_socket() + " --socket " + daemons_[0]->dir() + "/no-such.sock");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("rank 1 exited with 1; stopping the other ranks"), std::string::npos) << out;
  EXPECT_LT(seconds, 10.0) << out;
  // The daemon is still good for the next job.
  auto [next_code, next_out] = train_toy(1, "--steps 100");
  EXPECT_EQ(next_code, 0) << next_out << logs();
}

TEST(TrainToyLauncher, RefusesWorldSizesThatCannotSplitTheBatch) {
  // No daemon is needed: both are refused before anything connects.
  auto [zero_code, zero_out] =
      run_command(std::string(TRAIN_TOY_BIN) + " --world 0 --socket /nonexistent.sock");
  EXPECT_EQ(zero_code, 2) << zero_out;
  EXPECT_NE(zero_out.find("--world needs an integer in [1, 2147483647]"), std::string::npos) << zero_out;
  auto [three_code, three_out] =
      run_command(std::string(TRAIN_TOY_BIN) + " --world 3 --socket /nonexistent.sock");
  EXPECT_EQ(three_code, 2) << three_out;
  EXPECT_NE(three_out.find("--world 3 does not divide the batch of 256 tokens"), std::string::npos)
      << three_out;
}

}  // namespace
}  // namespace tutel::testing
