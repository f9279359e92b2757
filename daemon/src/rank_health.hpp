// Whether a rank's device still serves (DESIGN §5: "a sticky CUDA error takes the device out of
// service and is reported").
//
// A device is lost when its backend says so after a failed op (Backend::device_health: on CUDA a
// sticky error, after which nothing can run on it in this process). The rank is then out of
// service until the daemon restarts: its layers' requests, checkpoints and steps are refused at
// once with a message naming the device and the cause, new layers go to the other ranks, and
// `tutelctl status` and the metrics show it. Only the backend's own verdict takes a rank out:
// an op that fails for its arguments, the quota or a peer leaves the device serving.
//
// Thread-safety: any thread. observe() must be called by a thread allowed to run ops on the
// backend (the rank's lock, or the group layer's own backend under the layer's lock).
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>

#include "tutel/core/status.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::daemon {

class RankHealth {
 public:
  struct Loss {
    int rank = 0;
    std::string device;  // "cuda:0"
    std::string error;   // the backend's verdict
    std::chrono::system_clock::time_point since;
  };

  // OK while the rank serves; otherwise Unavailable naming the rank, its device, since when and
  // why, and what to do.
  Status check() const;
  bool in_service() const { return !lost_.load(std::memory_order_acquire); }
  std::optional<Loss> loss() const;

  // After `failure` of an op on `backend` (rank `rank`'s device): asks the backend whether the
  // device is lost, and if it is, takes the rank out of service (the first loss is the one
  // kept, and logged). Returns `failure`, saying the device is now out of service where it is.
  Status observe(int rank, Backend& backend, Status failure);

 private:
  std::atomic<bool> lost_{false};  // loss_ is set: read without the lock on every request
  mutable std::mutex mutex_;
  std::optional<Loss> loss_;  // guarded by mutex_
};

}  // namespace tutel::daemon
