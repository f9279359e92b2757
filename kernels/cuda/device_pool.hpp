// A small caching allocator over cudaMalloc for one backend (one device, one stream).
//
// Freed blocks are kept by size class and handed out again; since every user of a block works
// on the backend's single stream, a block released while queued work still reads it is reused
// only by work queued after that work. Blocks beyond the cache limit, and the whole cache when
// cudaMalloc runs out, are freed after the stream drains.
// Thread-safety: none; the owning backend is used from one thread at a time.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <unordered_map>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::cuda {

class DevicePool {
 public:
  DevicePool(cudaStream_t stream, size_t max_cached_bytes) : stream_(stream), max_cached_(max_cached_bytes) {}
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;
  ~DevicePool() { trim(); }

  // At least `bytes` of device memory (256-byte aligned), from the cache when a block fits.
  Result<void*> allocate(size_t bytes);
  // Returns a block from allocate(bytes) to the cache (or to the device past the limit).
  void release(void* data, size_t bytes);
  // Waits for the stream, then frees every cached block; nothing while the stream is captured.
  void trim();

  size_t cached_bytes() const { return cached_; }

 private:
  bool capturing() const;  // the stream is being captured into a graph
  // The size class of a request: 512-byte steps up to 1 MiB, 2 MiB steps above.
  static size_t size_class(size_t bytes);

  cudaStream_t stream_;
  size_t max_cached_;
  size_t cached_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

}  // namespace tutel::cuda
