// The framed messages of the bootstrap coordinator (bootstrap.cpp) and of the rendezvous
// service (rendezvous.cpp), which share them.
//
// Wire format (little-endian): a 32-byte header {magic, kind, rank, size, local_size, pid,
// round_len, body_len}, then `round` and the body. A hello's body is the rank's payload; a
// join's (rendezvous) body is {u32 timeout_ms, payload} and its round is "<round>@<group>"; a
// table's body is, per rank, {u32 len, payload, u32 len, address}; an error's body is the
// message and its `rank` field carries the StatusCode.
//
// With a peer secret (BootstrapOptions::secret) both sides pick a fresh nonce per connection:
//   rank → server  kChallenge | kAuthenticated, body: the rank's nonce (32 bytes);
//   server → rank  kChallenge | kAuthenticated, body: the server's nonce;
//   rank → server  the hello or join, kind | kAuthenticated, its body ending with {rank's nonce,
//                  mac}: mac = HMAC(secret, "tuteld hello" ‖ server's nonce ‖ every byte before
//                  the mac);
//   server → rank  the table, kind | kAuthenticated, followed after its body by
//                  HMAC(secret, "tuteld table" ‖ rank's nonce ‖ server's nonce ‖ SHA-256(table)).
// So each side proves the secret over the other's fresh nonce: a recorded hello or table is
// worthless on another connection, and the secret never crosses the wire. Hashing the table
// once and keying only its digest per rank keeps a large group's answers linear in its size. A
// server without a secret answers a challenge with an error, one with a secret refuses a plain
// hello, so a mismatch is named at once on the rank's side. Errors are not authenticated: a
// forged one can only make a bootstrap fail, which whoever can reach the port can do anyway.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/secret.hpp"

namespace tutel::comm::wire {

constexpr uint32_t kMagic = 0x31424354;  // "TCB1"
constexpr uint32_t kHello = 1, kTable = 2, kError = 3, kJoin = 4, kChallenge = 5;
// Or'ed into a hello's, a join's or a table's kind when it is authenticated (see above).
constexpr uint32_t kAuthenticated = 0x100;
constexpr size_t kNonceBytes = 32, kMacBytes = 32, kAuthBytes = kNonceBytes + kMacBytes;
constexpr size_t kHeaderBytes = 32;
constexpr size_t kMaxPayload = size_t{1} << 20;
// The longest a group may wait for its ranks (a join's timeout, BootstrapOptions::timeout).
constexpr std::chrono::milliseconds kMaxBootstrapTimeout{3'600'000};
constexpr size_t kMaxRound = 64;
// A join's round: "<round>@<group>", the group at most kMaxGroupName bytes.
constexpr size_t kMaxGroupName = 190;
constexpr size_t kMaxJoinRound = kMaxRound + 1 + kMaxGroupName;

struct Header {
  uint32_t magic = kMagic, kind = 0, rank = 0, size = 0, local_size = 0, pid = 0, round_len = 0,
           body_len = 0;
};

inline void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

inline uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}

// A u64 as two little-endian words, low first.
inline void put_u64(std::string& out, uint64_t v) {
  put_u32(out, static_cast<uint32_t>(v));
  put_u32(out, static_cast<uint32_t>(v >> 32));
}
inline uint64_t get_u64(const char* p) { return get_u32(p) | uint64_t{get_u32(p + 4)} << 32; }

inline std::string encode(const Header& h, std::string_view round, std::string_view body) {
  std::string out;
  out.reserve(kHeaderBytes + round.size() + body.size());
  for (uint32_t v : {h.magic, h.kind, h.rank, h.size, h.local_size, h.pid,
                     static_cast<uint32_t>(round.size()), static_cast<uint32_t>(body.size())})
    put_u32(out, v);
  out.append(round);
  out.append(body);
  return out;
}

inline Header decode_header(const char* p) {
  Header h;
  h.magic = get_u32(p);
  h.kind = get_u32(p + 4);
  h.rank = get_u32(p + 8);
  h.size = get_u32(p + 12);
  h.local_size = get_u32(p + 16);
  h.pid = get_u32(p + 20);
  h.round_len = get_u32(p + 24);
  h.body_len = get_u32(p + 28);
  return h;
}

inline std::string encode_error(const Status& failure) {
  Header h;
  h.kind = kError;
  h.rank = static_cast<uint32_t>(failure.code());
  return encode(h, {}, failure.message());
}

// The table message for a group of `size`, from payloads and addresses in rank order.
// (authenticated: the kind carries kAuthenticated, and each rank's table_mac follows it.)
inline std::string encode_table(const std::vector<std::string>& payloads,
                                const std::vector<std::string>& addresses, bool authenticated) {
  std::string body;
  for (size_t r = 0; r < payloads.size(); ++r) {
    put_u32(body, static_cast<uint32_t>(payloads[r].size()));
    body.append(payloads[r]);
    put_u32(body, static_cast<uint32_t>(addresses[r].size()));
    body.append(addresses[r]);
  }
  Header h;
  h.kind = kTable | (authenticated ? kAuthenticated : 0u);
  h.size = static_cast<uint32_t>(payloads.size());
  return encode(h, {}, body);
}

// A challenge (either way): the sender's nonce; a rank's names it (rank, pid) for the server's
// logs, as its hello will.
inline std::string encode_challenge(std::string_view nonce, uint32_t rank = 0, uint32_t pid = 0) {
  Header h;
  h.kind = kChallenge | kAuthenticated;
  h.rank = rank;
  h.pid = pid;
  return encode(h, {}, nonce);
}

// A hello or join (header kind without kAuthenticated) authenticated under `secret` for the
// server's challenge `server_nonce`: the kind gains the flag and the body the rank's nonce and
// the mac.
inline std::string encode_authenticated(Header h, std::string_view round, std::string_view body,
                                        std::string_view secret, std::string_view rank_nonce,
                                        std::string_view server_nonce) {
  h.kind |= kAuthenticated;
  std::string body_with_nonce(body);
  body_with_nonce.append(rank_nonce);
  body_with_nonce.append(kMacBytes, '\0');  // counted in body_len, replaced below
  std::string out = encode(h, round, body_with_nonce);
  const Digest mac =
      hmac_sha256(secret, {"tuteld hello", server_nonce, std::string_view(out).substr(0, out.size() - kMacBytes)});
  out.replace(out.size() - kMacBytes, kMacBytes, as_view(mac));
  return out;
}

// Checks an authenticated hello or join (the whole message) against the nonces of its
// connection: the server's challenge and the rank's own, which the message must repeat.
inline bool verify_authenticated(std::string_view message, std::string_view secret, std::string_view rank_nonce,
                                 std::string_view server_nonce) {
  if (message.size() < kHeaderBytes + kAuthBytes) return false;
  const std::string_view signed_part = message.substr(0, message.size() - kMacBytes);
  const Digest mac = hmac_sha256(secret, {"tuteld hello", server_nonce, signed_part});
  // Both compared, whatever the first gives: no early exit to time.
  const bool mac_ok = constant_time_equal(as_view(mac), message.substr(message.size() - kMacBytes));
  const bool nonce_ok = constant_time_equal(signed_part.substr(signed_part.size() - kNonceBytes), rank_nonce);
  return mac_ok && nonce_ok;
}

// What follows an authenticated table for the connection of these nonces; `table_digest` is the
// SHA-256 of the whole table message (header included).
inline std::string table_mac(std::string_view secret, std::string_view rank_nonce, std::string_view server_nonce,
                             const Digest& table_digest) {
  return std::string(
      as_view(hmac_sha256(secret, {"tuteld table", rank_nonce, server_nonce, as_view(table_digest)})));
}

inline std::string address_of(const std::string& ip, uint32_t pid) {
  return ip + ", pid " + std::to_string(pid);
}

// "1, 4, 7" (the first 16, then a count).
inline std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i == 16) return s + ", ... (" + std::to_string(ranks.size()) + " in all)";
    if (i > 0) s += ", ";
    s += std::to_string(ranks[i]);
  }
  return s;
}

}  // namespace tutel::comm::wire
