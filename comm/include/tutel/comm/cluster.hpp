// Cluster: the daemons of a deployment, one per node, that know each other and watch each
// other's liveness.
//
// Every daemon joins with the same coordinator address and node count and its own node rank.
// join() returns only once every node has arrived and every pair of nodes has exchanged a
// message (a barrier over UCX), so a daemon that serves after join() is part of a complete
// cluster; otherwise it fails after the bootstrap timeout naming the missing nodes.
//
// After join, a background thread sends each peer a small heartbeat every
// `heartbeat_interval` and listens for theirs. A peer is *down* when its connection broke
// (the process died: detected by UCX peer error handling within a fraction of a second on
// loopback) or when nothing arrived from it for `peer_timeout` (stopped, hung or unreachable);
// a silent peer that speaks again is up again, a dead one stays down (restart the cluster to
// bring it back). A node whose Cluster is destroyed says goodbye first, so the others report
// that it left rather than that it crashed. status() reports each node's state and last error.
//
// The cluster carries no collectives of groups: each group has its own communicator (so one
// job's failure cannot stall another's), and its traffic is counted there.
//
// Thread-safety: status() may be called from any thread; the destructor stops the thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm {

struct ClusterOptions {
  std::string coordinator_host = "127.0.0.1";  // numeric IPv4: where node 0 listens
  uint16_t coordinator_port = 0;               // required when nodes > 1
  int node_rank = 0;
  int nodes = 1;
  // The whole join: from the first connection attempt to the last peer's first message.
  std::chrono::milliseconds bootstrap_timeout{30'000};
  std::chrono::milliseconds heartbeat_interval{250};
  // Silence after which a peer is reported down; must exceed heartbeat_interval.
  std::chrono::milliseconds peer_timeout{3'000};
  // The peer secret the nodes prove to each other at the join (BootstrapOptions::secret).
  std::string secret;
};

// OK when the options describe a valid node of a valid cluster.
Status validate(const ClusterOptions& options);

struct NodeStatus {
  int node = -1;
  std::string address;  // "127.0.0.1, pid 4242" (where the coordinator saw it); "self" for us
  bool self = false;
  bool up = true;
  std::string error;  // why it is down; "" while up
  // Since its last heartbeat arrived (0 for ourselves).
  std::chrono::milliseconds silent_for{0};
  uint64_t heartbeats_sent = 0, heartbeats_received = 0;
};

class Cluster {
 public:
  virtual ~Cluster() = default;
  virtual int node_rank() const = 0;
  virtual int nodes() const = 0;
  // Every node in node order, this one included.
  virtual std::vector<NodeStatus> status() const = 0;
};

// Collective over the nodes (see the file comment). Uses UCX (UCX_NET_DEVICES defaults to
// "lo" when unset, as for every communicator).
Result<std::unique_ptr<Cluster>> join_cluster(const ClusterOptions& options);

}  // namespace tutel::comm
