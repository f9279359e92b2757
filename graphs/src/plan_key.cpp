#include "tutel/graphs/plan_key.hpp"

#include <algorithm>
#include <functional>

namespace tutel::graphs {

std::string_view all_to_all_name(AllToAll a) {
  switch (a) {
    case AllToAll::kLinear:
      return "linear";
    case AllToAll::k2DH:
      return "2dh";
  }
  return "?";
}

std::optional<AllToAll> parse_all_to_all(std::string_view name) {
  if (name == "linear") return AllToAll::kLinear;
  if (name == "2dh" || name == "2DH") return AllToAll::k2DH;
  return std::nullopt;
}

std::string PlanKey::to_string() const {
  return "r=" + std::to_string(r) + " d=" + std::to_string(d) +
         " a=" + std::string(all_to_all_name(a)) + " tokens=" + std::to_string(token_bucket) +
         " capacity=" + std::to_string(capacity_bucket) + (training ? " training" : " inference");
}

size_t PlanKeyHash::operator()(const PlanKey& key) const noexcept {
  // splitmix-style mixing of the fields; keys are few, so quality matters more than speed.
  uint64_t h = 0x9e3779b97f4a7c15ull;
  auto mix = [&h](uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
  };
  mix(static_cast<uint32_t>(key.r));
  mix(static_cast<uint32_t>(key.d));
  mix(static_cast<uint64_t>(key.a));
  mix(static_cast<uint64_t>(key.token_bucket));
  mix(static_cast<uint64_t>(key.capacity_bucket));
  mix(key.training ? 1 : 0);
  return static_cast<size_t>(h);
}

int64_t capacity_bound(const LayerSpec& spec, int64_t token_bucket) {
  return layer_capacity(spec, token_bucket, token_bucket);
}

int64_t balanced_capacity(const LayerSpec& spec, int64_t tokens) {
  const int64_t even = (tokens * spec.k + spec.experts - 1) / spec.experts;
  return layer_capacity(spec, tokens, even);
}

int64_t capacity_bucket_for(const LayerSpec& spec, const BucketConfig& buckets,
                            int64_t token_bucket, int64_t capacity) {
  const int64_t bound = capacity_bound(spec, token_bucket);
  if (spec.capacity_factor > 0) return bound;
  return std::min(buckets.capacity.bucket_for(capacity), bound);
}

PlanKey make_key(const ParallelConfig& config, int64_t token_bucket, int64_t capacity_bucket,
                 bool training) {
  return PlanKey{config.r, config.d, config.a, token_bucket, capacity_bucket, training};
}

Status check_buildable(const PlanKey& key, const LayerSpec& spec, int world_size) {
  const std::string where = "plan key '" + key.to_string() + "': ";
  auto refuse = [&](StatusCode code, const std::string& why) { return Status(code, where + why); };
  if (world_size != 1)
    return refuse(StatusCode::kUnimplemented,
                  "plans for an expert group of W = " + std::to_string(world_size) +
                      " ranks are not built yet; this build runs W = 1 plans only");
  if (key.r != 1)
    return refuse(
        StatusCode::kUnimplemented,
        "r = " + std::to_string(key.r) +
            " is not buildable with W = 1: with one rank every expert is local, and only r = 1 "
            "(expert + data parallel) is defined; use r = 1");
  if (key.d != 1)
    return refuse(
        StatusCode::kUnimplemented,
        "d = " + std::to_string(key.d) +
            " is not buildable with W = 1: pipelining cuts the dispatch buffer to overlap the "
            "all-to-all, and one rank has no all-to-all; use d = 1");
  if (key.a != AllToAll::kLinear)
    return refuse(
        StatusCode::kUnimplemented,
        "a = " + std::string(all_to_all_name(key.a)) +
            " is not buildable with W = 1: the hierarchical all-to-all needs ranks on several "
            "nodes; use a = linear");
  if (key.token_bucket < 1)
    return refuse(StatusCode::kInvalidArgument,
                  "token_bucket = " + std::to_string(key.token_bucket) + " must be >= 1");
  if (key.token_bucket * spec.k >= (int64_t{1} << 31))
    return refuse(StatusCode::kInvalidArgument,
                  "token_bucket·k = " + std::to_string(key.token_bucket * spec.k) +
                      " exceeds 2^31 (routing indices are i32); use a smaller token bucket");
  if (key.capacity_bucket < 0)
    return refuse(StatusCode::kInvalidArgument,
                  "capacity_bucket = " + std::to_string(key.capacity_bucket) + " must be >= 0");
  if (spec.capacity_factor > 0) {
    // Capacity is static for f > 0: a smaller bucket could never serve a full token bucket.
    const int64_t need = capacity_bound(spec, key.token_bucket);
    if (key.capacity_bucket < need)
      return refuse(StatusCode::kInvalidArgument,
                    "capacity_bucket = " + std::to_string(key.capacity_bucket) +
                        " is below the capacity " + std::to_string(need) +
                        " that capacity_factor " + std::to_string(spec.capacity_factor) +
                        " gives a full token bucket; use capacity_bucket_for()");
  }
  const int64_t E = spec.experts, C = key.capacity_bucket;
  if (E * C >= (int64_t{1} << 31) ||
      E * C * std::max({spec.model_dim, spec.hidden, spec.out_dim()}) > (int64_t{1} << 40))
    return refuse(
        StatusCode::kResourceExhausted,
        "capacity_bucket " + std::to_string(C) + " for " + std::to_string(E) +
            " experts needs more memory than a layer may use; lower capacity_factor or the bucket");
  return Status::OK();
}

BucketPolicy BucketPolicy::powers_of_two(int64_t min) {
  return BucketPolicy({std::max<int64_t>(min, 1)});
}

Result<BucketPolicy> BucketPolicy::from_list(std::vector<int64_t> buckets) {
  if (buckets.empty())
    return Status::InvalidArgument("bucket list is empty; give at least one size");
  for (size_t i = 0; i < buckets.size(); ++i) {
    if (buckets[i] < 1)
      return Status::InvalidArgument("bucket " + std::to_string(buckets[i]) + " must be >= 1");
    if (i > 0 && buckets[i] <= buckets[i - 1])
      return Status::InvalidArgument(
          "buckets must be strictly ascending: " + std::to_string(buckets[i - 1]) +
          " is followed by " + std::to_string(buckets[i]));
  }
  return BucketPolicy(std::move(buckets));
}

int64_t BucketPolicy::bucket_for(int64_t n) const {
  auto it = std::lower_bound(buckets_.begin(), buckets_.end(), n);
  if (it != buckets_.end()) return *it;
  int64_t b = buckets_.back();
  while (b < n) b = b > (int64_t{1} << 61) ? n : b * 2;
  return b;
}

std::string BucketPolicy::to_string() const {
  std::string s = "[";
  for (size_t i = 0; i < buckets_.size(); ++i) s += (i ? ", " : "") + std::to_string(buckets_[i]);
  return s + ", then x2]";
}

}  // namespace tutel::graphs
