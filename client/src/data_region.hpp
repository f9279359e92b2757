// The client's allocator for the arena's data region: first fit over a free list, so requests
// may complete (and be waited for) in any order. At most kRingSlots requests are in flight, each
// holding two blocks, so the lists stay short and linear scans are cheap.
// Thread-safety: none; owned by one Session.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>

namespace tutel::client::internal {

class DataRegion {
 public:
  static constexpr uint64_t kAlignment = 64;  // a cache line: two requests never share one

  DataRegion() = default;
  explicit DataRegion(uint64_t bytes) : bytes_(bytes / kAlignment * kAlignment) {
    if (bytes_ > 0) free_[0] = bytes_;
  }

  // `bytes` rounded up to whole blocks; saturates (never wraps to a small size) near 2^64.
  static uint64_t rounded(uint64_t bytes) {
    if (bytes > UINT64_MAX - kAlignment) return UINT64_MAX / kAlignment * kAlignment;
    return bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  }

  // The offset (from the region's start) of a new block of at least `bytes`, or nothing.
  std::optional<uint64_t> allocate(uint64_t bytes) {
    if (bytes > bytes_) return std::nullopt;
    const uint64_t size = rounded(bytes);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      const uint64_t offset = it->first, left = it->second - size;
      free_.erase(it);
      if (left > 0) free_[offset + size] = left;
      used_[offset] = size;
      return offset;
    }
    return std::nullopt;
  }

  // Returns a block from allocate(); merges it with free neighbours. Unknown offsets are ignored.
  void release(uint64_t offset) {
    auto used = used_.find(offset);
    if (used == used_.end()) return;
    uint64_t begin = offset, size = used->second;
    used_.erase(used);
    auto next = free_.lower_bound(begin);
    if (next != free_.end() && next->first == begin + size) {
      size += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == begin) {
        begin = prev->first;
        size += prev->second;
        free_.erase(prev);
      }
    }
    free_[begin] = size;
  }

  uint64_t capacity() const { return bytes_; }
  uint64_t used_bytes() const {
    uint64_t n = 0;
    for (const auto& [offset, size] : used_) n += size;
    return n;
  }
  size_t blocks_in_use() const { return used_.size(); }

 private:
  uint64_t bytes_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> size, never adjacent to each other
  std::map<uint64_t, uint64_t> used_;  // offset -> size
};

}  // namespace tutel::client::internal
