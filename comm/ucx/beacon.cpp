#include "beacon.hpp"

#include "../src/bootstrap_wire.hpp"

namespace tutel::comm::ucx {
namespace {

// kind u32, sender u32, counter u64, mac (zeros without a secret); little-endian.
constexpr size_t kBeaconBytes = 4 + 4 + 8 + wire::kMacBytes;

std::string mac_of(const BeaconKeys& keys, std::string_view fields) {
  if (keys.secret.empty()) return std::string(wire::kMacBytes, '\0');
  const Digest d = hmac_sha256(keys.secret, {"tuteld cluster beacon", as_view(keys.table), fields});
  return std::string(as_view(d));
}

}  // namespace

std::string encode_beacon(const BeaconKeys& keys, int sender, BeaconKind kind, uint64_t counter) {
  std::string out;
  wire::put_u32(out, static_cast<uint32_t>(kind));
  wire::put_u32(out, static_cast<uint32_t>(sender));
  wire::put_u64(out, counter);
  out += mac_of(keys, out);
  return out;
}

std::optional<BeaconKind> BeaconCheck::accept(int sender, std::string_view data) {
  if (sender < 0 || static_cast<size_t>(sender) >= last_.size() || data.size() != kBeaconBytes) return std::nullopt;
  const uint32_t kind = wire::get_u32(data.data());
  if (kind != static_cast<uint32_t>(BeaconKind::kHeartbeat) && kind != static_cast<uint32_t>(BeaconKind::kBye))
    return std::nullopt;
  // The sender inside the mac'd fields must be the one the tag names.
  if (wire::get_u32(data.data() + 4) != static_cast<uint32_t>(sender)) return std::nullopt;
  const uint64_t counter = wire::get_u64(data.data() + 8);
  if (!constant_time_equal(data.substr(16), mac_of(keys_, data.substr(0, 16)))) return std::nullopt;
  // Without a secret anyone may write any counter: one forged near 2^64 would mute the node for
  // good, so none is kept (replays are harmless where forgeries cannot be told apart anyway).
  if (keys_.secret.empty()) return static_cast<BeaconKind>(kind);
  if (counter <= last_[static_cast<size_t>(sender)]) return std::nullopt;
  last_[static_cast<size_t>(sender)] = counter;
  return static_cast<BeaconKind>(kind);
}

}  // namespace tutel::comm::ucx
