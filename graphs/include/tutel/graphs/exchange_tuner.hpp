// The online tuner (DESIGN §1): a dictionary keyed by capacity bucket that maps to the fastest
// way to run the expert phase, found by measuring it at run time, identical on every rank.
//
// A way is a parallelism `r` (0: data parallel, every rank gathers every expert's weights and
// keeps its tokens; r >= 1: the tokens travel to their experts, and where s = W / E > 1 ranks
// share each expert, r of them split its H (r = s: each computes its own slice; r < s: groups
// of s / r put their slices together and split the expert's slots instead;
// ExpertParallelOptions::r), and with r >= 1 an all-to-all algorithm `a` and a pipeline degree
// `d` (ExchangeConfig). Switching between them moves no parameter: each rank keeps its slice
// either way.
//
// For a bucket not yet decided, successive forwards run the candidates in turn (round-robin, so
// slow drift of the machine touches every candidate alike): `warmups` rounds that are not
// counted (first-time allocations, a graph's capture), then `trials` rounds that are. Each rank
// times its own runs; when the last trial is recorded, the group takes, per candidate, the MAX
// of the ranks' totals (the group is as slow as its slowest rank) and every rank picks the
// smallest, the lowest candidate on ties. Because every rank sees the same sequence of
// capacities (the capacity is agreed over the group) and the same agreed totals, every rank
// decides at the same forward and decides the same.
//
// A candidate the group cannot run in a bucket (every rank refused it together: a buffer it
// needs does not fit, as r = 0's gathered weights may not) is excluded from that bucket on every
// rank alike: a bucket still measuring starts its rounds again over what is left, a decided one
// takes the next best of its agreed totals. So the tuner never keeps offering what cannot run.
// The expert-parallel layer excludes a whole parallelism r (or every r >= 1), and only when the
// buffers that failed are those ways' own and a candidate of another r is left
// (exclude_parallelism): memory that every way needs is the step's refusal, and may be back for
// the next step.
//
// The dictionary outlives the process where the caller keeps it: decisions() are what the group
// decided, and a tuner created with them (TunerOptions::decided) starts with those buckets
// decided, measuring only the others. Whether they still hold (the same layer, group and
// hardware, and the same on every rank) is the caller's to check: the tuner checks only that
// they fit its candidates.
//
// This class holds the dictionary and the schedule; the caller times the runs and reduces the
// totals (ExpertParallelLayer). Thread-safety: one thread drives it; entries() and decisions() may
// be called from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tutel/comm/communicator.hpp"
#include "tutel/core/status.hpp"

namespace tutel::graphs {

// The most chunks a pipelined expert phase is cut into.
inline constexpr int kMaxPipeline = 64;

struct ExchangeConfig {
  comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear;  // r >= 1
  int pipeline = 1;  // d: chunks of the dispatch buffer along the capacity (r >= 1)
  int r = 1;         // 0: data parallel; >= 1: expert parallel, r ranks per expert split its H
  bool operator==(const ExchangeConfig&) const = default;
  // "r=0", "r=1 a=linear d=2"
  std::string to_string() const;
};

// r = 0 as an ExchangeConfig (algo and pipeline play no part there).
inline constexpr ExchangeConfig kDataParallel{comm::AllToAllAlgo::kLinear, 1, 0};

// A bucket the group decided: what a tuner hands on (ExchangeTuner::decisions) and starts from
// (TunerOptions::decided). Indices are into the tuner's candidates.
struct TunerDecision {
  int64_t capacity_bucket = 1;    // a power of two
  size_t chosen = 0;              // a candidate not excluded
  std::vector<int64_t> total_ns;  // per candidate: the group's agreed totals, >= 0
  std::vector<bool> excluded;     // per candidate: refused by the group in this bucket
  bool operator==(const TunerDecision&) const = default;
};

struct TunerOptions {
  // What to choose from; at most kMaxCandidates. Fewer than two: nothing to tune.
  std::vector<ExchangeConfig> candidates;
  int warmups = 1;  // uncounted rounds per bucket
  int trials = 2;   // counted rounds per bucket, >= 1
  // Buckets decided before (a checkpoint's): they start decided, marked restored.
  std::vector<TunerDecision> decided;
  static constexpr size_t kMaxCandidates = 16;
  // The largest bucket a decision may name (a capacity is far below it).
  static constexpr int64_t kMaxBucket = int64_t{1} << 40;
};

// What `auto` measures (the daemon's r, all_to_all and pipeline = "auto"): for an unset
// dimension, every value worth trying on this group; a set one keeps its value. r: 0 and every
// divisor of `shards` (the ranks per expert, s = W / E where E < W, else 1; with W = 1 only 1:
// there is nothing to gather); where that would make more than kMaxCandidates, the divisors
// between 1 and s are left out. The all-to-all: linear, and 2DH where the group
// spans several nodes of several ranks each (elsewhere 2DH is the linear exchange, or not
// valid). The pipeline: 1, 2 and 4 where chunks overlap the GEMMs
// (ExpertParallelLayer::overlaps_chunks), else 1 only: chunks run one after another there and
// can only cost.
std::vector<ExchangeConfig> auto_candidates(std::optional<int> r,
                                            std::optional<comm::AllToAllAlgo> algo,
                                            std::optional<int> pipeline, int group_size,
                                            int local_size, bool chunks_overlap, int shards = 1);

// One bucket of the dictionary, for the admin API.
struct TunerEntry {
  int64_t capacity_bucket = 0;
  bool decided = false;
  ExchangeConfig chosen;          // when decided
  std::vector<int64_t> total_ns;  // per candidate: the group's agreed totals (when decided)
  int rounds_done = 0;            // while measuring
  std::vector<bool> excluded;     // per candidate: refused by the group in this bucket
  // Decided before this tuner was created (TunerOptions::decided), and still on that choice.
  bool restored = false;
};

class ExchangeTuner {
 public:
  // Refuses an empty candidate list, a negative r (which r >= 1 fit a group is the layer's to
  // check), a pipeline degree outside [1, kMaxPipeline], trials < 1 or warmups < 0, and more
  // than kMaxCandidates; and a decision that does not fit the candidates (another count of
  // totals or exclusions, a chosen index out of range or excluded, a negative total), a bucket
  // that is not a power of two in [1, kMaxBucket], or two decisions of one bucket.
  static Result<ExchangeTuner> create(TunerOptions options);

  // The bucket of a capacity: the smallest power of two >= it.
  static int64_t bucket_for(int64_t capacity);

  const std::vector<ExchangeConfig>& candidates() const { return options_.candidates; }

  // How the next forward in `bucket` runs: the decision, or the candidate whose turn it is.
  ExchangeConfig next(int64_t bucket);
  // Whether that run is timed (the bucket is being measured).
  bool measuring(int64_t bucket) const;
  // Records the time of the run next() gave for `bucket` (only while measuring). Returns true
  // when that was the bucket's last trial: the caller agrees the totals over the group now
  // (totals(), MAX over ranks) and calls decide() with them.
  bool record(int64_t bucket, int64_t nanoseconds);
  // This rank's totals over the counted rounds, per candidate.
  std::vector<int64_t> totals(int64_t bucket) const;
  // Fixes the bucket's choice from the group's agreed totals (one per candidate; those of
  // excluded candidates are ignored).
  Status decide(int64_t bucket, const std::vector<int64_t>& agreed_totals);
  // The group refused to run `config` in `bucket` (every rank calls this alike): excludes it
  // there and returns true, unless it is the last candidate left (false: nothing else to run).
  bool exclude(int64_t bucket, const ExchangeConfig& config);
  // The group refused to run `bucket`'s phase with a parallelism in [r, last_r] for want of a
  // buffer that only those ways need (r = 0's gathered weights; an r < s's gathered part; every
  // r >= 1's exchange buffers): excludes every candidate with such an r there and returns true,
  // unless no candidate of another r is left (false: what is left would need the same buffers,
  // so the refusal is the step's alone).
  bool exclude_parallelism(int64_t bucket, int r, int last_r);
  bool exclude_parallelism(int64_t bucket, int r) { return exclude_parallelism(bucket, r, r); }

  // One bucket's state, to undo exclusions that bought nothing: a forward whose every way was
  // refused leaves the bucket as it found it (the refusal was the step's).
  struct Snapshot;
  std::shared_ptr<const Snapshot> snapshot(int64_t bucket);
  void restore(const std::shared_ptr<const Snapshot>& snapshot);

  std::vector<TunerEntry> entries() const;
  // The decided buckets, in bucket order, as TunerOptions::decided takes them.
  std::vector<TunerDecision> decisions() const;
  // Forgets the buckets TunerOptions::decided gave (they measure afresh at their next
  // forward): the group found its ranks had not restored the same ones.
  void forget_restored();

 private:
  explicit ExchangeTuner(TunerOptions options) : options_(std::move(options)) {}
  struct Bucket {
    int runs = 0;  // runs started while measuring (round = runs / candidates left)
    std::vector<int64_t> total_ns;
    bool decided = false;
    size_t chosen = 0;
    std::vector<bool> excluded;
    std::vector<size_t> left;  // the candidates not excluded, in order
    bool restored = false;
  };
  Bucket& bucket(int64_t key);
  friend struct Snapshot;
  bool exclude_locked(Bucket& b, size_t candidate);  // under mu_; exclude()'s answer
  size_t k() const { return options_.candidates.size(); }
  // The candidate whose turn run `runs` of a measuring bucket is.
  static size_t turn(const Bucket& b) {
    return b.left[static_cast<size_t>(b.runs) % b.left.size()];
  }
  // The lowest of `totals` over the candidates left (the first on ties).
  static size_t best(const Bucket& b, const std::vector<int64_t>& totals);

  TunerOptions options_;
  std::map<int64_t, Bucket> buckets_;
  // Guards buckets_ against entries() from another thread; the driving thread's reads of its
  // own writes need no lock but take it anyway (uncontended, a few times per step).
  mutable std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
};

}  // namespace tutel::graphs
