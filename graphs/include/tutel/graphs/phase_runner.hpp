// PhaseRunner: runs the phases of a step that keeps its own buffers (the expert-parallel layer's
// route, experts and backward), eagerly or as captured graphs (DESIGN §3 "Plans and graphs": a
// GPU step is a CUDA graph with the NCCL calls inside).
//
// A phase is a fixed sequence of backend ops and collectives that neither allocates nor waits
// for the device nor reads device memory on the host. Its PhaseKey names everything a capture
// bakes in: the phase, its sizes and scalars, and every address its ops touch. The graph runner
// runs a key's ops eagerly the first time it sees it (which also warms every lazy allocation
// below: the backend's scratch, NCCL's connections), captures them the second time and launches
// the captured graph from then on; its few most recently used graphs are kept. A caller whose
// buffers move changes its keys (an epoch in the key), so a stale graph is never launched.
//
// Thread-safety: one thread at a time, like the backend whose queue it records.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::graphs {

struct PhaseKey {
  int phase = 0;
  // Sizes, scalars' bits and addresses, in an order the caller keeps fixed per phase.
  std::vector<uint64_t> words;
  bool operator==(const PhaseKey&) const = default;

  PhaseKey& add(uint64_t w) {
    words.push_back(w);
    return *this;
  }
  PhaseKey& add(const void* p) { return add(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p))); }
};

struct PhaseKeyHash {
  size_t operator()(const PhaseKey& k) const noexcept;
};

struct PhaseRunnerStats {
  uint64_t eager_runs = 0;   // phases run op by op (a key's first time, or no graphs)
  uint64_t captures = 0;     // graphs captured
  uint64_t launches = 0;     // graph launches (a capture is launched at once too)
  uint64_t evictions = 0;    // graphs dropped for newer keys
};

class PhaseRunner {
 public:
  virtual ~PhaseRunner() = default;
  // Whether phases may be captured: their collectives must then be ordered on the backend's
  // queue (a communicator on the backend's stream that returns once it has enqueued).
  virtual bool captures() const = 0;
  // Runs the phase `key` names, whose ops are `ops`: directly, or as a graph of them.
  virtual Status run(const PhaseKey& key, const std::function<Status()>& ops) = 0;
  virtual const PhaseRunnerStats& stats() const = 0;
};

// Runs every phase op by op.
class EagerPhaseRunner final : public PhaseRunner {
 public:
  bool captures() const override { return false; }
  Status run(const PhaseKey&, const std::function<Status()>& ops) override {
    ++stats_.eager_runs;
    return ops();
  }
  const PhaseRunnerStats& stats() const override { return stats_; }

 private:
  PhaseRunnerStats stats_;
};

// One captured graph, ready to launch on the queue it was captured from.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual Status launch() = 0;
};

// How a backend's queue is recorded: begin(), the ops, end() (also after the ops failed, to
// leave capture mode; the graph is then discarded).
class GraphCapture {
 public:
  virtual ~GraphCapture() = default;
  virtual Status begin() = 0;
  virtual Result<std::unique_ptr<CapturedGraph>> end() = 0;
};

class GraphPhaseRunner final : public PhaseRunner {
 public:
  explicit GraphPhaseRunner(std::unique_ptr<GraphCapture> capture, size_t max_graphs = 16);
  bool captures() const override { return true; }
  Status run(const PhaseKey& key, const std::function<Status()>& ops) override;
  const PhaseRunnerStats& stats() const override { return stats_; }
  size_t graphs() const { return lru_.size(); }

 private:
  struct Entry {
    PhaseKey key;
    std::unique_ptr<CapturedGraph> graph;
  };
  using Lru = std::list<Entry>;  // most recent first

  std::unique_ptr<GraphCapture> capture_;
  size_t max_graphs_;
  Lru lru_;
  std::unordered_map<PhaseKey, Lru::iterator, PhaseKeyHash> index_;
  // Keys that ran eagerly once: the next run of one is captured. Bounded (oldest out).
  std::list<PhaseKey> seen_;
  PhaseRunnerStats stats_;
};

// The runner for `backend`: graph capture on its stream where it has one and CUDA is built
// (CUDA graphs, thread-local capture mode), else eager. `max_graphs` bounds the graphs kept.
std::unique_ptr<PhaseRunner> make_phase_runner(Backend& backend, size_t max_graphs = 16);

}  // namespace tutel::graphs
