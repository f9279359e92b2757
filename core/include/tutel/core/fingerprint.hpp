// A 64-bit FNV-1a fingerprint of values or bytes, in the order given: what ranks compare to tell
// whether they were given the same thing (a layer spec, a gate's weights). Not cryptographic.
// Thread-safety: a value; distinct objects may be used from different threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tutel {

class Fingerprint {
 public:
  Fingerprint& add_bytes(const void* data, size_t bytes) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; ++i) hash_ = (hash_ ^ p[i]) * 1099511628211ull;
    return *this;
  }
  template <typename T>
  Fingerprint& add(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    return add_bytes(bytes, sizeof(T));
  }
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 14695981039346656037ull;
};

}  // namespace tutel
