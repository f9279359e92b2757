#include "cuda/device_pool.hpp"

#include <algorithm>
#include <iterator>
#include <string>

#include "cuda/cuda_check.hpp"

namespace tutel::cuda {
namespace {

// The pools of this process, by device.
class PoolList {
 public:
  static PoolList& instance() {
    static PoolList list;  // process-wide, as the devices' memory is
    return list;
  }
  void add(int device, DevicePool* pool) {
    std::lock_guard lock(mu_);
    pools_[device].push_back(pool);
  }
  void remove(int device, DevicePool* pool) {
    std::lock_guard lock(mu_);
    auto& v = pools_[device];
    v.erase(std::remove(v.begin(), v.end(), pool), v.end());
  }
  // f(pool) for every pool of `device` but `self`, while none of them can go away.
  template <typename F>
  void for_others(int device, const DevicePool* self, F&& f) {
    std::lock_guard lock(mu_);
    for (DevicePool* p : pools_[device])
      if (p != self) f(*p);
  }

 private:
  std::mutex mu_;
  std::unordered_map<int, std::vector<DevicePool*>> pools_;
};

}  // namespace

DevicePool::DevicePool(int device, cudaStream_t stream, size_t max_cached_bytes)
    : device_(device), stream_(stream), max_cached_(max_cached_bytes) {
  PoolList::instance().add(device_, this);
}

DevicePool::~DevicePool() {
  PoolList::instance().remove(device_, this);
  std::lock_guard lock(mu_);
  trim_locked();
}

size_t DevicePool::size_class(size_t bytes) {
  constexpr size_t kSmallStep = 512, kLargeStep = size_t{2} << 20, kSmallLimit = size_t{1} << 20;
  if (bytes == 0) bytes = 1;
  if (bytes <= kSmallLimit) return (bytes + kSmallStep - 1) / kSmallStep * kSmallStep;
  return (bytes + kLargeStep - 1) / kLargeStep * kLargeStep;
}

size_t DevicePool::cached_bytes() const {
  std::lock_guard lock(mu_);
  return cached_;
}

Result<void*> DevicePool::allocate(size_t bytes) {
  shrink_to_limit();
  const size_t cls = size_class(bytes);
  {
    std::lock_guard lock(mu_);
    if (auto it = free_.find(cls); it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= cls;
      return p;
    }
  }
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, cls);
  if (err == cudaErrorMemoryAllocation) {
    // Out-of-memory is not sticky: clear it, free the idle blocks of this device's pools (this
    // one's first), and try once more.
    (void)cudaGetLastError();
    trim_device();
    err = cudaMalloc(&p, cls);
  }
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return Status::ResourceExhausted("cannot allocate " + std::to_string(bytes) +
                                     " bytes of GPU memory; free layers or plans, or lower the batch");
  }
  TUTEL_CUDA_CHECK(err);
  return p;
}

bool DevicePool::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream_, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

void DevicePool::release(void* data, size_t bytes) {
  if (!data) return;
  const size_t cls = size_class(bytes);
  {
    std::lock_guard lock(mu_);
    // The block stays cached, over the limit until the stream is idle (shrink_to_limit), where
    // freeing it would have to wait: while the stream is captured into a graph (a wait or a free
    // would invalidate the capture and leak the block), and while work is queued on it, which
    // may read the block and may be a collective waiting on a peer that is gone (a wait here
    // would have no end: the thread that gives that collective up at its deadline is this one).
    // Caching it holds no more memory than holding it did.
    if (cached_ + cls <= max_cached_ || !stream_idle()) {
      free_[cls].push_back(data);
      cached_ += cls;
      return;
    }
  }
  if (cudaFree(data) != cudaSuccess)
    (void)cudaGetLastError();  // a sticky error stays; anything else must not fail a later launch
}

void DevicePool::shrink_to_limit() {
  std::vector<void*> excess;
  {
    std::lock_guard lock(mu_);
    if (cached_ <= max_cached_ || !stream_idle()) return;
    for (auto it = free_.begin(); it != free_.end() && cached_ > max_cached_;) {
      while (!it->second.empty() && cached_ > max_cached_) {
        excess.push_back(it->second.back());
        it->second.pop_back();
        cached_ -= it->first;
      }
      it = it->second.empty() ? free_.erase(it) : std::next(it);
    }
  }
  free_blocks(excess);  // without the lock: cudaFree may wait for the whole device
}

void DevicePool::trim() {
  std::lock_guard lock(mu_);
  trim_locked();
}

void DevicePool::trim_device() {
  trim();
  // During a capture this thread may not free (cudaFree is refused there, and the refusal ends
  // the capture): blocks taken from the other pools would be lost to the process.
  if (capturing()) return;
  // A pool in use by its own thread is skipped rather than waited for: two pools trimming each
  // other cannot deadlock, and what a busy pool holds is in use or about to be. So is one whose
  // stream has work queued: trimming waits for its stream, which may be a collective waiting on
  // a peer that is gone (holding the pool's lock meanwhile, so its own thread could not even
  // free a buffer on the way to its timeout).
  //
  // Another pool's stream is touched only by the one query in stream_idle(), never synchronized:
  // its owner thread begins captures without this lock, and a synchronize that met one would
  // invalidate it (the phase would then run op by op for good). Idle under the lock is enough:
  // a cached block is nobody's until allocate() hands it out, which needs the lock.
  //
  // The blocks are freed after the other pool's lock is let go: cudaFree waits for the whole
  // device, so it may wait behind a third group's collective on a dead peer until that group
  // gives up; with the lock held meanwhile, the other pool's owner could not allocate or free on
  // its way to its own timeout, and the two would wait on each other for good.
  std::vector<void*> blocks;
  PoolList::instance().for_others(device_, this, [&blocks](DevicePool& other) {
    std::unique_lock lock(other.mu_, std::try_to_lock);
    if (lock.owns_lock() && other.stream_idle()) {
      std::vector<void*> taken = other.take_cached_locked();
      blocks.insert(blocks.end(), taken.begin(), taken.end());
    }
  });
  free_blocks(blocks);
}

bool DevicePool::stream_idle() const {
  if (capturing()) return false;  // (a query would invalidate the capture)
  const cudaError_t err = cudaStreamQuery(stream_);
  if (err == cudaSuccess) return true;
  if (!is_sticky(err)) (void)cudaGetLastError();
  return false;
}

void DevicePool::trim_locked() {
  if (cached_ == 0 || capturing()) return;
  if (cudaStreamSynchronize(stream_) != cudaSuccess) (void)cudaGetLastError();
  free_cached_locked();
}

void DevicePool::free_cached_locked() { free_blocks(take_cached_locked()); }

std::vector<void*> DevicePool::take_cached_locked() {
  std::vector<void*> out;
  for (auto& [cls, blocks] : free_) out.insert(out.end(), blocks.begin(), blocks.end());
  free_.clear();
  cached_ = 0;
  return out;
}

void DevicePool::free_blocks(const std::vector<void*>& blocks) {
  for (void* p : blocks)
    if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace tutel::cuda
