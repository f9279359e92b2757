// PlanKey: what a prebuilt layer step is specialised for (DESIGN §3 "Plans and graphs"), and the
// bucket policies that map a request's token count and capacity onto keys.
//
// A key names the parallel configuration (r, d, a) and the buffer sizes (token bucket, capacity
// bucket) of one plan; changing any of them selects another plan over the same parameters.
// Thread-safety: values; BucketPolicy is immutable after construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::graphs {

// The all-to-all algorithm of the exchange (DESIGN §1): linear, or two-dimensional hierarchical.
enum class AllToAll : uint8_t { kLinear, k2DH };
std::string_view all_to_all_name(AllToAll a);  // "linear", "2dh"
std::optional<AllToAll> parse_all_to_all(std::string_view name);

struct PlanKey {
  int r = 1;                       // adaptive parallelism degree
  int d = 1;                       // pipeline degree (chunks of the dispatch buffer along C)
  AllToAll a = AllToAll::kLinear;  // exchange algorithm
  int64_t token_bucket = 0;        // buffers hold this many tokens; requests have S <= it
  int64_t capacity_bucket = 0;     // buffers hold this many slots per expert; real C <= it
  bool training = false;           // keeps what backward needs and records backward

  auto operator<=>(const PlanKey&) const = default;
  // "r=1 d=1 a=linear tokens=256 capacity=128 training"
  std::string to_string() const;
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const noexcept;
};

// Why `key` cannot be built for `spec` on an expert group of `world_size` ranks, or OK. Only
// W = 1 plans exist so far (r = 1, d = 1, a = linear); the other values are refused with the
// reason, so later configurations are just more keys.
Status check_buildable(const PlanKey& key, const LayerSpec& spec, int world_size = 1);

// The largest capacity any request of at most `token_bucket` tokens can need: the capacity of a
// full bucket with every token of it in one expert (a token picks an expert at most once, so no
// expert count exceeds S). Exact for f > 0, where capacity does not depend on the routing.
int64_t capacity_bound(const LayerSpec& spec, int64_t token_bucket);

// Sizes of buckets: ascending positive values; a request of n uses the smallest bucket >= n.
// Past the last listed bucket the sizes keep doubling, so every request has one.
class BucketPolicy {
 public:
  // min, 2·min, 4·min, ... (min >= 1).
  static BucketPolicy powers_of_two(int64_t min);
  // An explicit list (e.g. from the daemon's config): strictly ascending, every value >= 1.
  static Result<BucketPolicy> from_list(std::vector<int64_t> buckets);

  // The smallest bucket >= n (n >= 1; n <= 0 gives the first bucket).
  int64_t bucket_for(int64_t n) const;
  // The listed buckets (for prebuilding); powers_of_two lists only its first.
  const std::vector<int64_t>& listed() const { return buckets_; }
  std::string to_string() const;

 private:
  explicit BucketPolicy(std::vector<int64_t> buckets) : buckets_(std::move(buckets)) {}
  std::vector<int64_t> buckets_;
};

// How a layer's requests map onto keys: token buckets, and capacity buckets for dynamic
// capacity (f <= 0).
struct BucketConfig {
  BucketPolicy tokens = BucketPolicy::powers_of_two(64);
  BucketPolicy capacity = BucketPolicy::powers_of_two(16);
};

// The parallel part of a key (what the tuner decides).
struct ParallelConfig {
  int r = 1;
  int d = 1;
  AllToAll a = AllToAll::kLinear;
  auto operator<=>(const ParallelConfig&) const = default;
};

// The capacity bucket for requests of `token_bucket` that need `capacity` slots: for f > 0 the
// one static capacity of the bucket; for f <= 0 the policy's bucket, never above the bound.
int64_t capacity_bucket_for(const LayerSpec& spec, const BucketConfig& buckets,
                            int64_t token_bucket, int64_t capacity);

// The capacity a balanced routing of `tokens` would need: the first guess for f <= 0 before any
// request has been seen.
int64_t balanced_capacity(const LayerSpec& spec, int64_t tokens);

PlanKey make_key(const ParallelConfig& config, int64_t token_bucket, int64_t capacity_bucket,
                 bool training);

}  // namespace tutel::graphs
