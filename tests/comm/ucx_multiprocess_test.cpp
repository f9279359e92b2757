// Every collective over real UCX between forked processes on loopback, for several group shapes.
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "collective_checks.hpp"
#include "comm_test_util.hpp"
#include "tutel/comm/ucx.hpp"

namespace tutel::comm {
namespace {

using testing::loopback_options;

class UcxProcesses : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(UcxProcesses, CollectivesSplitAndConcurrentGroups) {
  const auto [size, local_size] = GetParam();
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(size, [&](int rank, const testing::ChildChannel&) -> std::string {
    auto comm = ucx_bootstrap(loopback_options(port, rank, size, local_size));
    if (!comm.ok()) return "bootstrap: " + comm.status().to_string();
    Communicator& c = **comm;
    if (c.rank() != rank || c.size() != size || c.local_size() != local_size) return "wrong shape";
    std::string report = testing::check_collectives(c, {12, 4096, 65536, 1 << 20});
    report += testing::check_split_even_odd(c);  // in this order on every rank
    return report + testing::check_concurrent_groups(c, 10);
  });
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

INSTANTIATE_TEST_SUITE_P(Shapes, UcxProcesses,
                         ::testing::Values(std::make_tuple(2, 1), std::make_tuple(2, 2),
                                           std::make_tuple(4, 1), std::make_tuple(4, 2),
                                           std::make_tuple(8, 1), std::make_tuple(8, 2),
                                           std::make_tuple(8, 4)),
                         [](const auto& info) {
                           return "Ranks" + std::to_string(std::get<0>(info.param)) + "PerNode" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace tutel::comm
