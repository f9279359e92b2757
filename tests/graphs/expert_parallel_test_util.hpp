// Shared by the expert-parallel tests: the ranks of a group are threads of the test process,
// each with its own communicator on loopback.
#pragma once

#include <chrono>
#include <cstdint>

#include "../kernels/layer_test_util.hpp"
#include "tutel/comm/bootstrap.hpp"
#include "tutel/graphs/expert_parallel.hpp"

namespace tutel::testing {

// Rank r of a group of W on loopback, with generous timeouts (2 cores shared by every rank).
inline comm::BootstrapOptions rank_options(uint16_t port, int r, int W, int local_size) {
  comm::BootstrapOptions o;
  o.coordinator_port = port;
  o.rank = r;
  o.size = W;
  o.local_size = local_size;
  o.timeout = std::chrono::seconds(20);
  o.collective_timeout = std::chrono::seconds(20);
  return o;
}

// The reference's parameters as the f32 whole-layer set a rank slices its part from.
inline graphs::HostLayerParams to_host(const ref::Params& p) {
  return {to_f32(p.wg), to_f32(p.fc1_w), to_f32(p.fc1_b), to_f32(p.fc2_w), to_f32(p.fc2_b)};
}

}  // namespace tutel::testing
