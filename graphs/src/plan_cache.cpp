#include "tutel/graphs/plan_cache.hpp"

#include <algorithm>
#include <iterator>
#include <string>
#include <unordered_set>

namespace tutel::graphs {

PlanCache::PlanCache(Backend& backend, PlanCacheOptions options)
    : backend_(backend), options_(std::move(options)) {
  stats_.max_bytes = options_.max_bytes;
}

Status PlanCache::add_layer(LayerId id, const PlanTarget& target) {
  if (layers_.contains(id))
    return Status::AlreadyExists("layer " + std::to_string(id) +
                                 " is already registered with the plan cache");
  TUTEL_RETURN_IF_ERROR(target.spec.validate());
  TUTEL_RETURN_IF_ERROR(target.weights.validate(target.spec, "weights"));
  layers_.emplace(id, LayerEntry{target, {}});
  return Status::OK();
}

void PlanCache::remove_layer(LayerId id) {
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (it->layer == id) erase(it);
    it = next;
  }
  layers_.erase(id);
}

bool PlanCache::contains(LayerId id, const PlanKey& key) const {
  return index_.contains(CacheKey{id, key});
}

size_t PlanCache::instances(LayerId id, const PlanKey& key) const {
  auto it = index_.find(CacheKey{id, key});
  return it == index_.end() ? 0 : it->second.size();
}

const PlanCacheStats& PlanCache::refresh_stats() {
  stats_.held = 0;
  for (const Entry& e : lru_) stats_.held += e.plan.use_count() > 1 ? 1 : 0;
  return stats_;
}

void PlanCache::erase(Lru::iterator it) {
  stats_.bytes -= it->bytes;
  auto found = index_.find(CacheKey{it->layer, it->key});
  std::vector<Lru::iterator>& same_key = found->second;
  same_key.erase(std::find(same_key.begin(), same_key.end(), it));
  if (same_key.empty()) index_.erase(found);
  lru_.erase(it);
  stats_.plans = lru_.size();
}

size_t PlanCache::trim() {
  const size_t before = stats_.bytes;
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (it->plan.use_count() == 1) {
      erase(it);
      ++stats_.evictions;
    }
    it = next;
  }
  return before - stats_.bytes;
}

size_t PlanCache::trim_extra_instances() {
  const size_t before = stats_.bytes;
  // Most recent first: a key's first idle instance stays, its other idle ones go; held ones
  // are their holders'.
  std::unordered_set<CacheKey, CacheKeyHash> kept;
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (it->plan.use_count() == 1 && !kept.insert(CacheKey{it->layer, it->key}).second) {
      erase(it);
      ++stats_.evictions;
    }
    it = next;
  }
  return before - stats_.bytes;
}

Status PlanCache::make_room(size_t incoming, const PlanKey& key) {
  if (incoming > options_.max_bytes)
    return Status::ResourceExhausted(
        "plan '" + key.to_string() + "' needs " + std::to_string(incoming) +
        " bytes, more than the whole plan cache (" + std::to_string(options_.max_bytes) +
        " bytes); raise the plan cache budget or use smaller buckets");
  // Least recent first; a plan some caller still holds (use_count > 1) stays.
  for (auto it = lru_.end(); stats_.bytes + incoming > options_.max_bytes && it != lru_.begin();) {
    --it;
    if (it->plan.use_count() > 1) continue;
    auto victim = it;
    ++it;  // stays valid: list erasure invalidates only the erased element
    erase(victim);
    ++stats_.evictions;
  }
  if (stats_.bytes + incoming > options_.max_bytes)
    return Status::ResourceExhausted(
        "plan '" + key.to_string() + "' needs " + std::to_string(incoming) +
        " bytes, but plans in use hold " + std::to_string(stats_.bytes) + " of the " +
        std::to_string(options_.max_bytes) +
        " bytes of the plan cache; finish their steps or raise the budget");
  return Status::OK();
}

Result<std::shared_ptr<Plan>> PlanCache::build(LayerId id, const LayerEntry& layer,
                                               const PlanKey& key) {
  auto fail = [this](Status s) {
    ++stats_.build_failures;
    return s;
  };
  if (Status s = check_buildable(key, layer.target.spec); !s.ok()) return fail(std::move(s));
  const size_t bytes = plan_bytes(backend_, layer.target.spec, key, options_.kind,
                                  layer.target.weights.experts.has_bf16_copies());
  if (Status s = make_room(bytes, key); !s.ok()) return fail(std::move(s));
  auto built = build_plan(backend_, layer.target, key, options_.kind);
  if (!built.ok()) {
    Status st = std::move(built).status();
    const std::string context = layer.target.error_context.value_or("layer " + std::to_string(id));
    return fail(context.empty() ? st : st.with_context(context));
  }
  std::shared_ptr<Plan> plan = std::move(built).value();
  ++stats_.builds;
  lru_.push_front(Entry{id, key, plan, plan->bytes()});
  std::vector<Lru::iterator>& same_key = index_[CacheKey{id, key}];
  same_key.insert(same_key.begin(), lru_.begin());
  stats_.bytes += plan->bytes();
  stats_.plans = lru_.size();
  return plan;
}

Result<std::shared_ptr<Plan>> PlanCache::get(LayerId id, const PlanKey& key) {
  auto layer = layers_.find(id);
  if (layer == layers_.end())
    return Status::NotFound("layer " + std::to_string(id) +
                            " is not registered with the plan cache; add_layer() first");
  if (auto it = index_.find(CacheKey{id, key}); it != index_.end()) {
    ++stats_.hits;
    return touch(it->second, 0);
  }
  ++stats_.misses;
  return build(id, layer->second, key);
}

Result<std::shared_ptr<Plan>> PlanCache::acquire(LayerId id, const PlanKey& key) {
  auto layer = layers_.find(id);
  if (layer == layers_.end())
    return Status::NotFound("layer " + std::to_string(id) +
                            " is not registered with the plan cache; add_layer() first");
  if (auto it = index_.find(CacheKey{id, key}); it != index_.end()) {
    std::vector<Lru::iterator>& same_key = it->second;
    for (size_t i = 0; i < same_key.size(); ++i)
      if (same_key[i]->plan.use_count() == 1) {
        ++stats_.hits;
        return touch(same_key, i);
      }
  }
  // Every instance is some step's until its backward: this step gets one of its own.
  ++stats_.misses;
  return build(id, layer->second, key);
}

std::shared_ptr<Plan> PlanCache::touch(std::vector<Lru::iterator>& same_key, size_t i) {
  Lru::iterator entry = same_key[i];
  lru_.splice(lru_.begin(), lru_, entry);  // iterators stay valid
  std::rotate(same_key.begin(), same_key.begin() + static_cast<ptrdiff_t>(i),
              same_key.begin() + static_cast<ptrdiff_t>(i) + 1);
  return entry->plan;
}

Status PlanCache::prebuild(LayerId id, std::span<const PlanKey> keys) {
  auto layer = layers_.find(id);
  if (layer == layers_.end())
    return Status::NotFound("layer " + std::to_string(id) +
                            " is not registered with the plan cache; add_layer() first");
  for (const PlanKey& key : keys) {
    if (index_.contains(CacheKey{id, key})) continue;
    auto built = build(id, layer->second, key);
    if (!built.ok()) return std::move(built).status();
  }
  return Status::OK();
}

Result<std::vector<PlanKey>> PlanCache::configured_keys(LayerId id, const ParallelConfig& config,
                                                        bool training) const {
  auto layer = layers_.find(id);
  if (layer == layers_.end())
    return Status::NotFound("layer " + std::to_string(id) +
                            " is not registered with the plan cache; add_layer() first");
  const LayerSpec& spec = layer->second.target.spec;
  std::vector<PlanKey> keys;
  for (int64_t tokens : options_.buckets.tokens.listed()) {
    const int64_t capacity =
        capacity_bucket_for(spec, options_.buckets, tokens, balanced_capacity(spec, tokens));
    keys.push_back(make_key(config, tokens, capacity, training));
  }
  return keys;
}

Result<PlanKey> PlanCache::key_for(LayerId id, const ParallelConfig& config, int64_t tokens,
                                   bool training) const {
  auto layer = layers_.find(id);
  if (layer == layers_.end())
    return Status::NotFound("layer " + std::to_string(id) +
                            " is not registered with the plan cache; add_layer() first");
  if (tokens < 1)
    return Status::InvalidArgument("a request needs at least one token, got " +
                                   std::to_string(tokens));
  const LayerSpec& spec = layer->second.target.spec;
  const int64_t token_bucket = options_.buckets.tokens.bucket_for(tokens);
  const auto& in_use = layer->second.capacity_in_use;
  if (auto it = in_use.find(make_key(config, token_bucket, 0, training));
      it != in_use.end() && spec.capacity_factor <= 0)
    return make_key(config, token_bucket, it->second, training);
  // The bucket's balanced guess, as configured_keys() gives it: a request's first plan is then
  // the one prebuilt for its bucket (for f > 0 the capacity is the bucket's anyway).
  const int64_t capacity =
      capacity_bucket_for(spec, options_.buckets, token_bucket, balanced_capacity(spec, token_bucket));
  return make_key(config, token_bucket, capacity, training);
}

Result<PlanStep> PlanCache::forward(LayerId id, const ParallelConfig& config, TensorView x,
                                    uint64_t noise_counter, bool training, TensorView y) {
  if (x.rank() != 2 || x.dim(0) < 1)
    return Status::InvalidArgument("x has shape " + x.shape().to_string() +
                                   ", expected [tokens >= 1, model_dim]");
  TUTEL_ASSIGN_OR_RETURN(PlanKey key, key_for(id, config, x.dim(0), training));
  const LayerSpec& spec = layers_.at(id).target.spec;
  // At most one move: the second bucket is chosen to hold the capacity the first one reported.
  for (int attempt = 0; attempt < 2; ++attempt) {
    TUTEL_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, acquire(id, key));
    Result<RoutingStats> ran = plan->forward(x, noise_counter, y);
    if (ran.ok()) {
      if (spec.capacity_factor <= 0)
        layers_.at(id).capacity_in_use[make_key(config, key.token_bucket, 0, training)] =
            key.capacity_bucket;
      return PlanStep{std::move(plan), *ran};
    }
    if (ran.status().code() != StatusCode::kOutOfRange ||
        plan->required_capacity() <= key.capacity_bucket)
      return std::move(ran).status();
    ++stats_.capacity_moves;
    key.capacity_bucket =
        capacity_bucket_for(spec, options_.buckets, key.token_bucket, plan->required_capacity());
  }
  return Status::Internal("capacity bucket did not settle for layer " + std::to_string(id));
}

}  // namespace tutel::graphs
