#include "tutel/graphs/exchange_tuner.hpp"

#include <algorithm>
#include <bit>

namespace tutel::graphs {

std::string ExchangeConfig::to_string() const {
  if (r == 0) return "r=0";
  return "r=" + std::to_string(r) + " a=" + std::string(comm::to_string(algo)) +
         " d=" + std::to_string(pipeline);
}

std::vector<ExchangeConfig> auto_candidates(std::optional<int> r,
                                            std::optional<comm::AllToAllAlgo> algo,
                                            std::optional<int> pipeline, int group_size,
                                            int local_size, bool chunks_overlap, int shards) {
  if (r == 0) return {kDataParallel};
  std::vector<comm::AllToAllAlgo> algos{comm::AllToAllAlgo::kLinear};
  if (algo)
    algos = {*algo};
  else if (local_size > 1 && local_size < group_size && group_size % local_size == 0)
    algos.push_back(comm::AllToAllAlgo::k2DH);
  std::vector<int> pipelines{1};
  if (pipeline)
    pipelines = {*pipeline};
  else if (chunks_overlap)
    pipelines = {1, 2, 4};
  std::vector<int> parallelisms;
  if (r) {
    parallelisms = {*r};
  } else {
    for (int d = 1; d <= shards; ++d)
      if (shards % d == 0) parallelisms.push_back(d);
    const size_t ways = algos.size() * pipelines.size();
    if (parallelisms.size() * ways + (group_size > 1 ? 1 : 0) > TunerOptions::kMaxCandidates)
      parallelisms = shards > 1 ? std::vector<int>{1, shards} : std::vector<int>{1};
  }
  std::vector<ExchangeConfig> out;
  if (!r && group_size > 1) out.push_back(kDataParallel);
  for (int p : parallelisms)
    for (comm::AllToAllAlgo a : algos)
      for (int d : pipelines) out.push_back({a, d, p});
  return out;
}

Result<ExchangeTuner> ExchangeTuner::create(TunerOptions options) {
  if (options.candidates.empty())
    return Status::InvalidArgument("the tuner needs at least one candidate configuration");
  if (options.candidates.size() > TunerOptions::kMaxCandidates)
    return Status::InvalidArgument("the tuner takes at most " +
                                   std::to_string(TunerOptions::kMaxCandidates) +
                                   " candidates, got " + std::to_string(options.candidates.size()));
  for (const ExchangeConfig& c : options.candidates)
    if (c.r < 0)
      return Status::InvalidArgument("parallelism r = " + std::to_string(c.r) +
                                     " is negative: r is 0 (data parallel) or at least 1");
    else if (c.pipeline < 1 || c.pipeline > kMaxPipeline)
      return Status::InvalidArgument("pipeline degree " + std::to_string(c.pipeline) +
                                     " is outside [1, " + std::to_string(kMaxPipeline) + "]");
  if (options.trials < 1 || options.warmups < 0)
    return Status::InvalidArgument("the tuner needs trials >= 1 and warmups >= 0 (got " +
                                   std::to_string(options.trials) + " and " +
                                   std::to_string(options.warmups) + ")");
  const size_t k = options.candidates.size();
  std::vector<int64_t> seen;
  for (const TunerDecision& d : options.decided) {
    const std::string which = "the decision for capacity bucket " + std::to_string(d.capacity_bucket);
    if (d.capacity_bucket < 1 || d.capacity_bucket > TunerOptions::kMaxBucket ||
        !std::has_single_bit(static_cast<uint64_t>(d.capacity_bucket)))
      return Status::InvalidArgument(which + ": a bucket is a power of two in [1, 2^40]");
    if (std::find(seen.begin(), seen.end(), d.capacity_bucket) != seen.end())
      return Status::InvalidArgument(which + " is given twice");
    seen.push_back(d.capacity_bucket);
    if (d.total_ns.size() != k || d.excluded.size() != k)
      return Status::InvalidArgument(which + " has " + std::to_string(d.total_ns.size()) + " totals and " +
                                     std::to_string(d.excluded.size()) + " exclusions for " +
                                     std::to_string(k) + " candidates");
    if (d.chosen >= k || d.excluded[d.chosen])
      return Status::InvalidArgument(which + " chooses candidate " + std::to_string(d.chosen) +
                                     ", which is not one of the " + std::to_string(k) +
                                     " candidates left in it");
    if (std::any_of(d.total_ns.begin(), d.total_ns.end(), [](int64_t t) { return t < 0; }))
      return Status::InvalidArgument(which + " has a negative total");
  }
  ExchangeTuner tuner(std::move(options));
  for (const TunerDecision& d : tuner.options_.decided) {
    Bucket& b = tuner.bucket(d.capacity_bucket);
    b.excluded = d.excluded;
    b.left.clear();
    for (size_t i = 0; i < k; ++i)
      if (!b.excluded[i]) b.left.push_back(i);
    b.total_ns = d.total_ns;
    b.chosen = d.chosen;
    b.decided = true;
    b.restored = true;
  }
  return tuner;
}

int64_t ExchangeTuner::bucket_for(int64_t capacity) {
  return capacity <= 1 ? 1 : static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(capacity)));
}

ExchangeTuner::Bucket& ExchangeTuner::bucket(int64_t key) {
  auto [it, inserted] = buckets_.try_emplace(key);
  if (inserted) {
    Bucket& b = it->second;
    b.total_ns.assign(k(), 0);
    b.excluded.assign(k(), false);
    for (size_t i = 0; i < k(); ++i) b.left.push_back(i);
    // One candidate: nothing to measure.
    b.decided = k() == 1;
  }
  return it->second;
}

size_t ExchangeTuner::best(const Bucket& b, const std::vector<int64_t>& totals) {
  size_t chosen = b.left.front();
  for (size_t i : b.left)
    if (totals[i] < totals[chosen]) chosen = i;
  return chosen;
}

ExchangeConfig ExchangeTuner::next(int64_t key) {
  std::lock_guard<std::mutex> lock(*mu_);
  const Bucket& b = bucket(key);
  return options_.candidates[b.decided ? b.chosen : turn(b)];
}

bool ExchangeTuner::measuring(int64_t key) const {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = buckets_.find(key);
  return it == buckets_.end() ? k() > 1 : !it->second.decided;
}

bool ExchangeTuner::record(int64_t key, int64_t nanoseconds) {
  std::lock_guard<std::mutex> lock(*mu_);
  Bucket& b = bucket(key);
  if (b.decided) return false;
  const int left = static_cast<int>(b.left.size());
  if (b.runs / left >= options_.warmups) b.total_ns[turn(b)] += nanoseconds;
  ++b.runs;
  // >= rather than ==: a decision whose agreement failed is tried again at the next run.
  return b.runs >= (options_.warmups + options_.trials) * left;
}

std::vector<int64_t> ExchangeTuner::totals(int64_t key) const {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = buckets_.find(key);
  return it == buckets_.end() ? std::vector<int64_t>(k(), 0) : it->second.total_ns;
}

Status ExchangeTuner::decide(int64_t key, const std::vector<int64_t>& agreed) {
  if (agreed.size() != k())
    return Status::InvalidArgument("the tuner got " + std::to_string(agreed.size()) +
                                   " totals for " + std::to_string(k()) + " candidates");
  std::lock_guard<std::mutex> lock(*mu_);
  Bucket& b = bucket(key);
  // The first of equal values: the lowest candidate wins ties on every rank.
  b.chosen = best(b, agreed);
  b.total_ns = agreed;
  b.decided = true;
  return Status::OK();
}

bool ExchangeTuner::exclude(int64_t key, const ExchangeConfig& config) {
  std::lock_guard<std::mutex> lock(*mu_);
  Bucket& b = bucket(key);
  const auto it = std::find(options_.candidates.begin(), options_.candidates.end(), config);
  if (it == options_.candidates.end()) return false;
  return exclude_locked(b, static_cast<size_t>(it - options_.candidates.begin()));
}

bool ExchangeTuner::exclude_parallelism(int64_t key, int r, int last_r) {
  std::lock_guard<std::mutex> lock(*mu_);
  Bucket& b = bucket(key);
  const auto in_range = [&](size_t i) {
    return options_.candidates[i].r >= r && options_.candidates[i].r <= last_r;
  };
  if (std::all_of(b.left.begin(), b.left.end(), in_range)) return false;
  for (size_t i = 0; i < k(); ++i)
    if (in_range(i) && !b.excluded[i]) (void)exclude_locked(b, i);
  return true;
}

bool ExchangeTuner::exclude_locked(Bucket& b, size_t i) {
  if (b.excluded[i] || b.left.size() == 1) return false;
  b.excluded[i] = true;
  b.left.erase(std::find(b.left.begin(), b.left.end(), i));
  if (b.decided) {
    const size_t before = b.chosen;
    b.chosen = best(b, b.total_ns);  // the next best of the agreed totals
    if (b.chosen != before) b.restored = false;  // a choice this process made
  } else {
    // A round times every candidate left once: the rounds start again over those.
    b.runs = 0;
    b.total_ns.assign(k(), 0);
    if (b.left.size() == 1) {
      b.decided = true;
      b.chosen = b.left.front();
    }
  }
  return true;
}

struct ExchangeTuner::Snapshot {
  int64_t key;
  Bucket bucket;
};

std::shared_ptr<const ExchangeTuner::Snapshot> ExchangeTuner::snapshot(int64_t key) {
  std::lock_guard<std::mutex> lock(*mu_);
  return std::make_shared<const Snapshot>(Snapshot{key, bucket(key)});
}

void ExchangeTuner::restore(const std::shared_ptr<const Snapshot>& s) {
  std::lock_guard<std::mutex> lock(*mu_);
  buckets_[s->key] = s->bucket;
}

std::vector<TunerEntry> ExchangeTuner::entries() const {
  std::lock_guard<std::mutex> lock(*mu_);
  std::vector<TunerEntry> out;
  for (const auto& [key, b] : buckets_) {
    TunerEntry e;
    e.capacity_bucket = key;
    e.decided = b.decided;
    e.chosen = options_.candidates[b.chosen];
    if (b.decided) e.total_ns = b.total_ns;
    e.rounds_done = b.runs / static_cast<int>(b.left.size());
    e.excluded = b.excluded;
    e.restored = b.restored;
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<TunerDecision> ExchangeTuner::decisions() const {
  std::lock_guard<std::mutex> lock(*mu_);
  std::vector<TunerDecision> out;
  for (const auto& [key, b] : buckets_)
    if (b.decided) out.push_back({key, b.chosen, b.total_ns, b.excluded});
  return out;
}

void ExchangeTuner::forget_restored() {
  std::lock_guard<std::mutex> lock(*mu_);
  std::erase_if(buckets_, [](const auto& entry) { return entry.second.restored; });
}

}  // namespace tutel::graphs
