// PlanCache: the plans of one executor (one backend), keyed by (layer, PlanKey), least recently
// used first out when their buffers exceed a byte budget (DESIGN §3 "Plans and graphs").
//
// Layers are registered with their parameters and gradient accumulators; the configured
// buckets can be prebuilt at registration. forward() picks the plan of a request's token bucket
// and, with dynamic capacity (f <= 0), moves to a bigger capacity bucket when the routing
// needs one. A plan a caller still holds (a training forward waiting for its backward) is never
// evicted, and forward() never hands it to another step: a key whose plans are all held gets
// one more instance of the same plan, so pipelined micro-batches of one bucket each keep their
// own state until their backwards, in any order. remove_layer() drops a layer's plans from the
// cache, and those still held die with their last holder.
// Thread-safety: one thread at a time (the executor's), like the Backend it builds on, which
// must outlive the cache and every plan it handed out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/graphs/plan.hpp"
#include "tutel/graphs/plan_key.hpp"

namespace tutel::graphs {

// The daemon's handle of a layer.
using LayerId = uint64_t;

// Counters for metrics export.
struct PlanCacheStats {
  uint64_t hits = 0;            // lookups served by a cached plan
  uint64_t misses = 0;          // lookups that had to build a plan
  uint64_t builds = 0;          // plans built (misses and prebuilds)
  uint64_t build_failures = 0;  // builds refused (key not buildable, budget, device memory)
  uint64_t evictions = 0;       // plans dropped to stay within max_bytes (or by trim())
  uint64_t capacity_moves = 0;  // forwards rerun on a bigger capacity bucket
  size_t bytes = 0;             // device memory of the cached plans
  size_t max_bytes = 0;         // the budget
  size_t plans = 0;             // cached plans (every instance counts)
  size_t held = 0;              // of which a caller holds (steps waiting for their backward)
};

struct PlanCacheOptions {
  size_t max_bytes = size_t{1} << 30;
  BucketConfig buckets;
  PlanKind kind = PlanKind::kAuto;
};

// What a forward ran on: keep `plan` until that step's backward has run on it.
struct PlanStep {
  std::shared_ptr<Plan> plan;
  RoutingStats stats;
};

class PlanCache {
 public:
  PlanCache(Backend& backend, PlanCacheOptions options);
  PlanCache(const PlanCache&) = delete;
  PlanCache& operator=(const PlanCache&) = delete;

  // Registers a layer: its spec, parameters and (for training) gradient accumulators, which
  // must stay in place while the layer is registered. AlreadyExists for a known id.
  Status add_layer(LayerId id, const PlanTarget& target);
  // Drops the layer and its cached plans.
  void remove_layer(LayerId id);
  bool has_layer(LayerId id) const { return layers_.contains(id); }

  // The plan of `key` for the layer: cached (the most recently used instance, held or not), or
  // built (evicting the least recently used plans no caller holds, to stay within max_bytes). A
  // key that cannot be built is refused with the reason (check_buildable); one that cannot fit
  // is ResourceExhausted.
  Result<std::shared_ptr<Plan>> get(LayerId id, const PlanKey& key);
  // Like get(), but never a plan some caller holds: an idle instance of `key`, or a new one.
  Result<std::shared_ptr<Plan>> acquire(LayerId id, const PlanKey& key);
  // Drops every plan no caller holds (counted as evictions); returns the bytes given back. For
  // an owner whose memory runs short elsewhere (the daemon's tenant quota).
  size_t trim();
  // Drops the idle instances of every key beyond its most recently used idle one (counted as
  // evictions; held instances stay); returns the bytes given back. For an owner whose burst of requests in flight
  // is over (a client gone with many forwards pending).
  size_t trim_extra_instances();
  // Builds the keys not cached yet (counted as builds, not misses).
  Status prebuild(LayerId id, std::span<const PlanKey> keys);
  // The keys of the configured token buckets (BucketPolicy::listed()) for one config: for
  // f > 0 each bucket's static capacity, for f <= 0 the capacity a balanced routing needs.
  Result<std::vector<PlanKey>> configured_keys(LayerId id, const ParallelConfig& config,
                                               bool training) const;

  // The key a request of `tokens` tokens starts on: its token bucket and, for f <= 0, the
  // capacity bucket the last forward of that bucket ran on (or, before any, the guess of
  // configured_keys(): the capacity a balanced routing of the whole bucket needs).
  Result<PlanKey> key_for(LayerId id, const ParallelConfig& config, int64_t tokens,
                          bool training) const;

  // One forward of the layer on an idle plan (acquire()) of the key key_for() picks (x [S, M],
  // y [S, O]); when the routing needs more capacity than that plan holds, reruns it on the
  // capacity bucket that holds it (building that plan) and remembers the bucket for the next
  // request.
  Result<PlanStep> forward(LayerId id, const ParallelConfig& config, TensorView x,
                           uint64_t noise_counter, bool training, TensorView y);

  const PlanCacheStats& stats() const { return stats_; }
  const PlanCacheOptions& options() const { return options_; }
  // Whether `key` of the layer is cached (no effect on recency or counters).
  bool contains(LayerId id, const PlanKey& key) const;
  // How many instances of `key` are cached.
  size_t instances(LayerId id, const PlanKey& key) const;
  // Refreshes stats().held (how many cached plans a caller holds now) and returns the stats.
  const PlanCacheStats& refresh_stats();

 private:
  struct Entry {
    LayerId layer;
    PlanKey key;
    std::shared_ptr<Plan> plan;
    size_t bytes;
  };
  struct LayerEntry {
    PlanTarget target;
    // Per (config, token bucket, training), keyed with capacity_bucket 0: the capacity bucket
    // the last completed forward used.
    std::map<PlanKey, int64_t> capacity_in_use;
  };
  using Lru = std::list<Entry>;  // most recent first
  struct CacheKey {
    LayerId layer;
    PlanKey key;
    bool operator==(const CacheKey&) const = default;
  };
  struct CacheKeyHash {
    size_t operator()(const CacheKey& k) const noexcept {
      return PlanKeyHash{}(k.key) ^ (std::hash<uint64_t>{}(k.layer) * 0x9e3779b97f4a7c15ull);
    }
  };

  Result<std::shared_ptr<Plan>> build(LayerId id, const LayerEntry& layer, const PlanKey& key);
  // Makes instance i of a key the most recently used (of the cache and of the key) and returns
  // its plan.
  std::shared_ptr<Plan> touch(std::vector<Lru::iterator>& same_key, size_t i);
  // Evicts unheld plans, least recent first, until `incoming` more bytes fit.
  Status make_room(size_t incoming, const PlanKey& key);
  void erase(Lru::iterator it);

  Backend& backend_;
  PlanCacheOptions options_;
  PlanCacheStats stats_;
  std::unordered_map<LayerId, LayerEntry> layers_;
  Lru lru_;
  // Every cached instance of a key, most recently used first.
  std::unordered_map<CacheKey, std::vector<Lru::iterator>, CacheKeyHash> index_;
};

}  // namespace tutel::graphs
