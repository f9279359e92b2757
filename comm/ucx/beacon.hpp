// The cluster's heartbeat messages ("beacons"), as they travel between nodes' UCX workers.
//
// UCX tags carry the sender's node number, and UCX authenticates nothing: anything that can reach
// a node's worker could claim to be node k and say it left (every node would then report it
// down for good), or keep a dead node "up" with heartbeats of its own. With a peer secret each
// beacon carries an HMAC-SHA256 over the cluster's bootstrap table digest (unique to this
// cluster's incarnation: it covers every worker's address), the sender, the kind and a counter
// that grows with every beacon the sender sends; a receiver keeps each sender's last counter
// and takes only a larger one, so a recorded beacon cannot be replayed, in this cluster or a
// later one. Without a secret nothing is checked but the form (UCX is then open to anyone
// anyway, and a forged counter near 2^64 would otherwise mute a node for good).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/secret.hpp"

namespace tutel::comm::ucx {

// The cluster's UCX tags: [kind: 8 bits][unused][sender node: 20 bits]. The cluster has its own
// worker (groups have theirs), so these only need to differ from each other.
inline constexpr uint64_t kBeaconSenderMask = (uint64_t{1} << 20) - 1;
inline constexpr uint64_t kClusterJoinTag = uint64_t{0xC1} << 56;  // the join barrier's messages
inline constexpr uint64_t kBeaconTag = uint64_t{0xC2} << 56;

enum class BeaconKind : uint32_t { kHeartbeat = 1, kBye = 2 };

struct BeaconKeys {
  std::string secret;  // "" for none
  Digest table{};      // the cluster's bootstrap table digest
};

// The bytes of node `sender`'s beacon number `counter` (counters start at 1).
std::string encode_beacon(const BeaconKeys& keys, int sender, BeaconKind kind, uint64_t counter);

// Checks what arrived as node `sender`'s beacon, and the counters seen so far (one per node,
// 0 before any); on success the sender's counter moves on and its kind is returned. A beacon of
// another size, another kind, a mac that does not prove the secret, or a counter not above the
// last one is refused (nullopt).
class BeaconCheck {
 public:
  BeaconCheck(BeaconKeys keys, int nodes) : keys_(std::move(keys)), last_(static_cast<size_t>(nodes), 0) {}
  std::optional<BeaconKind> accept(int sender, std::string_view data);

 private:
  BeaconKeys keys_;
  std::vector<uint64_t> last_;
};

}  // namespace tutel::comm::ucx
