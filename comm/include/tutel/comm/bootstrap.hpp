// Bootstrap: how the ranks of a group find each other.
//
// Rank 0's process runs a small TCP coordinator on `coordinator_host:coordinator_port`, or, when
// `rendezvous_group` is set, a long-lived rendezvous service (rendezvous.hpp) at that address
// serves many groups at once, told apart by name, and rank 0 connects to it like the others.
// Every rank connects (retrying until rank 0 listens), sends its rank and a payload (its UCX worker
// address, or nothing); once all `size` ranks have arrived the coordinator answers everyone
// with the table of all payloads. If some rank does not arrive within `timeout`, every rank
// that did gets an error naming the missing ones.
//
// Thread-safety: coordinator_exchange() may run on several threads at once (one per rank),
// as long as each call has its own rank.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::comm {

class LocalExchange;

// Below this size a message to another process goes through the transport even with peer
// memory: a descriptor and an acknowledgement cost more than copying a small message twice.
inline constexpr size_t kPeerMemoryMinBytes = size_t{32} << 10;

struct BootstrapOptions {
  // Where rank 0 listens and everyone else connects: a numeric IPv4 address.
  std::string coordinator_host = "127.0.0.1";
  uint16_t coordinator_port = 0;  // required
  int rank = 0;
  int size = 1;
  // Ranks per node. Ranks are numbered node by node: rank r is on node r / local_size with
  // local index r % local_size. Only the 2DH all-to-all needs it to divide `size`.
  int local_size = 1;
  // The whole bootstrap, from the first connection attempt to the table.
  std::chrono::milliseconds timeout{10'000};
  // Each collective of the resulting communicator (and of its sub-groups).
  std::chrono::milliseconds collective_timeout{5'000};
  // How long a waiting rank busy-polls before it sleeps on the transport's event fd: waking a
  // sleeping thread costs ~20 µs, so a short spin saves it when the peer is about to answer.
  std::chrono::microseconds spin{50};
  // What a member is called in messages: "rank" for a group, "node" for a cluster of daemons
  // ("node 2 never reached the coordinator ...").
  std::string member = "rank";
  // Ranks of this process bootstrapped with the same exchange copy their messages to each
  // other directly (local_exchange.hpp); null: every peer goes through the transport.
  std::shared_ptr<LocalExchange> local_exchange;
  // Large messages (kPeerMemoryMinBytes and more) to other processes of this host are copied by
  // the receiver straight out of the sender's memory (process_vm_readv), where the OS allows it,
  // instead of through the transport (comm/README.md). false: every message takes the transport.
  bool peer_memory = true;
  // Non-empty: the coordinator address is a rendezvous service (rendezvous.hpp) shared by many
  // groups, and this names the group there (at most 190 bytes, no '@'; the daemon passes
  // "<tenant>/<name>"). Every rank, rank 0 included, connects to it; nobody listens.
  std::string rendezvous_group;
  // Who runs that service, for messages ("node 0's daemon"); empty: not said.
  std::string rendezvous_owner;
  // With a coordinator of the group's own (no rendezvous_group): the group's name, at most 190
  // bytes without '@'. A coordinator refuses ranks that name another group, so a rank meant for
  // one group never joins another that was given the same address (the daemon passes
  // "<tenant>/<name>": one tenant's layer never joins another's). Empty: no name.
  std::string group_name;
  // Raised by another thread, the bootstrap (until its communicator is returned: the first
  // barrier, which waits for every peer to connect, included) gives up within ~200 ms with
  // kAborted instead of waiting out `timeout` for ranks that may never come (a daemon shutting
  // down). Null: only the timeout ends it.
  std::shared_ptr<const std::atomic<bool>> cancel;
  // Raised by another thread, every collective of the resulting communicator (and of its
  // sub-groups) that is waiting notices within ~200 ms and gives up with kAborted, as on any
  // failure: its peers are told why (its cleanup may take up to about a second more), and the
  // communicator is broken. So does every later one. For a process that shuts down and will not
  // wait out `collective_timeout` for peers that stopped calling. Null: only failures and
  // timeouts end a collective. (nccl_bootstrap passes it on to its NCCL communicator.)
  std::shared_ptr<const std::atomic<bool>> abandon;
  // The deployment's peer secret (16 to 4096 bytes; empty: none). With one, every hello and
  // join proves it and every table is proven back (HMAC-SHA256 over both sides' fresh nonces; the secret
  // never crosses the wire), and a coordinator or rendezvous service refuses ranks without it.
  // Every rank of a group, and the service, must have the same one (or all none).
  std::string secret;
};

// OK when the options describe a valid rank of a valid group.
Status validate(const BootstrapOptions& options);

struct BootstrapTable {
  std::vector<std::string> payloads;  // rank order
  // How each rank is named in messages: "<address the coordinator saw>, pid <pid>".
  std::vector<std::string> addresses;
};

// Every rank of the group calls this with its payload (at most 1 MiB) and gets every rank's
// payload. `round` names the exchange ("ucx", "nccl"): ranks in different rounds on the same
// port refuse each other. Rank 0 listens for the duration of the call only (without
// rendezvous_group).
Result<BootstrapTable> coordinator_exchange(const BootstrapOptions& options, std::string_view round,
                                            std::string_view payload);

}  // namespace tutel::comm
