// The pipelined expert phase's schedule (graphs/src/chunk_pipeline.hpp): the exchanges in one
// fixed order with and without the worker, each chunk's compute after its `in` and before its
// `out`, the compute on the calling thread, and the first failure stopping both sides.
#include "chunk_pipeline.hpp"

#include <gtest/gtest.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace tutel::graphs {
namespace {

// Stages that log what ran, where, and fail where told.
struct Log {
  std::mutex mu;
  std::vector<std::string> exchanges, computes;
  std::vector<std::string> events;  // everything, in the order it finished
  std::thread::id compute_thread;
  bool compute_elsewhere = false;
  std::string fail_at;  // "in2", "compute1", "out0", ...

  Status note(std::vector<std::string>& where, const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    where.push_back(what);
    events.push_back(what);
    if (what == fail_at) return Status::Internal("failed at " + what);
    return Status::OK();
  }
  ChunkStage in() {
    return [this](int j) { return note(exchanges, "in" + std::to_string(j)); };
  }
  ChunkStage out() {
    return [this](int j) { return note(exchanges, "out" + std::to_string(j)); };
  }
  ChunkStage compute() {
    return [this](int j) {
      if (std::this_thread::get_id() != compute_thread) compute_elsewhere = true;
      return note(computes, "compute" + std::to_string(j));
    };
  }
};

std::vector<std::string> expected_exchanges(int d) {
  std::vector<std::string> v{"in0"};
  for (int j = 0; j < d; ++j) {
    if (j + 1 < d) v.push_back("in" + std::to_string(j + 1));
    v.push_back("out" + std::to_string(j));
  }
  return v;
}

void expect_dependencies(const std::vector<std::string>& events, int d) {
  auto at = [&](const std::string& e) {
    return std::find(events.begin(), events.end(), e) - events.begin();
  };
  for (int j = 0; j < d; ++j) {
    const std::string n = std::to_string(j);
    EXPECT_LT(at("in" + n), at("compute" + n)) << j;
    EXPECT_LT(at("compute" + n), at("out" + n)) << j;
  }
}

TEST(ChunkPipeline, ExchangesRunInOneOrderWithAndWithoutTheWorker) {
  ExchangeWorker worker;
  for (int d : {1, 2, 3, 7}) {
    SCOPED_TRACE("d = " + std::to_string(d));
    Log plain;
    plain.compute_thread = std::this_thread::get_id();
    ASSERT_TRUE(run_chunks_in_order(d, plain.in(), plain.compute(), plain.out()).ok());
    EXPECT_EQ(plain.exchanges, expected_exchanges(d));
    expect_dependencies(plain.events, d);

    // The same worker for every run: it is kept between phases.
    Log overlapped;
    overlapped.compute_thread = std::this_thread::get_id();
    ASSERT_TRUE(worker.run(d, overlapped.in(), overlapped.compute(), overlapped.out()).ok());
    EXPECT_EQ(overlapped.exchanges, expected_exchanges(d));
    EXPECT_EQ(overlapped.computes.size(), static_cast<size_t>(d));
    expect_dependencies(overlapped.events, d);
    EXPECT_FALSE(overlapped.compute_elsewhere) << "compute must run on the calling thread";
  }
}

// A stage that throws fails the phase with Internal, on either thread, and the worker stays
// usable (nothing of the caller's runs after run() returns).
TEST(ChunkPipeline, AStageThatThrowsIsAFailureNotACrash) {
  ExchangeWorker worker;
  for (const std::string where : {"in", "compute", "out"}) {
    SCOPED_TRACE(where);
    auto stage = [&](const std::string& name) -> ChunkStage {
      return [name, where](int j) -> Status {
        if (name == where && j == 1) throw std::runtime_error(name + " broke");
        return Status::OK();
      };
    };
    const Status st = worker.run(3, stage("in"), stage("compute"), stage("out"));
    EXPECT_EQ(st.code(), StatusCode::kInternal) << st;
    EXPECT_NE(st.message().find(where + " broke"), std::string::npos) << st;
    Log next;
    next.compute_thread = std::this_thread::get_id();
    ASSERT_TRUE(worker.run(2, next.in(), next.compute(), next.out()).ok());
  }
}

TEST(ChunkPipeline, TheFirstFailureStopsBothSidesAndIsReturned) {
  ExchangeWorker worker;
  const int d = 4;
  for (const std::string fail_at : {"in0", "in2", "compute1", "out0", "out3"}) {
    SCOPED_TRACE(fail_at);
    for (bool overlap : {false, true}) {
      SCOPED_TRACE(overlap ? "worker" : "in order");
      Log log;
      log.compute_thread = std::this_thread::get_id();
      log.fail_at = fail_at;
      const Status st = overlap ? worker.run(d, log.in(), log.compute(), log.out())
                                : run_chunks_in_order(d, log.in(), log.compute(), log.out());
      EXPECT_EQ(st.code(), StatusCode::kInternal);
      EXPECT_NE(st.message().find(fail_at), std::string::npos) << st;
      // Nothing that depends on the failed stage ran: no compute after a failed `in` of its
      // chunk, no `out` of a chunk whose compute failed, no exchange issued after a failed one.
      const std::vector<std::string> want = expected_exchanges(d);
      const size_t issued = log.exchanges.size();
      EXPECT_TRUE(std::equal(log.exchanges.begin(), log.exchanges.end(), want.begin()));
      if (fail_at.rfind("compute", 0) != 0) {
        EXPECT_EQ(log.exchanges.back(), fail_at);
      }
      if (fail_at == "in0") {
        EXPECT_TRUE(log.computes.empty());
      }
      if (fail_at == "compute1") {
        EXPECT_EQ(std::count(log.exchanges.begin(), log.exchanges.end(), "out1"), 0);
        EXPECT_LE(issued, 4u);  // at most in0 in1 out0 in2
      }
      // The worker is idle and usable again.
      Log next;
      next.compute_thread = std::this_thread::get_id();
      ASSERT_TRUE(worker.run(2, next.in(), next.compute(), next.out()).ok());
      EXPECT_EQ(next.exchanges, expected_exchanges(2));
    }
  }
}

}  // namespace
}  // namespace tutel::graphs
