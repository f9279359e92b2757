#include "tutel/graphs/phase_runner.hpp"

#include <algorithm>

namespace tutel::graphs {
namespace {

// Keys seen once and not captured yet: enough for every phase of a few micro-batches in flight.
constexpr size_t kMaxSeen = 64;

}  // namespace

size_t PhaseKeyHash::operator()(const PhaseKey& k) const noexcept {
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.phase);
  for (uint64_t w : k.words) h = (h ^ w) * 1099511628211ull;
  return static_cast<size_t>(h);
}

GraphPhaseRunner::GraphPhaseRunner(std::unique_ptr<GraphCapture> capture, size_t max_graphs)
    : capture_(std::move(capture)), max_graphs_(std::max<size_t>(max_graphs, 1)) {}

Status GraphPhaseRunner::run(const PhaseKey& key, const std::function<Status()>& ops) {
  if (auto it = index_.find(key); it != index_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second);
    ++stats_.launches;
    return it->second->graph->launch();
  }
  auto seen = std::find(seen_.begin(), seen_.end(), key);
  if (seen == seen_.end()) {
    // First time: op by op, which also makes every lazy allocation a capture must not make.
    seen_.push_front(key);
    if (seen_.size() > kMaxSeen) seen_.pop_back();
    ++stats_.eager_runs;
    return ops();
  }
  seen_.erase(seen);
  TUTEL_RETURN_IF_ERROR(capture_->begin());
  const Status recorded = ops();
  Result<std::unique_ptr<CapturedGraph>> graph = capture_->end();
  TUTEL_RETURN_IF_ERROR(recorded.with_context("capturing a graph of the step"));
  TUTEL_RETURN_IF_ERROR(graph.status());
  ++stats_.captures;
  if (lru_.size() >= max_graphs_) {
    index_.erase(lru_.back().key);
    lru_.pop_back();
    ++stats_.evictions;
  }
  lru_.push_front(Entry{key, std::move(graph).value()});
  index_[key] = lru_.begin();
  ++stats_.launches;
  return lru_.front().graph->launch();
}

#if !defined(TUTEL_HAVE_CUDA)
std::unique_ptr<PhaseRunner> make_phase_runner(Backend&, size_t) {
  return std::make_unique<EagerPhaseRunner>();
}
#endif

}  // namespace tutel::graphs
