// A small caching allocator over cudaMalloc for one backend (one device, one stream).
//
// Freed blocks are kept by size class and handed out again; since every user of a block works
// on the backend's single stream, a block released while queued work still reads it is reused
// only by work queued after that work. A block released beyond the cache limit is freed when the
// stream is idle, else cached over the limit, and the excess freed by the first allocate or
// release that finds the stream idle: neither waits for the stream. The whole cache is freed
// when cudaMalloc runs out, after the stream drains. (cudaFree itself may wait for the device.)
//
// Every backend on a device has a pool of its own (a daemon makes one per group layer), so
// the idle blocks of the others can be what an allocation lacks: when cudaMalloc runs out even
// after this pool's cache is freed, the caches of the device's other pools are freed too, and
// the allocation tried once more. For that the pools of a process are listed by device (the
// device's memory is the process's, so is the list of what caches it).
// Thread-safety: allocate, release and trim may be called from any thread; each pool is meant
// to be used by its backend's thread, and a peer's trim takes a pool only when it is not busy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::cuda {

class DevicePool {
 public:
  DevicePool(int device, cudaStream_t stream, size_t max_cached_bytes);
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;
  ~DevicePool();

  // At least `bytes` of device memory (256-byte aligned), from the cache when a block fits.
  Result<void*> allocate(size_t bytes);
  // Returns a block from allocate(bytes) to the cache (or to the device past the limit, where
  // the stream is idle and not captured). Never waits for the stream.
  void release(void* data, size_t bytes);
  // Waits for the stream, then frees every cached block; nothing while the stream is captured.
  void trim();
  // trim(), then the same on every other pool of this device that is not busy: for a
  // cudaMalloc that ran out (also one that bypasses the pools). Only trim() while this pool's
  // stream is captured.
  void trim_device();

  size_t cached_bytes() const;

 private:
  bool capturing() const;  // the stream is being captured into a graph
  bool stream_idle() const;  // nothing queued on the stream, and not capturing
  // Frees cached blocks past the limit where the stream is idle (releases past it while work was
  // queued cached them).
  void shrink_to_limit();
  void trim_locked();  // waits for the stream, then free_cached_locked()
  void free_cached_locked();  // the stream must be idle
  // Takes the cached blocks out (the stream must be idle), for cudaFree without the lock.
  std::vector<void*> take_cached_locked();
  static void free_blocks(const std::vector<void*>& blocks);
  // The size class of a request: 512-byte steps up to 1 MiB, 2 MiB steps above.
  static size_t size_class(size_t bytes);

  const int device_;
  cudaStream_t stream_;
  size_t max_cached_;
  mutable std::mutex mu_;  // guards what follows
  size_t cached_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

}  // namespace tutel::cuda
