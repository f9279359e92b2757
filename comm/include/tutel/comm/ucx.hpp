// The UCX communicator: collectives over host memory between processes (TCP or shared memory
// without RDMA hardware, RDMA where present), and between ranks of one process.
//
// Each bootstrapped rank owns one UCP context and one worker, with endpoints to every other
// rank; sub-groups from split() share them and isolate their messages by tag. Several ranks
// may live in one process, each with its own communicator on its own thread.
//
// UCX picks its network devices from UCX_NET_DEVICES; when it is unset ucx_bootstrap() sets
// it to "lo" so traffic stays on loopback (this project's machines allow nothing else). Set it
// explicitly (e.g. "all", or "mlx5_0:1") before the first bootstrap on a real cluster.
//
// Thread-safety: as Communicator. ucx_bootstrap() may run on several threads at once.
#pragma once

#include <memory>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/comm/communicator.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm {

// Collective over the `options.size` ranks: runs the coordinator exchange, connects to every
// peer and passes a barrier before returning. Destroy the communicator (and its sub-groups)
// only after the group's last collective, as the peers may still be reading from it.
Result<std::unique_ptr<Communicator>> ucx_bootstrap(const BootstrapOptions& options);

}  // namespace tutel::comm
