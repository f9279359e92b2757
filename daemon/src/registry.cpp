#include "registry.hpp"

#include <algorithm>
#include <optional>
#include <random>

namespace tutel::daemon {

Registry::Registry(const std::vector<TenantConfig>& tenants, std::vector<std::unique_ptr<Rank>>& ranks)
    : ranks_(ranks), rank_bytes_(ranks.size(), 0) {
  for (const TenantConfig& t : tenants) {
    tenants_[t.name].config = t;
    tenants_[t.name].memory = std::make_shared<TenantMemory>(t.name, t.max_memory_bytes);
    for (auto& rank : ranks) rank->lock.set_share(t.name, t.share);
  }
  // Handles start at a random point so a handle from a previous daemon run is not silently
  // accepted as one of this run's.
  next_handle_ = (std::random_device{}() & 0xffffff) * 1000 + 1;
}

Result<std::string> Registry::tenant_for(uid_t uid, gid_t gid) const {
  std::lock_guard lock(mutex_);
  for (const auto& [name, t] : tenants_)
    if (std::count(t.config.uids.begin(), t.config.uids.end(), uid)) return name;
  for (const auto& [name, t] : tenants_)
    if (std::count(t.config.gids.begin(), t.config.gids.end(), gid)) return name;
  return Status::PermissionDenied("uid " + std::to_string(uid) + " / gid " + std::to_string(gid) +
                                  " belongs to no tenant; add it to a [[tenant]]'s uids or gids in the daemon's config");
}

const TenantConfig* Registry::tenant_config(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? nullptr : &it->second.config;
}

Result<LayerRef> Registry::create(const std::string& tenant, const LayerDefinition& def, const std::string& spec_text) {
  size_t rank_index = 0;
  std::shared_ptr<TenantMemory> memory;
  {
    std::lock_guard lock(mutex_);
    auto it = tenants_.find(tenant);
    if (it == tenants_.end()) return Status::NotFound("no tenant '" + tenant + "'");
    Tenant& t = it->second;
    if (t.layers_by_name.count(def.name))
      return Status::AlreadyExists("tenant '" + tenant + "' already has a layer '" + def.name +
                                   "'; attach to it, or destroy it first");
    if (static_cast<int64_t>(t.layers_by_name.size()) >= t.config.max_layers) {
      ++t.max_layers_refusals;
      return Status::ResourceExhausted("tenant '" + tenant + "' has reached its quota of " +
                                       std::to_string(t.config.max_layers) + " layers");
    }
    // The least loaded of the ranks still serving.
    std::optional<size_t> least;
    for (size_t r = 0; r < ranks_.size(); ++r)
      if (ranks_[r]->health.in_service() && (!least || rank_bytes_[r] < rank_bytes_[*least])) least = r;
    if (!least) {
      const RankHealth::Loss first = *ranks_.front()->health.loss();
      return Status::Unavailable("no rank of this tuteld can take layer '" + def.name +
                                 "': every one is out of service (rank 0, " + first.device + ": " + first.error +
                                 "); restart tuteld");
    }
    rank_index = *least;
    memory = it->second.memory;
  }
  // Built outside the lock: loading weights can take a while.
  TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<ServedLayer> built,
                         ServedLayer::create(def, spec_text, memory, *ranks_[rank_index]));
  std::lock_guard lock(mutex_);
  Tenant& t = tenants_.at(tenant);
  // Other creations of the tenant ran meanwhile: both checks again.
  if (t.layers_by_name.count(def.name))
    return Status::AlreadyExists("tenant '" + tenant + "' already has a layer '" + def.name + "'");
  if (static_cast<int64_t>(t.layers_by_name.size()) >= t.config.max_layers) {
    ++t.max_layers_refusals;
    return Status::ResourceExhausted("tenant '" + tenant + "' has reached its quota of " +
                                     std::to_string(t.config.max_layers) + " layers");
  }
  const uint64_t handle = next_handle_++;
  rank_bytes_[rank_index] += built->memory_bytes();
  t.layers_by_name[def.name] = handle;
  auto layer = std::shared_ptr<ServedLayer>(std::move(built));
  layers_[handle] = layer;
  return LayerRef{handle, layer};
}

uint64_t Registry::quota_refusals(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? 0 : it->second.max_layers_refusals + it->second.memory->refusals();
}

Result<LayerRef> Registry::attach(const std::string& tenant, const std::string& name) const {
  std::lock_guard lock(mutex_);
  auto it = tenants_.find(tenant);
  if (it == tenants_.end()) return Status::NotFound("no tenant '" + tenant + "'");
  auto l = it->second.layers_by_name.find(name);
  if (l == it->second.layers_by_name.end())
    return Status::NotFound("tenant '" + tenant + "' has no layer '" + name + "'; create it first");
  return LayerRef{l->second, layers_.at(l->second)};
}

Result<LayerRef> Registry::find(const std::string& tenant, uint64_t handle) const {
  std::lock_guard lock(mutex_);
  return find_locked(tenant, handle);
}

Result<LayerRef> Registry::find_locked(const std::string& tenant, uint64_t handle) const {
  auto it = layers_.find(handle);
  if (it == layers_.end())
    return Status::NotFound("no layer with handle " + std::to_string(handle) +
                            "; it was destroyed, or belongs to an earlier daemon run: attach by name");
  if (it->second->tenant() != tenant)
    return Status::PermissionDenied("layer handle " + std::to_string(handle) +
                                    " belongs to another tenant; connect as that tenant");
  return LayerRef{handle, it->second};
}

Result<LayerRef> Registry::find_by_name(const std::string& qualified_name) const {
  const size_t slash = qualified_name.find('/');
  if (slash == std::string::npos)
    return Status::InvalidArgument("layer '" + qualified_name + "': name it as tenant/layer");
  return attach(qualified_name.substr(0, slash), qualified_name.substr(slash + 1));
}

Status Registry::destroy(const std::string& tenant, uint64_t handle) {
  std::shared_ptr<ServedLayer> layer;
  {
    // One lock from the lookup to the erase: two destroys of one handle at once release its
    // parameters once, and the loser gets NotFound.
    std::lock_guard lock(mutex_);
    TUTEL_ASSIGN_OR_RETURN(LayerRef ref, find_locked(tenant, handle));
    Tenant& t = tenants_.at(tenant);
    t.layers_by_name.erase(ref.layer->name());
    rank_bytes_[ref.layer->rank_index()] -= ref.layer->memory_bytes();
    layers_.erase(handle);
    layer = std::move(ref.layer);
  }
  return Status::OK();  // `layer` goes (or waits for its requests in flight) outside the lock
}

std::vector<LayerRef> Registry::all() const {
  std::lock_guard lock(mutex_);
  std::vector<LayerRef> out;
  for (const auto& [h, l] : layers_) out.push_back({h, l});
  return out;
}

size_t Registry::size() const {
  std::lock_guard lock(mutex_);
  return layers_.size();
}

uint64_t Registry::trim_idle_plans(const std::string& tenant) const {
  std::vector<std::shared_ptr<ServedLayer>> layers;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [h, l] : layers_)
      if (l->tenant() == tenant) layers.push_back(l);
  }
  uint64_t freed = 0;
  for (const auto& l : layers) freed += l->trim_idle_plans();
  return freed;
}

bool Registry::try_begin_request(const std::string& tenant) {
  std::lock_guard lock(mutex_);
  Tenant& t = tenants_.at(tenant);
  if (t.inflight >= t.config.max_inflight) return false;
  ++t.inflight;
  return true;
}

void Registry::end_request(const std::string& tenant) {
  std::lock_guard lock(mutex_);
  --tenants_.at(tenant).inflight;
}

int64_t Registry::inflight(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).inflight;
}

uint64_t Registry::memory_bytes(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).memory->parameter_bytes();
}

uint64_t Registry::activation_bytes(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).memory->activation_bytes();
}

uint64_t Registry::pending_bytes(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).memory->pending_bytes();
}

int64_t Registry::max_sessions(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).config.max_sessions;
}

std::shared_ptr<TenantMemory> Registry::tenant_memory(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return tenants_.at(tenant).memory;
}

int64_t Registry::layer_count(const std::string& tenant) const {
  std::lock_guard lock(mutex_);
  return static_cast<int64_t>(tenants_.at(tenant).layers_by_name.size());
}

}  // namespace tutel::daemon
