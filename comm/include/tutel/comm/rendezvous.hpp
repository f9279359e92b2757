// Rendezvous: one long-lived TCP service where the ranks of many groups find each other.
//
// A group that has no coordinator of its own (no port to choose per job) names itself instead
// and bootstraps through a shared service: coordinator_exchange() with
// BootstrapOptions::rendezvous_group set sends a *join* {group, rank, size, local_size, timeout,
// payload} to the service, which keeps one pending table per (round, group) and answers every
// rank of a group with the table once all `size` ranks have joined. In a cluster of daemons
// node 0's daemon runs it for its whole life (daemon/, docs/config.md `[cluster] rendezvous`).
//
// Groups are independent: one event loop, non-blocking sockets, no per-group waiting, so a slow
// or missing rank of one group never delays another. A group fails, on every rank that joined,
// when
//   - it is not complete at the earliest deadline of its ranks (join time + timeout): the error
//     names the missing ranks;
//   - two live processes claim the same rank, or ranks disagree on size or local_size; a rank
//     of that group arriving until the deadline hears the same error.
// A rank that hangs up before its group completes is withdrawn (it may join again). Malformed
// input (bad magic or kind, oversized lengths, truncated messages, silence) gets an error or is
// dropped and touches no group. The service binds exactly the configured address.
//
// Thread-safety: all members may be called from any thread; the destructor stops the service
// and answers every pending rank with an error.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "tutel/core/status.hpp"

namespace tutel::comm {

struct RendezvousOptions {
  std::string host = "127.0.0.1";  // a numeric IPv4 address, bound as given
  uint16_t port = 0;               // 0: an ephemeral port (see RendezvousService::port())
  // Connections held at once. Past it the oldest that has sent no join yet is closed for the new
  // one; with every connection a joined rank, the new one is closed.
  int max_connections = 1024;
  // A connection that has not sent a whole join by then is dropped.
  std::chrono::milliseconds join_timeout{30'000};
  // Groups held at once, waiting for ranks or failed. A failed group holds only its failure and
  // stays until its deadline so that its late ranks hear why, with no connection open: without
  // this bound, joins that fail on purpose would pile them up for up to an hour each. At the
  // limit the failed group nearest its deadline makes room for a new one; with none failed,
  // a join that would start a group is refused (ResourceExhausted).
  int max_groups = 4096;
  // The peer secret (BootstrapOptions::secret): joins must prove it, tables are proven back.
  std::string secret;
};

struct RendezvousStats {
  uint64_t groups_completed = 0;
  uint64_t groups_failed = 0;   // timed out or doomed by a conflict
  uint64_t refused = 0;         // connections refused, dropped for malformed input, or to make room
  uint64_t pending_groups = 0;  // groups held now: waiting for ranks, or failed (below)
  uint64_t failed_groups = 0;   // of those, failed ones kept to answer their late ranks
  uint64_t connections = 0;     // open now
};

class RendezvousService {
 public:
  // Binds and listens on host:port, then serves on a thread of its own until destroyed.
  static Result<std::unique_ptr<RendezvousService>> start(const RendezvousOptions& options);
  virtual ~RendezvousService() = default;
  virtual const std::string& host() const = 0;
  virtual uint16_t port() const = 0;  // the bound port
  virtual RendezvousStats stats() const = 0;
};

}  // namespace tutel::comm
