// CUDA helpers of tutel-bench (included only by sources compiled with CUDA): runtime errors as
// Status, and medians of work timed between two events on one stream.
// Thread-safety: an EventTimer is used by one thread at a time.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::bench {

inline Status cuda_status(cudaError_t err, const char* expr, const char* file, int line) {
  std::string msg = std::string(expr) + " failed at " + file + ":" + std::to_string(line) + ": " +
                    cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(std::move(msg));
  return Status::Internal(std::move(msg));
}

#define TUTEL_BENCH_CUDA_CHECK(expr)                                                  \
  do {                                                                                \
    const cudaError_t _bench_cuda_err = (expr);                                       \
    if (_bench_cuda_err != cudaSuccess)                                               \
      return ::tutel::bench::cuda_status(_bench_cuda_err, #expr, __FILE__, __LINE__); \
  } while (0)

// Two events bracketing work queued on one stream.
class EventTimer {
 public:
  EventTimer() = default;
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer() {
    if (start_) (void)cudaEventDestroy(start_);
    if (stop_) (void)cudaEventDestroy(stop_);
  }

  Status init() {
    TUTEL_BENCH_CUDA_CHECK(cudaEventCreate(&start_));
    TUTEL_BENCH_CUDA_CHECK(cudaEventCreate(&stop_));
    return Status::OK();
  }
  Status start(cudaStream_t stream) {
    TUTEL_BENCH_CUDA_CHECK(cudaEventRecord(start_, stream));
    return Status::OK();
  }
  Status stop(cudaStream_t stream) {
    TUTEL_BENCH_CUDA_CHECK(cudaEventRecord(stop_, stream));
    return Status::OK();
  }
  // Waits for the stop event; the GPU time between the two events.
  Result<double> seconds() {
    TUTEL_BENCH_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    TUTEL_BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Runs `fn` (which queues work on `stream`, and may wait for it) `warmup` times, then `repeats`
// times between two events; the median GPU seconds from the first event to the second, each run
// waited for before the next starts.
inline Result<double> median_stream_seconds(cudaStream_t stream, int warmup, int repeats,
                                            const std::function<Status()>& fn) {
  EventTimer timer;
  TUTEL_RETURN_IF_ERROR(timer.init());
  for (int i = 0; i < warmup; ++i) TUTEL_RETURN_IF_ERROR(fn());
  TUTEL_BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    TUTEL_RETURN_IF_ERROR(timer.start(stream));
    TUTEL_RETURN_IF_ERROR(fn());
    TUTEL_RETURN_IF_ERROR(timer.stop(stream));
    TUTEL_ASSIGN_OR_RETURN(const double secs, timer.seconds());
    t.push_back(secs);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace tutel::bench
