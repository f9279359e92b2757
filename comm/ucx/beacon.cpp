#include "beacon.hpp"

#include <cstring>

namespace tutel::comm::ucx {
namespace {

// kind u32, sender u32, counter u64, mac (32 bytes: zeros without a secret); little-endian.
constexpr size_t kBeaconBytes = 4 + 4 + 8 + 32;

void put(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get(std::string_view in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t{static_cast<unsigned char>(in[at + static_cast<size_t>(i)])} << (8 * i);
  return v;
}

std::string mac_of(const BeaconKeys& keys, std::string_view fields) {
  if (keys.secret.empty()) return std::string(32, '\0');
  const Digest d = hmac_sha256(keys.secret, {"tuteld cluster beacon", as_view(keys.table), fields});
  return std::string(as_view(d));
}

}  // namespace

std::string encode_beacon(const BeaconKeys& keys, int sender, BeaconKind kind, uint64_t counter) {
  std::string out;
  put(out, static_cast<uint32_t>(kind), 4);
  put(out, static_cast<uint32_t>(sender), 4);
  put(out, counter, 8);
  out += mac_of(keys, out);
  return out;
}

std::optional<BeaconKind> BeaconCheck::accept(int sender, std::string_view data) {
  if (sender < 0 || static_cast<size_t>(sender) >= last_.size() || data.size() != kBeaconBytes) return std::nullopt;
  const auto kind = static_cast<uint32_t>(get(data, 0, 4));
  if (kind != static_cast<uint32_t>(BeaconKind::kHeartbeat) && kind != static_cast<uint32_t>(BeaconKind::kBye))
    return std::nullopt;
  // The sender inside the mac'd fields must be the one the tag names.
  if (get(data, 4, 4) != static_cast<uint64_t>(sender)) return std::nullopt;
  const uint64_t counter = get(data, 8, 8);
  if (!constant_time_equal(data.substr(16), mac_of(keys_, data.substr(0, 16)))) return std::nullopt;
  // Without a secret anyone may write any counter: one forged near 2^64 would mute the node for
  // good, so none is kept (replays are harmless where forgeries cannot be told apart anyway).
  if (keys_.secret.empty()) return static_cast<BeaconKind>(kind);
  if (counter <= last_[static_cast<size_t>(sender)]) return std::nullopt;
  last_[static_cast<size_t>(sender)] = counter;
  return static_cast<BeaconKind>(kind);
}

}  // namespace tutel::comm::ucx
