#include "cuda/device_pool.hpp"

#include <string>

#include "cuda/cuda_check.hpp"

namespace tutel::cuda {

size_t DevicePool::size_class(size_t bytes) {
  constexpr size_t kSmallStep = 512, kLargeStep = size_t{2} << 20, kSmallLimit = size_t{1} << 20;
  if (bytes == 0) bytes = 1;
  if (bytes <= kSmallLimit) return (bytes + kSmallStep - 1) / kSmallStep * kSmallStep;
  return (bytes + kLargeStep - 1) / kLargeStep * kLargeStep;
}

Result<void*> DevicePool::allocate(size_t bytes) {
  const size_t cls = size_class(bytes);
  if (auto it = free_.find(cls); it != free_.end() && !it->second.empty()) {
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= cls;
    return p;
  }
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, cls);
  if (err == cudaErrorMemoryAllocation && cached_ > 0) {
    (void)cudaGetLastError();  // out-of-memory is not sticky: clear it and retry on an empty cache
    trim();
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

void DevicePool::release(void* data, size_t bytes) {
  if (!data) return;
  const size_t cls = size_class(bytes);
  if (cached_ + cls <= max_cached_) {
    free_[cls].push_back(data);
    cached_ += cls;
    return;
  }
  // Queued work may still read the block: free it only once the stream has drained.
  (void)cudaStreamSynchronize(stream_);
  (void)cudaFree(data);
}

void DevicePool::trim() {
  if (cached_ == 0) return;
  (void)cudaStreamSynchronize(stream_);
  for (auto& [cls, blocks] : free_)
    for (void* p : blocks) (void)cudaFree(p);
  free_.clear();
  cached_ = 0;
}

}  // namespace tutel::cuda
