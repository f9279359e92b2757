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
  // While the stream is captured into a graph, neither a wait nor a free is allowed (either
  // would invalidate the capture and leak the block): the block stays cached, over the limit
  // until the next trim.
  if (cached_ + cls <= max_cached_ || capturing()) {
    free_[cls].push_back(data);
    cached_ += cls;
    return;
  }
  // Queued work may still read the block: free it only once the stream has drained.
  if (cudaStreamSynchronize(stream_) != cudaSuccess || cudaFree(data) != cudaSuccess)
    (void)cudaGetLastError();  // a sticky error stays; anything else must not fail a later launch
}

void DevicePool::trim() {
  if (cached_ == 0 || capturing()) return;
  if (cudaStreamSynchronize(stream_) != cudaSuccess) (void)cudaGetLastError();
  for (auto& [cls, blocks] : free_)
    for (void* p : blocks)
      if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
  free_.clear();
  cached_ = 0;
}

}  // namespace tutel::cuda
