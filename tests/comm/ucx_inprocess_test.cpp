// Several ranks in one process (the daemon's CPU virtual ranks): each rank bootstraps its own
// UCX communicator on its own thread. The process is a forked child, so this test binary never
// holds UCX state itself.
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "collective_checks.hpp"
#include "comm_test_util.hpp"
#include "tutel/comm/ucx.hpp"

namespace tutel::comm {
namespace {

using namespace std::chrono_literals;
using testing::Failures;
using testing::loopback_options;

// Runs `body` for `size` ranks, each on a thread of one forked process; returns its report.
template <typename Body>
std::string run_threads_in_child(int size, int local_size, Body body) {
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(1, [&](int, const testing::ChildChannel&) {
    std::vector<std::string> reports(size);
    std::vector<std::thread> threads;
    for (int r = 0; r < size; ++r) {
      threads.emplace_back([&, r] {
        auto comm = ucx_bootstrap(loopback_options(port, r, size, local_size));
        if (!comm.ok()) {
          reports[r] = "bootstrap: " + comm.status().to_string() + "\n";
          return;
        }
        reports[r] = body(**comm);
      });
    }
    for (auto& t : threads) t.join();
    Failures f;
    for (int r = 0; r < size; ++r) f.merge("rank " + std::to_string(r) + ": ", reports[r]);
    return f.text();
  });
  return testing::describe_failures(group.wait_all());
}

TEST(UcxInProcess, FourRanksAsThreads) {
  const std::string report = run_threads_in_child(4, 1, [](Communicator& comm) {
    std::string report = testing::check_collectives(comm, {12, 4096, 65536});
    return report + testing::check_split_even_odd(comm);
  });
  EXPECT_EQ(report, "");
}

TEST(UcxInProcess, FourRanksTwoPerNode2DH) {
  const std::string report = run_threads_in_child(4, 2, [](Communicator& comm) {
    Failures f;
    if (comm.local_size() != 2) f.add("local_size ", comm.local_size());
    for (size_t chunk : {size_t{1}, size_t{12}, size_t{4096}, size_t{262144}})
      testing::check_all_to_all(comm, chunk, AllToAllAlgo::k2DH, static_cast<uint32_t>(chunk), f);
    return f.text();
  });
  EXPECT_EQ(report, "");
}

TEST(UcxInProcess, ConcurrentGroupsOnSharedEndpoints) {
  const std::string report = run_threads_in_child(
      4, 1, [](Communicator& comm) { return testing::check_concurrent_groups(comm, 30); });
  EXPECT_EQ(report, "");
}

TEST(UcxInProcess, TwoDHRefusesLocalSizeNotDividingSize) {
  const std::string report = run_threads_in_child(3, 2, [](Communicator& comm) {
    Failures f;
    std::vector<uint8_t> send(3 * 8), recv(3 * 8);
    Status s = comm.all_to_all(send.data(), recv.data(), 8, AllToAllAlgo::k2DH);
    if (s.code() != StatusCode::kInvalidArgument ||
        s.message().find("local_size (2) to divide the group size (3)") == std::string::npos)
      f.add("expected a clear refusal, got ", s.to_string());
    // The refusal is symmetric and sends nothing, so the communicator stays usable.
    testing::check_all_to_all(comm, 8, AllToAllAlgo::kLinear, 5, f);
    return f.text();
  });
  EXPECT_EQ(report, "");
}

TEST(UcxInProcess, SingleRankGroup) {
  const std::string report = run_threads_in_child(1, 1, [](Communicator& comm) {
    Failures f;
    testing::check_all_to_all(comm, 100, AllToAllAlgo::k2DH, 1, f);
    f.merge("", testing::check_collectives(comm, {12}));
    return f.text();
  });
  EXPECT_EQ(report, "");
}

}  // namespace
}  // namespace tutel::comm
