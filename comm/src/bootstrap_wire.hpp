// The framed messages of the bootstrap coordinator (bootstrap.cpp) and of the rendezvous
// service (rendezvous.cpp), which share them.
//
// Wire format (little-endian): a 32-byte header {magic, kind, rank, size, local_size, pid,
// round_len, body_len}, then `round` and the body. A hello's body is the rank's payload; a
// join's (rendezvous) body is {u32 timeout_ms, payload} and its round is "<round>@<group>"; a
// table's body is, per rank, {u32 len, payload, u32 len, address}; an error's body is the
// message and its `rank` field carries the StatusCode.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/comm/bootstrap.hpp"

namespace tutel::comm::wire {

constexpr uint32_t kMagic = 0x31424354;  // "TCB1"
constexpr uint32_t kHello = 1, kTable = 2, kError = 3, kJoin = 4;
constexpr size_t kHeaderBytes = 32;
constexpr size_t kMaxPayload = size_t{1} << 20;
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
inline std::string encode_table(const std::vector<std::string>& payloads,
                                const std::vector<std::string>& addresses) {
  std::string body;
  for (size_t r = 0; r < payloads.size(); ++r) {
    put_u32(body, static_cast<uint32_t>(payloads[r].size()));
    body.append(payloads[r]);
    put_u32(body, static_cast<uint32_t>(addresses[r].size()));
    body.append(addresses[r]);
  }
  Header h;
  h.kind = kTable;
  h.size = static_cast<uint32_t>(payloads.size());
  return encode(h, {}, body);
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
