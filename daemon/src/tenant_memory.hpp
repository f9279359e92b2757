// A tenant's memory against its max_memory_bytes, and the backend wrapper that charges a
// layer's activation memory to it.
//
// What a tenant holds is two kinds of memory:
// - parameters: weights, gradients and optimizer state, charged by a layer before it allocates
//   them and given back once they are freed (ParameterCharge);
// - activations: what a layer's forwards keep until their backwards (Pending entries, recycled
//   ones included), its plans (cached, or held by a forward waiting for its backward), its
//   staging buffers and, on a [group] layer, its scratch. They are charged as the buffers are
//   allocated, from their exact sizes, by the layer's ActivationBackend, and given back when the
//   buffers are freed.
// - device regions: memory a client maps to hand tokens over without copies (kMapRegion),
//   charged when mapped and given back when unmapped or when the session ends.
// All count against the same quota. The growth made by a forward (training or inference) and
// the creation of a layer are refused past it: a backward must never fail for lack of memory,
// since it is what gives the memory back, so its growth is charged but let through. Idle plans
// are dropped before a forward is refused, and whenever a request leaves the tenant over.
//
// Thread-safety: TenantMemory is lock-free and may be used from any thread. An ActivationBackend
// is used like the Backend it wraps (one thread at a time, under the layer's mutex); its
// bytes() may be read from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "tutel/core/status.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::daemon {

class ParameterCharge;

class TenantMemory {
 public:
  TenantMemory(std::string tenant, uint64_t max_bytes)
      : tenant_(std::move(tenant)), max_bytes_(max_bytes) {}

  const std::string& tenant() const { return tenant_; }
  uint64_t max_bytes() const { return max_bytes_; }
  // Charges refused for max_memory_bytes so far (a failed allocation of the device or the host
  // is none): what tells a quota's refusal from a shortage of memory.
  uint64_t refusals() const { return refusals_.load(std::memory_order_relaxed); }
  uint64_t parameter_bytes() const { return parameters_.load(std::memory_order_relaxed); }
  uint64_t activation_bytes() const { return activations_.load(std::memory_order_relaxed); }
  uint64_t total_bytes() const { return total_.load(std::memory_order_relaxed); }
  bool over_quota() const { return total_bytes() > max_bytes_; }
  // The part of activation_bytes() that training forwards waiting for their backwards hold (the
  // rest: recycled entries, staging, workspaces). Reported only; the quota is on the total.
  uint64_t pending_bytes() const { return pending_.load(std::memory_order_relaxed); }
  void add_pending(uint64_t bytes) { pending_.fetch_add(bytes, std::memory_order_relaxed); }
  void remove_pending(uint64_t bytes) { pending_.fetch_sub(bytes, std::memory_order_relaxed); }

  // Charges activation memory if the tenant stays within its quota, else ResourceExhausted
  // saying what to do.
  Status try_charge_activations(uint64_t bytes);
  // Charges activation memory whatever the quota says (a backward's).
  void charge_activations(uint64_t bytes);
  void release_activations(uint64_t bytes);
  uint64_t region_bytes() const { return regions_.load(std::memory_order_relaxed); }
  // Charges a device region if the tenant stays within its quota, else ResourceExhausted.
  Status try_charge_region(uint64_t bytes);
  void release_region(uint64_t bytes);

 private:
  // A layer's parameters, through ParameterCharge only: charged if the tenant stays within its
  // quota; `what` names the layer in the error ("layer 'moe'").
  friend class ParameterCharge;
  Status try_charge_parameters(uint64_t bytes, const std::string& what);
  void release_parameters(uint64_t bytes);

  // Adds `bytes` to total_ unless that takes it over max_bytes_; the one place the quota is
  // decided, so concurrent charges from layers on different ranks cannot both slip under it.
  bool try_reserve(uint64_t bytes);

  const std::string tenant_;
  const uint64_t max_bytes_;
  // What the tenant holds, for messages: "(parameters P, in-flight forwards and workspaces A)".
  std::string breakdown(uint64_t extra_activations, uint64_t extra_regions) const;

  // total_ = parameters_ + activations_ + regions_, kept as its own counter so a charge is one CAS.
  std::atomic<uint64_t> total_{0}, parameters_{0}, activations_{0}, regions_{0};
  std::atomic<uint64_t> pending_{0};
  std::atomic<uint64_t> refusals_{0};
};

// A layer's parameters, gradients and optimizer state, charged to its tenant from before they
// are allocated until after they are freed: concurrent creations cannot each pass the quota and
// then allocate together, and a destroyed layer's memory counts until it is really gone (a
// request in flight may keep the layer a while). Move-only.
class ParameterCharge {
 public:
  ParameterCharge() = default;
  // Charges `bytes` if the tenant stays within its quota, else ResourceExhausted naming `what`.
  static Result<ParameterCharge> take(std::shared_ptr<TenantMemory> memory, uint64_t bytes,
                                      const std::string& what);
  ParameterCharge(ParameterCharge&& other) noexcept { *this = std::move(other); }
  ParameterCharge& operator=(ParameterCharge&& other) noexcept;
  ParameterCharge(const ParameterCharge&) = delete;
  ParameterCharge& operator=(const ParameterCharge&) = delete;
  ~ParameterCharge() { reset(); }

  uint64_t bytes() const { return bytes_; }
  void reset();

 private:
  std::shared_ptr<TenantMemory> memory_;
  uint64_t bytes_ = 0;
};

// Wraps the backend a layer runs its forwards and backwards on: every op is passed through, and
// every allocation is charged to the layer (bytes()) and its tenant. While enforcing (a training
// forward), an allocation that would take the tenant over its quota fails with
// ResourceExhausted instead of allocating; the layer op that asked for it fails with that status.
//
// Buffers it hands out are owned by this wrapper (it frees the inner backend's buffer when they
// die), so it must outlive them, and the inner backend must outlive it.
class ActivationBackend final : public ForwardingBackend {
 public:
  ActivationBackend(Backend& inner, std::shared_ptr<TenantMemory> tenant)
      : ForwardingBackend(inner), tenant_(std::move(tenant)) {}
  ~ActivationBackend() override;

  // Bytes this layer's activation buffers hold now.
  uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  TenantMemory& tenant_memory() { return *tenant_; }

  // While an Enforce lives, allocations are refused past the tenant's quota.
  class Enforce {
   public:
    explicit Enforce(ActivationBackend& b) : b_(b) { b_.enforce_ = true; }
    ~Enforce() { b_.enforce_ = false; }
    Enforce(const Enforce&) = delete;
    Enforce& operator=(const Enforce&) = delete;

   private:
    ActivationBackend& b_;
  };

  Result<DeviceBuffer> allocate(size_t bytes) override;
  void release(void* data, size_t bytes) override;

 private:
  std::shared_ptr<TenantMemory> tenant_;
  bool enforce_ = false;
  std::atomic<uint64_t> bytes_{0};
  // The inner backend's buffers behind the ones handed out, by address. Allocations are rare
  // (buffers are grow-only), so a map under a mutex costs nothing per request.
  std::mutex mutex_;
  std::map<void*, DeviceBuffer> live_;
};

}  // namespace tutel::daemon
