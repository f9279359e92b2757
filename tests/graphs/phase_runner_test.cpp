// GraphPhaseRunner's policy with a capture that only counts: a key runs op by op the first time,
// is captured the second and launched from then on; the least recently used graph goes when the
// runner is full; a phase that fails while being captured ends the capture, keeps nothing and
// runs op by op from then on; a group's agreed mode is followed, never above the proposal. (The
// capture itself: graph_tape.hpp on the CPU, CUDA graphs in graphs/cuda/cuda_graph_capture.cpp.)
#include "tutel/graphs/phase_runner.hpp"

#include <gtest/gtest.h>

#include <memory>

namespace tutel::graphs {
namespace {

struct Counts {
  int begins = 0, ends = 0, launches = 0;
  bool capturing = false;
};

class CountingGraph final : public CapturedGraph {
 public:
  CountingGraph(Counts& c, int id) : c_(c), id_(id) {}
  Status launch() override {
    ++c_.launches;
    last_launched = id_;
    return Status::OK();
  }
  static inline int last_launched = -1;

 private:
  Counts& c_;
  int id_;
};

class CountingCapture final : public GraphCapture {
 public:
  explicit CountingCapture(Counts& c) : c_(c) {}
  Status begin() override {
    ++c_.begins;
    c_.capturing = true;
    return Status::OK();
  }
  Result<std::unique_ptr<CapturedGraph>> end() override {
    ++c_.ends;
    c_.capturing = false;
    return std::unique_ptr<CapturedGraph>(new CountingGraph(c_, c_.ends));
  }

 private:
  Counts& c_;
};

PhaseKey key(int phase, uint64_t word) {
  PhaseKey k;
  k.phase = phase;
  k.add(word);
  return k;
}

TEST(GraphPhaseRunner, RunsOnceThenCapturesThenLaunches) {
  Counts c;
  GraphPhaseRunner runner(std::make_unique<CountingCapture>(c), 2);
  EXPECT_TRUE(runner.captures());
  int ran = 0, ran_capturing = 0;
  auto ops = [&] {
    ++ran;
    ran_capturing += c.capturing ? 1 : 0;
    return Status::OK();
  };
  ASSERT_TRUE(runner.run(key(1, 7), ops).ok());  // op by op
  EXPECT_EQ(ran, 1);
  EXPECT_EQ(ran_capturing, 0);
  EXPECT_EQ(c.begins, 0);
  ASSERT_TRUE(runner.run(key(1, 7), ops).ok());  // captured and launched
  EXPECT_EQ(ran_capturing, 1);
  EXPECT_EQ(c.launches, 1);
  ASSERT_TRUE(runner.run(key(1, 7), ops).ok());  // launched, the ops not called
  EXPECT_EQ(ran, 2);
  EXPECT_EQ(c.launches, 2);
  // Another word or another phase is another key.
  ASSERT_TRUE(runner.run(key(1, 8), ops).ok());
  ASSERT_TRUE(runner.run(key(2, 7), ops).ok());
  EXPECT_EQ(ran, 4);
  EXPECT_EQ(c.launches, 2);
  const PhaseRunnerStats& s = runner.stats();
  EXPECT_EQ(s.eager_runs, 3u);
  EXPECT_EQ(s.captures, 1u);
  EXPECT_EQ(s.launches, 2u);
}

TEST(GraphPhaseRunner, KeepsTheMostRecentlyUsedGraphs) {
  Counts c;
  GraphPhaseRunner runner(std::make_unique<CountingCapture>(c), 2);
  auto ops = [] { return Status::OK(); };
  for (uint64_t w : {1, 2, 3})
    for (int twice = 0; twice < 2; ++twice) ASSERT_TRUE(runner.run(key(1, w), ops).ok());
  // Graphs of 1, 2, 3 captured in that order; 1 went for 3.
  EXPECT_EQ(runner.graphs(), 2u);
  EXPECT_EQ(runner.stats().evictions, 1u);
  ASSERT_TRUE(runner.run(key(1, 2), ops).ok());  // launched: 2 is now the most recent
  EXPECT_EQ(CountingGraph::last_launched, 2);
  ASSERT_TRUE(runner.run(key(1, 1), ops).ok());  // gone: op by op again
  EXPECT_EQ(runner.stats().captures, 3u);
  ASSERT_TRUE(runner.run(key(1, 1), ops).ok());  // captured again, in place of 3
  EXPECT_EQ(runner.stats().captures, 4u);
  EXPECT_EQ(runner.stats().evictions, 2u);
  ASSERT_TRUE(runner.run(key(1, 2), ops).ok());
  EXPECT_EQ(CountingGraph::last_launched, 2);  // 2 stayed
}

TEST(GraphPhaseRunner, AFailedCaptureRunsThePhaseOpByOpNowAndFromThenOn) {
  Counts c;
  GraphPhaseRunner runner(std::make_unique<CountingCapture>(c));
  bool fail_in_capture = false;
  int ran = 0;
  auto ops = [&] {
    ++ran;
    return fail_in_capture && c.capturing ? Status::Internal("not capturable") : Status::OK();
  };
  ASSERT_TRUE(runner.run(key(3, 1), ops).ok());
  fail_in_capture = true;
  // The capture fails; the phase still runs, op by op, in the same call.
  ASSERT_TRUE(runner.run(key(3, 1), ops).ok());
  EXPECT_EQ(ran, 3);
  EXPECT_EQ(c.begins, 1);
  EXPECT_EQ(c.ends, 1);  // the capture was ended
  EXPECT_FALSE(c.capturing);
  EXPECT_EQ(runner.graphs(), 0u);
  EXPECT_EQ(c.launches, 0);
  EXPECT_EQ(runner.stats().capture_failures, 1u);
  // The key is not captured again: op by op, every time.
  EXPECT_EQ(runner.propose(key(3, 1)).mode, PhaseMode::kEager);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(runner.run(key(3, 1), ops).ok());
  EXPECT_EQ(ran, 6);
  EXPECT_EQ(c.begins, 1);
  EXPECT_EQ(runner.stats().capture_failures, 1u);
  // clear() forgets it (a new communicator, a new start).
  fail_in_capture = false;
  runner.clear();
  ASSERT_TRUE(runner.run(key(3, 1), ops).ok());
  ASSERT_TRUE(runner.run(key(3, 1), ops).ok());
  EXPECT_EQ(runner.graphs(), 1u);
  // An op that fails op by op fails the run.
  const Status st = runner.run(key(4, 1), [] { return Status::Internal("an op failed"); });
  EXPECT_EQ(st.code(), StatusCode::kInternal);
}

// What a group does with propose(), capture(), drop() and run_as(): whatever the least ready
// rank can do, captures launched only once every rank has one.
TEST(GraphPhaseRunner, RunsAsTheGroupAgreesNeverAboveItsProposal) {
  Counts c;
  GraphPhaseRunner runner(std::make_unique<CountingCapture>(c));
  int ran = 0;
  auto ops = [&] {
    ++ran;
    return Status::OK();
  };
  const PhaseKey k = key(2, 9);
  EXPECT_EQ(runner.propose(k).mode, PhaseMode::kEager);
  EXPECT_FALSE(runner.capture(k, 1, ops).ok());  // not seen yet
  ASSERT_TRUE(runner.run_as(k, PhaseMode::kEager, 0, ops).ok());
  EXPECT_EQ(runner.propose(k).mode, PhaseMode::kCapture);
  ASSERT_TRUE(runner.run_as(k, PhaseMode::kEager, 0, ops).ok());  // a peer was not ready
  EXPECT_EQ(runner.propose(k).mode, PhaseMode::kCapture);
  ASSERT_TRUE(runner.capture(k, 7, ops).ok());
  EXPECT_EQ(c.launches, 0);  // recorded, not run
  runner.drop(k);            // a peer's capture failed: nobody launches, all run op by op
  EXPECT_EQ(runner.graphs(), 0u);
  EXPECT_EQ(runner.propose(k).mode, PhaseMode::kEager);
  ASSERT_TRUE(runner.run_as(k, PhaseMode::kEager, 0, ops).ok());
  EXPECT_EQ(runner.propose(k).mode, PhaseMode::kCapture);  // ready to try again
  ASSERT_TRUE(runner.capture(k, 8, ops).ok());
  PhaseProposal p = runner.propose(k);
  EXPECT_EQ(p.mode, PhaseMode::kLaunch);
  EXPECT_EQ(p.round, 8u);
  EXPECT_FALSE(runner.run_as(k, PhaseMode::kLaunch, 6, ops).ok());   // another round's graph
  EXPECT_FALSE(runner.run_as(k, PhaseMode::kCapture, 8, ops).ok());  // run_as never captures
  const int before = ran;
  ASSERT_TRUE(runner.run_as(k, PhaseMode::kLaunch, 8, ops).ok());
  EXPECT_EQ(ran, before);                                         // launched, not run
  ASSERT_TRUE(runner.run_as(k, PhaseMode::kEager, 0, ops).ok());  // a peer lost its graph
  EXPECT_EQ(runner.propose(k).round, 8u);                         // this one keeps it
  EXPECT_EQ(runner.stats().captures, 2u);
}

TEST(EagerPhaseRunner, RunsEveryPhaseOpByOp) {
  EagerPhaseRunner runner;
  EXPECT_FALSE(runner.captures());
  int ran = 0;
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(runner
                    .run(key(1, 1),
                         [&] {
                           ++ran;
                           return Status::OK();
                         })
                    .ok());
  EXPECT_EQ(ran, 3);
  EXPECT_EQ(runner.stats().eager_runs, 3u);
}

}  // namespace
}  // namespace tutel::graphs
