// Tenants and their layers: who may use which layer handle, and the quotas on layers, memory
// and requests in flight.
// Thread-safety: all methods take the registry's mutex; layers are shared_ptrs so a request in
// progress keeps its layer alive even if the layer is destroyed meanwhile.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "served_layer.hpp"
#include "tutel/daemon/config.hpp"

namespace tutel::daemon {

struct LayerRef {
  uint64_t handle = 0;
  std::shared_ptr<ServedLayer> layer;
};

class Registry {
 public:
  Registry(const std::vector<TenantConfig>& tenants, std::vector<std::unique_ptr<Rank>>& ranks);

  // The tenant a peer with these credentials belongs to (uid first, then gid).
  Result<std::string> tenant_for(uid_t uid, gid_t gid) const;
  const TenantConfig* tenant_config(const std::string& tenant) const;

  // Creates a layer for `tenant` on the least-loaded rank, within the tenant's quotas.
  Result<LayerRef> create(const std::string& tenant, const LayerDefinition& def, const std::string& spec_text);
  // How many of the tenant's creations and charges its quotas (max_layers, max_memory_bytes) have
  // refused so far: a ResourceExhausted that moved it was the quota's, not a shortage of memory.
  uint64_t quota_refusals(const std::string& tenant) const;
  // The handle of an existing layer of `tenant`, by name (clients re-attach after reconnecting).
  Result<LayerRef> attach(const std::string& tenant, const std::string& name) const;
  // The layer behind `handle`, if it belongs to `tenant`; a foreign or unknown handle is refused.
  Result<LayerRef> find(const std::string& tenant, uint64_t handle) const;
  Result<LayerRef> find_by_name(const std::string& qualified_name) const;  // "tenant/name"
  Status destroy(const std::string& tenant, uint64_t handle);
  std::vector<LayerRef> all() const;
  size_t size() const;  // how many layers (without references to them)
  // Drops the idle plans of every layer of `tenant` (ServedLayer::trim_idle_plans); returns the
  // bytes given back. Takes each layer's locks in turn: call it holding none.
  uint64_t trim_idle_plans(const std::string& tenant) const;

  // Requests in flight per tenant, against its max_inflight quota.
  bool try_begin_request(const std::string& tenant);
  void end_request(const std::string& tenant);
  int64_t inflight(const std::string& tenant) const;
  // Parameters, gradients and optimizer state of the tenant's layers.
  uint64_t memory_bytes(const std::string& tenant) const;
  // What the tenant's layers hold for forwards (ServedLayer::activation_bytes() summed); counts
  // against max_memory_bytes with memory_bytes().
  uint64_t activation_bytes(const std::string& tenant) const;
  // The part of activation_bytes() held by training forwards waiting for their backwards.
  uint64_t pending_bytes(const std::string& tenant) const;
  int64_t layer_count(const std::string& tenant) const;
  int64_t max_sessions(const std::string& tenant) const;
  // What the tenant holds against max_memory_bytes; device regions are charged to it too.
  std::shared_ptr<TenantMemory> tenant_memory(const std::string& tenant) const;

 private:
  struct Tenant {
    TenantConfig config;
    std::map<std::string, uint64_t> layers_by_name;
    // Shared with the tenant's layers, which charge their activations to it; outlives a
    // destroyed layer that a request in progress still holds.
    std::shared_ptr<TenantMemory> memory;
    int64_t inflight = 0;
    uint64_t max_layers_refusals = 0;
  };

  Result<LayerRef> find_locked(const std::string& tenant, uint64_t handle) const;  // under mutex_

  mutable std::mutex mutex_;
  std::map<std::string, Tenant> tenants_;
  std::map<uint64_t, std::shared_ptr<ServedLayer>> layers_;
  std::vector<std::unique_ptr<Rank>>& ranks_;
  std::vector<uint64_t> rank_bytes_;
  uint64_t next_handle_;
};

}  // namespace tutel::daemon
