// Shared secrets: reading them from files, comparing them, and proving knowledge of one.
//
// Two features stand on this: a tenant's secret, which its clients present in their hello on
// top of the uid mapping (several jobs under one uid, containers running as root), and the
// cluster's secret, which daemons prove to each other when their ranks bootstrap over TCP
// (a process that can reach a coordinator's port must not join a group, nor pose as the
// coordinator and hand the ranks a table of its own). The cluster's secret never crosses the
// wire: each side proves it with an HMAC-SHA256 over the other's fresh nonce.
//
// SHA-256 and HMAC are implemented here (FIPS 180-4, RFC 2104) rather than taken from OpenSSL:
// they are ~100 lines, checked against the standards' test vectors, and keep the daemon free of
// a dependency that the GPU machines would have to be given too (tools/gpu-deps.sh).
//
// Thread-safety: free functions without shared state; a Sha256 is a value.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  Sha256& update(const void* data, size_t bytes);
  Sha256& update(std::string_view s) { return update(s.data(), s.size()); }
  Digest finish();  // the object is spent afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

Digest sha256(std::string_view data);
// HMAC-SHA256 of the parts, concatenated, under `key`.
Digest hmac_sha256(std::string_view key, std::initializer_list<std::string_view> parts);

// Equal contents, in time that depends on the lengths only (not on where they first differ).
bool constant_time_equal(std::string_view a, std::string_view b);

// Lowercase hexadecimal, two characters per byte: how a secret of any bytes travels in JSON.
std::string to_hex(std::string_view bytes);

inline std::string_view as_view(const Digest& d) {
  return {reinterpret_cast<const char*>(d.data()), d.size()};
}

// `n` bytes from the kernel's random source (getrandom), for nonces.
Result<std::string> random_bytes(size_t n);

// Secrets are 16 to 4096 bytes, after trailing whitespace (a final newline) is cut.
inline constexpr size_t kMinSecretBytes = 16, kMaxSecretBytes = 4096;

// Reads a secret from a file. The file must be a regular file that other users can neither
// read nor write (mode o-rwx; g-w), or the secret protects nothing: such a file is refused
// with the chmod that fixes it. `what` names the setting in messages ("tenant 'a' secret_file").
Result<std::string> read_secret_file(const std::string& path, std::string_view what);

}  // namespace tutel
