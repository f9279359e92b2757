#include "tutel/graphs/phase_runner.hpp"

#include <algorithm>
#include <string>

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

PhaseProposal GraphPhaseRunner::propose(const PhaseKey& key) const {
  if (std::find(failed_.begin(), failed_.end(), key) != failed_.end()) return {};
  if (auto it = index_.find(key); it != index_.end())
    return {PhaseMode::kLaunch, it->second->round, it->second->traffic};
  if (std::find(seen_.begin(), seen_.end(), key) != seen_.end()) return {PhaseMode::kCapture, 0};
  return {};
}

Status GraphPhaseRunner::run(const PhaseKey& key, const std::function<Status()>& ops) {
  const PhaseProposal p = propose(key);
  if (p.mode != PhaseMode::kCapture) return run_as(key, p.mode, p.round, ops);
  const uint64_t round = ++local_round_;
  // A capture that fails leaves nothing run: the phase runs op by op now, and from then on.
  if (!capture(key, round, ops).ok()) return run_as(key, PhaseMode::kEager, 0, ops);
  return run_as(key, PhaseMode::kLaunch, round, ops);
}

Status GraphPhaseRunner::run_as(const PhaseKey& key, PhaseMode mode, uint64_t round,
                                const std::function<Status()>& ops) {
  const PhaseProposal ready = propose(key);
  if (mode == PhaseMode::kCapture)
    return Status::Internal("phase runner: run_as cannot capture; use capture()");
  if (mode == PhaseMode::kLaunch) {
    if (ready.mode != PhaseMode::kLaunch || ready.round != round)
      return Status::Internal("phase runner asked to launch a graph of capture round " +
                              std::to_string(round) + " it does not hold");
    auto it = index_.find(key);
    lru_.splice(lru_.begin(), lru_, it->second);
    ++stats_.launches;
    return it->second->graph->launch();
  }
  // Op by op, which also makes every lazy allocation a capture must not make; remembered, so
  // that the next time the key may be captured (a key with a graph keeps it).
  if (ready.mode == PhaseMode::kEager &&
      std::find(failed_.begin(), failed_.end(), key) == failed_.end()) {
    seen_.push_front(key);
    if (seen_.size() > kMaxSeen) seen_.pop_back();
  }
  ++stats_.eager_runs;
  return ops();
}

Status GraphPhaseRunner::capture(const PhaseKey& key, uint64_t round,
                                 const std::function<Status()>& ops,
                                 const std::function<uint64_t()>& traffic_issued) {
  if (propose(key).mode == PhaseMode::kEager)
    return Status::Internal("phase runner asked to capture a phase it has not run op by op yet");
  drop(key);  // a graph the key may hold is replaced (the group captures together)
  seen_.remove(key);
  const uint64_t traffic_before = traffic_issued ? traffic_issued() : 0;
  Status captured = capture_->begin();
  if (captured.ok()) {
    const Status recorded = ops();
    const uint64_t traffic = traffic_issued ? traffic_issued() - traffic_before : 0;
    Result<std::unique_ptr<CapturedGraph>> graph = capture_->end();
    captured = recorded.ok() ? graph.status() : recorded;
    if (captured.ok()) {
      ++stats_.captures;
      if (lru_.size() >= max_graphs_) {
        index_.erase(lru_.back().key);
        lru_.pop_back();
        ++stats_.evictions;
      }
      lru_.push_front(Entry{key, std::move(graph).value(), round, traffic});
      index_[key] = lru_.begin();
      return Status::OK();
    }
  }
  ++stats_.capture_failures;
  failed_.push_front(key);
  if (failed_.size() > kMaxSeen) failed_.pop_back();
  return captured.with_context("capturing a graph of the step");
}

void GraphPhaseRunner::drop(const PhaseKey& key) {
  if (auto it = index_.find(key); it != index_.end()) {
    lru_.erase(it->second);
    index_.erase(it);
  }
}

void GraphPhaseRunner::clear() {
  index_.clear();
  lru_.clear();
  seen_.clear();
  failed_.clear();
}

#if !defined(TUTEL_HAVE_CUDA)
std::unique_ptr<PhaseRunner> make_phase_runner(Backend&, size_t) {
  return std::make_unique<EagerPhaseRunner>();
}
#endif

}  // namespace tutel::graphs
