#include "rank_health.hpp"

#include <ctime>
#include <utility>

#include "tutel/core/logging.hpp"

namespace tutel::daemon {
namespace {

std::string utc_text(std::chrono::system_clock::time_point t) {
  const std::time_t seconds = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&seconds, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

}  // namespace

Status RankHealth::check() const {
  if (in_service()) return Status::OK();
  std::lock_guard lock(mutex_);
  return Status::Unavailable("rank " + std::to_string(loss_->rank) + " of this tuteld (" + loss_->device +
                             ") is out of service since " + utc_text(loss_->since) + ": " + loss_->error +
                             ". Its layers cannot run or be checkpointed; restart tuteld (layers resume from "
                             "their last checkpoint in state_dir), and create new layers meanwhile (they go to "
                             "the ranks still serving)");
}

std::optional<RankHealth::Loss> RankHealth::loss() const {
  std::lock_guard lock(mutex_);
  return loss_;
}

Status RankHealth::observe(int rank, Backend& backend, Status failure) {
  if (failure.ok()) return failure;
  const Status health = backend.device_health();
  if (health.ok()) return failure;
  {
    std::lock_guard lock(mutex_);
    if (!loss_) {
      loss_ = Loss{rank, backend.device().to_string(), std::string(health.message()), std::chrono::system_clock::now()};
      lost_.store(true, std::memory_order_release);
      TUTEL_LOG(ERROR) << "rank " << rank << " (" << loss_->device << ") is out of service: " << health
                       << " (after: " << failure << ")";
    }
  }
  return failure.with_context("rank " + std::to_string(rank) + "'s device is lost and out of service now");
}

}  // namespace tutel::daemon
