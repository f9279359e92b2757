#include "tenant_memory.hpp"

#include <cassert>
#include <utility>

namespace tutel::daemon {

bool TenantMemory::try_reserve(uint64_t bytes) {
  uint64_t total = total_.load(std::memory_order_relaxed);
  do {
    if (bytes > max_bytes_ || total > max_bytes_ - bytes) {
      refusals_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  } while (!total_.compare_exchange_weak(total, total + bytes, std::memory_order_relaxed));
  return true;
}

std::string TenantMemory::breakdown(uint64_t extra_activations, uint64_t extra_regions) const {
  std::string out = "(parameters " + std::to_string(parameter_bytes()) + ", in-flight forwards and workspaces " +
                    std::to_string(activation_bytes() + extra_activations);
  if (const uint64_t regions = region_bytes() + extra_regions; regions > 0)
    out += ", device regions " + std::to_string(regions);
  return out + ")";
}

Status TenantMemory::try_charge_parameters(uint64_t bytes, const std::string& what) {
  if (!try_reserve(bytes))
    return Status::ResourceExhausted(what + " needs " + std::to_string(bytes) +
                                     " bytes for its parameters, gradients and optimizer state; tenant '" + tenant_ +
                                     "' holds " + std::to_string(total_bytes()) + " " + breakdown(0, 0) +
                                     " of its " + std::to_string(max_bytes_) +
                                     " byte max_memory_bytes: use a smaller layer, or raise max_memory_bytes");
  parameters_.fetch_add(bytes, std::memory_order_relaxed);
  return Status::OK();
}

void TenantMemory::release_parameters(uint64_t bytes) {
  parameters_.fetch_sub(bytes, std::memory_order_relaxed);
  total_.fetch_sub(bytes, std::memory_order_relaxed);
}

Status TenantMemory::try_charge_activations(uint64_t bytes) {
  if (!try_reserve(bytes)) {
    return Status::ResourceExhausted("tenant '" + tenant_ + "' would hold " + std::to_string(total_bytes() + bytes) +
                                     " bytes " + breakdown(bytes, 0) + " over its max_memory_bytes " +
                                     std::to_string(max_bytes_) +
                                     ": run the backwards of pending forwards, or raise max_memory_bytes");
  }
  activations_.fetch_add(bytes, std::memory_order_relaxed);
  return Status::OK();
}

void TenantMemory::charge_activations(uint64_t bytes) {
  total_.fetch_add(bytes, std::memory_order_relaxed);
  activations_.fetch_add(bytes, std::memory_order_relaxed);
}

void TenantMemory::release_activations(uint64_t bytes) {
  activations_.fetch_sub(bytes, std::memory_order_relaxed);
  total_.fetch_sub(bytes, std::memory_order_relaxed);
}

Status TenantMemory::try_charge_region(uint64_t bytes) {
  if (!try_reserve(bytes))
    return Status::ResourceExhausted("a device region of " + std::to_string(bytes) + " bytes would take tenant '" +
                                     tenant_ + "' to " + std::to_string(total_bytes() + bytes) + " bytes " +
                                     breakdown(0, bytes) + ", over its max_memory_bytes " +
                                     std::to_string(max_bytes_) +
                                     ": unmap regions it no longer uses, map a smaller one, or raise max_memory_bytes");
  regions_.fetch_add(bytes, std::memory_order_relaxed);
  return Status::OK();
}

void TenantMemory::release_region(uint64_t bytes) {
  regions_.fetch_sub(bytes, std::memory_order_relaxed);
  total_.fetch_sub(bytes, std::memory_order_relaxed);
}

Result<ParameterCharge> ParameterCharge::take(std::shared_ptr<TenantMemory> memory, uint64_t bytes,
                                              const std::string& what) {
  TUTEL_RETURN_IF_ERROR(memory->try_charge_parameters(bytes, what));
  ParameterCharge charge;
  charge.memory_ = std::move(memory);
  charge.bytes_ = bytes;
  return charge;
}

ParameterCharge& ParameterCharge::operator=(ParameterCharge&& other) noexcept {
  if (this != &other) {
    reset();
    memory_ = std::move(other.memory_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void ParameterCharge::reset() {
  if (memory_) memory_->release_parameters(bytes_);
  memory_.reset();
  bytes_ = 0;
}

ActivationBackend::~ActivationBackend() {
  // Every buffer handed out must be gone by now (the layer frees them first).
  assert(live_.empty());
  for (const auto& [data, buf] : live_) tenant_->release_activations(buf.bytes());
}

Result<DeviceBuffer> ActivationBackend::allocate(size_t bytes) {
  // Charged before allocating, so a refused growth never allocates.
  if (enforce_) {
    TUTEL_RETURN_IF_ERROR(tenant_->try_charge_activations(bytes));
  } else {
    tenant_->charge_activations(bytes);
  }
  Result<DeviceBuffer> inner = ForwardingBackend::allocate(bytes);
  if (!inner.ok()) {
    tenant_->release_activations(bytes);
    return inner.status();
  }
  DeviceBuffer& buf = *inner;
  void* data = buf.data();
  // Charged at the size the caller asked for, which release() is told again; the inner buffer
  // keeps the inner backend's own bookkeeping.
  {
    std::lock_guard lock(mutex_);
    live_.emplace(data, std::move(buf));
  }
  bytes_.fetch_add(bytes, std::memory_order_relaxed);
  return DeviceBuffer(this, data, bytes);
}

void ActivationBackend::release(void* data, size_t bytes) {
  DeviceBuffer inner;
  {
    std::lock_guard lock(mutex_);
    auto it = live_.find(data);
    if (it == live_.end()) return;
    inner = std::move(it->second);
    live_.erase(it);
  }
  bytes_.fetch_sub(bytes, std::memory_order_relaxed);
  tenant_->release_activations(bytes);
  // `inner` goes out of scope here: the inner backend frees the memory.
}

}  // namespace tutel::daemon
