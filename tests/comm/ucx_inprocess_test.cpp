// Several ranks in one process (the daemon's CPU virtual ranks): each rank bootstraps its own
// UCX communicator on its own thread. The process is a forked child, so this test binary never
// holds UCX state itself.
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "collective_checks.hpp"
#include "comm_test_util.hpp"
#include "tutel/comm/local_exchange.hpp"
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

// Block layouts: what a rank can see is wrong is refused before anything is sent (the
// communicator stays usable); ranks that disagree on the number of pieces both fail, as ranks
// that disagree on a chunk's size do, rather than one returning with the other's extra pieces
// left for its next step.
TEST(UcxInProcess, BlockLayoutsThatDoNotFitAreRefused) {
  const std::string report = run_threads_in_child(2, 1, [](Communicator& comm) {
    Failures f;
    std::vector<uint8_t> send(4096), recv(4096);
    const BlockLayout three{16, 3, 16, 48}, two{16, 2, 16, 32}, overlapping{16, 3, 8, 48},
        blocks_overlap{16, 3, 16, 20};
    auto expect_refusal = [&](const BlockLayout& from, const BlockLayout& to, const char* says) {
      Status s = comm.all_to_all(send.data(), from, recv.data(), to, AllToAllAlgo::kLinear);
      if (s.code() != StatusCode::kInvalidArgument || s.message().find(says) == std::string::npos)
        f.add("expected a refusal saying '", says, "', got ", s.to_string());
    };
    expect_refusal(three, two, "give both layouts the same pieces and piece_bytes");
    expect_refusal(three, overlapping, "the receive layout's pieces overlap");
    expect_refusal(overlapping, three, "the send layout's pieces overlap");
    expect_refusal(three, blocks_overlap, "the receive layout's pieces overlap");
    expect_refusal(BlockLayout{16, 0, 16, 0}, BlockLayout{16, 0, 16, 0}, "needs 1 to");
    testing::check_all_to_all(comm, 8, AllToAllAlgo::kLinear, 3, f);
    const BlockLayout& mine = comm.rank() == 0 ? three : two;
    Status s = comm.all_to_all(send.data(), mine, recv.data(), mine, AllToAllAlgo::kLinear);
    if (s.ok()) f.add("rank ", comm.rank(), " returned OK from an exchange whose ranks disagree on its pieces");
    return f.text();
  });
  EXPECT_EQ(report, "");
}

// One rank passing a single piece where the other passes several: they never pair up, so both
// fail (at the collective timeout, here short) rather than the one returning with a piece of the
// other's exchange.
TEST(UcxInProcess, OnePieceAgainstSeveralFailsOnBothRanks) {
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(1, [&](int, const testing::ChildChannel&) {
    std::vector<std::string> reports(2);
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        auto comm = ucx_bootstrap(loopback_options(port, r, 2, 1, 500ms));
        if (!comm.ok()) return void(reports[r] = "bootstrap: " + comm.status().to_string());
        std::vector<uint8_t> send(4096), recv(4096);
        const BlockLayout mine = r == 0 ? BlockLayout{16, 1, 16, 16} : BlockLayout{16, 3, 16, 48};
        Status s = (*comm)->all_to_all(send.data(), mine, recv.data(), mine, AllToAllAlgo::kLinear);
        if (s.ok()) reports[r] = "rank " + std::to_string(r) + " returned OK";
      });
    for (auto& t : threads) t.join();
    return reports[0] + reports[1];
  });
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
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

// ---- ranks of one process exchanging through memory (LocalExchange) ------------------------

// `processes` forked children with `threads` ranks each (rank p·threads + t), the ranks of a
// child sharing one LocalExchange: in-process peers copy directly, the others go over UCX.
template <typename Body>
std::string run_with_local_exchange(int processes, int threads, int local_size, Body body,
                                    std::chrono::milliseconds collective_timeout = 20s) {
  const uint16_t port = testing::free_port();
  const int size = processes * threads;
  testing::ProcessGroup group(processes, [&](int process, const testing::ChildChannel&) {
    auto exchange = std::make_shared<LocalExchange>();
    std::vector<std::string> reports(threads);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        const int r = process * threads + t;
        BootstrapOptions o = loopback_options(port, r, size, local_size, collective_timeout);
        o.local_exchange = exchange;
        auto comm = ucx_bootstrap(o);
        if (!comm.ok()) {
          reports[t] = "bootstrap: " + comm.status().to_string() + "\n";
          return;
        }
        Failures f;
        // Exactly the peers of this process are in-process.
        for (const PeerStatus& p : (*comm)->peers())
          if (p.same_process != (p.rank / threads == process)) f.add("peer ", p.rank, " same_process ", p.same_process);
        reports[t] = f.text() + body(**comm);
      });
    }
    for (auto& w : workers) w.join();
    Failures f;
    for (int t = 0; t < threads; ++t) f.merge("rank " + std::to_string(process * threads + t) + ": ", reports[t]);
    return f.text();
  });
  return testing::describe_failures(group.wait_all());
}

TEST(UcxLocalExchange, FourRanksOfOneProcessCopyDirectly) {
  const std::string report = run_with_local_exchange(1, 4, 1, [](Communicator& comm) {
    std::string report = testing::check_collectives(comm, {1, 12, 4096, 1 << 20});
    report += testing::check_split_even_odd(comm);
    // Every byte went through memory, and was counted.
    for (const PeerStatus& p : comm.peers())
      if (p.bytes_sent == 0 || p.bytes_received == 0) report += "no traffic counted with rank " + std::to_string(p.rank) + "\n";
    return report;
  });
  EXPECT_EQ(report, "");
}

TEST(UcxLocalExchange, ConcurrentGroupsOfOneProcess) {
  const std::string report = run_with_local_exchange(
      1, 4, 1, [](Communicator& comm) { return testing::check_concurrent_groups(comm, 30); });
  EXPECT_EQ(report, "");
}

// The daemon's layout: two processes (nodes) with two ranks each; 2DH's intra-node step is
// then in-process and its inter-node step over UCX.
TEST(UcxLocalExchange, TwoProcessesTwoRanksEachLinearAnd2DH) {
  const std::string report = run_with_local_exchange(2, 2, 2, [](Communicator& comm) {
    Failures f;
    for (size_t chunk : {size_t{1}, size_t{12}, size_t{4096}, size_t{262144}}) {
      testing::check_all_to_all(comm, chunk, AllToAllAlgo::k2DH, static_cast<uint32_t>(chunk), f);
      testing::check_all_to_all(comm, chunk, AllToAllAlgo::kLinear, static_cast<uint32_t>(chunk) + 1, f);
    }
    f.merge("", testing::check_collectives(comm, {12, 65536}));
    return f.text();
  });
  EXPECT_EQ(report, "");
}

TEST(UcxLocalExchange, InProcessSizeMismatchIsAnErrorNotACorruption) {
  const std::string report = run_with_local_exchange(
      1, 2, 1,
      [](Communicator& comm) -> std::string {
        const size_t bytes = comm.rank() == 0 ? 100 : 200;
        std::vector<uint8_t> send(bytes, 9), recv(2 * bytes, 0);
        Status s = comm.all_gather(send.data(), recv.data(), bytes);
        if (s.ok()) return "all_gather with different sizes succeeded";
        if (s.message().find("different sizes") == std::string::npos && s.message().find("gave up") == std::string::npos)
          return "unclear error: " + s.to_string();
        // Nothing was copied into the other rank's block.
        for (size_t i = 0; i < bytes; ++i)
          if (recv[(1 - comm.rank()) * bytes + i] != 0) return "a mismatched message was copied";
        return "";
      },
      2000ms);
  EXPECT_EQ(report, "");
}

// An in-process rank that stops calling collectives is a timeout naming it; the ranks that
// gave up withdraw their posted copies, so the silent rank's later call cannot touch their
// (by then reused) buffers: it fails too, on the notice.
TEST(UcxLocalExchange, SilentInProcessRankIsATimeoutNamingIt) {
  const std::string report = run_with_local_exchange(
      1, 3, 1,
      [](Communicator& comm) -> std::string {
        if (comm.rank() == 2) {
          std::this_thread::sleep_for(3500ms);  // past the others' timeout
          std::vector<uint8_t> send(3 * 64, 1), recv(3 * 64);
          Status late = comm.all_to_all(send.data(), recv.data(), 64, AllToAllAlgo::kLinear);
          return late.ok() ? "the late all-to-all succeeded although its peers gave up" : "";
        }
        std::vector<uint8_t> send(3 * 64, 1), recv(3 * 64);
        Status s = comm.all_to_all(send.data(), recv.data(), 64, AllToAllAlgo::kLinear);
        std::fill(send.begin(), send.end(), 0xEE);  // "reused": a late copy would carry this
        if (s.code() != StatusCode::kTimeout && s.code() != StatusCode::kUnavailable)
          return "expected a timeout, got " + s.to_string();
        if (s.message().find("rank 2 (127.0.0.1, pid ") == std::string::npos)
          return "the error does not name rank 2: " + s.to_string();
        return "";
      },
      2000ms);
  EXPECT_EQ(report, "");
}

}  // namespace
}  // namespace tutel::comm
