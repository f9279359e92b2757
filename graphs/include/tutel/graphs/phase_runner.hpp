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
// A phase with collectives inside must be run the same way by every rank of the group: NCCL
// requires that a collective be captured on all ranks or on none, and launched from graphs the
// ranks captured together. Such a caller asks propose() what this rank could do, agrees with its
// group on the least of the proposals (and on one capture round), and runs the phase with
// run_as() in the agreed mode; to capture, every rank capture()s (nothing runs yet), the group
// agrees on whether every capture worked, and then all launch it (run_as kLaunch) or all drop()
// it and run op by op. A phase without collectives may use run(), decided alone: a capture that
// fails there is run op by op at once.
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
  PhaseKey& add(const void* p) {
    return add(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)));
  }
};

struct PhaseKeyHash {
  size_t operator()(const PhaseKey& k) const noexcept;
};

struct PhaseRunnerStats {
  uint64_t eager_runs = 0;  // phases run op by op (a key's first time, or no graphs)
  uint64_t captures = 0;    // graphs captured
  uint64_t launches = 0;    // graph launches (a capture is launched at once too)
  uint64_t evictions = 0;   // graphs dropped for newer keys
  // Captures that gave no graph: CUDA refused one, or an op failed inside it (the phase then runs
  // op by op, from then on). A test that expects graphs asserts none, since the op-by-op
  // fallback gives the same results.
  uint64_t capture_failures = 0;
};

// How a phase runs, from least to most ready: op by op, captured (and launched) now, or
// launched from a graph captured before.
enum class PhaseMode : uint8_t { kEager = 0, kCapture = 1, kLaunch = 2 };

struct PhaseProposal {
  PhaseMode mode = PhaseMode::kEager;
  uint64_t round = 0;  // kLaunch: the capture round of the graph this rank holds for the key
  // kLaunch: the traffic its collectives move per launch (capture()'s `traffic_issued`), which
  // no host call issues again: the caller counts it (Communicator::count_replayed).
  uint64_t traffic = 0;
};

class PhaseRunner {
 public:
  virtual ~PhaseRunner() = default;
  // Whether phases may be captured: their collectives must then be ordered on the backend's
  // queue (a communicator on the backend's stream that returns once it has enqueued).
  virtual bool captures() const = 0;
  // Runs the phase `key` names, whose ops are `ops`, as this runner decides alone: for phases
  // without collectives.
  virtual Status run(const PhaseKey& key, const std::function<Status()>& ops) = 0;
  // What run() would do with `key`.
  virtual PhaseProposal propose(const PhaseKey& key) const = 0;
  // Runs the phase op by op (kEager) or launches its graph of `round` (kLaunch), which must
  // exist; never above what propose() says.
  virtual Status run_as(const PhaseKey& key, PhaseMode mode, uint64_t round,
                        const std::function<Status()>& ops) = 0;
  // Records the phase's graph under `round` without running anything (the key must be ready to
  // capture). On failure nothing is kept and the key runs op by op from then on.
  // `traffic_issued`, where given, reads a counter of the collectives' traffic issued into
  // captures (Communicator::captured_traffic): what it grows by is kept with the graph.
  virtual Status capture(const PhaseKey& key, uint64_t round, const std::function<Status()>& ops,
                         const std::function<uint64_t()>& traffic_issued = {}) = 0;
  // Forgets the key's graph (a peer's capture of it failed).
  virtual void drop(const PhaseKey& key) = 0;
  // Drops every graph and everything seen: after a failed collective, whose communicator the
  // graphs' collectives may belong to.
  virtual void clear() = 0;
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
  PhaseProposal propose(const PhaseKey&) const override { return {}; }
  Status run_as(const PhaseKey& key, PhaseMode mode, uint64_t,
                const std::function<Status()>& ops) override {
    if (mode != PhaseMode::kEager)
      return Status::Internal("an eager phase runner was asked to launch a graph");
    return run(key, ops);
  }
  Status capture(const PhaseKey&, uint64_t, const std::function<Status()>&,
                 const std::function<uint64_t()>&) override {
    return Status::Internal("an eager phase runner was asked to capture a graph");
  }
  void drop(const PhaseKey&) override {}
  void clear() override {}
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
  explicit GraphPhaseRunner(std::unique_ptr<GraphCapture> capture, size_t max_graphs = 64);
  bool captures() const override { return true; }
  Status run(const PhaseKey& key, const std::function<Status()>& ops) override;
  PhaseProposal propose(const PhaseKey& key) const override;
  Status run_as(const PhaseKey& key, PhaseMode mode, uint64_t round,
                const std::function<Status()>& ops) override;
  Status capture(const PhaseKey& key, uint64_t round, const std::function<Status()>& ops,
                 const std::function<uint64_t()>& traffic_issued = {}) override;
  void drop(const PhaseKey& key) override;
  void clear() override;
  const PhaseRunnerStats& stats() const override { return stats_; }
  size_t graphs() const { return lru_.size(); }

 private:
  struct Entry {
    PhaseKey key;
    std::unique_ptr<CapturedGraph> graph;
    uint64_t round;
    uint64_t traffic;
  };
  using Lru = std::list<Entry>;  // most recent first

  std::unique_ptr<GraphCapture> capture_;
  size_t max_graphs_;
  Lru lru_;
  std::unordered_map<PhaseKey, Lru::iterator, PhaseKeyHash> index_;
  // Keys that ran eagerly once: the next run of one is captured. Bounded (oldest out).
  std::list<PhaseKey> seen_;
  // Keys whose capture failed: op by op from then on (until clear()), so an op that cannot be
  // captured costs one failed request, not every other one.
  std::list<PhaseKey> failed_;
  uint64_t local_round_ = 0;  // capture rounds of run()'s own decisions
  PhaseRunnerStats stats_;
};

// The runner for `backend`: graph capture on its stream where it has one and CUDA is built
// (CUDA graphs, thread-local capture mode), else eager. `max_graphs` bounds the graphs kept:
// a pipelined group layer holds about three keys per micro-batch in flight.
std::unique_ptr<PhaseRunner> make_phase_runner(Backend& backend, size_t max_graphs = 64);

}  // namespace tutel::graphs
