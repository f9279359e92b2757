#include "device_regions.hpp"

#include <string>

namespace tutel::daemon {

DeviceRegion::~DeviceRegion() {
  {
    std::lock_guard lock(rank_.mutex);
    buffer_.reset();
  }
  memory_->release_region(bytes_);
}

Result<MappedRegion> DeviceRegions::map(Rank& rank, uint64_t bytes, std::shared_ptr<TenantMemory> memory) {
  if (bytes == 0 || bytes > kMaxRegionBytes)
    return Status::InvalidArgument("a device region of " + std::to_string(bytes) + " bytes is out of range (1 to " +
                                   std::to_string(kMaxRegionBytes) + ")");
  if (bytes % 4 != 0)
    return Status::InvalidArgument("a device region of " + std::to_string(bytes) +
                                   " bytes is not a whole number of f32 values; ask for a multiple of 4 bytes");
  uint32_t id = 0;
  {
    std::lock_guard lock(mutex_);
    if (regions_.size() >= kMaxRegions)
      return Status::ResourceExhausted("the session already maps " + std::to_string(kMaxRegions) +
                                       " device regions; unmap one first, or map fewer, larger ones");
    id = next_id_++;
  }
  TUTEL_RETURN_IF_ERROR(memory->try_charge_region(bytes));
  Result<ShareableBuffer> shared = [&] {
    std::lock_guard lock(rank.mutex);
    return rank.backend->allocate_shareable(bytes);
  }();
  if (!shared.ok()) {
    memory->release_region(bytes);
    return shared.status().with_context("device region on rank " + std::to_string(rank.index));
  }
  // From here the region owns the buffer and the charge.
  auto region = std::make_shared<const DeviceRegion>(id, rank, bytes, std::move(shared->buffer), std::move(memory));
  std::lock_guard lock(mutex_);
  if (regions_.size() >= kMaxRegions)  // another map raced this one past the check above
    return Status::ResourceExhausted("the session already maps " + std::to_string(kMaxRegions) +
                                     " device regions; unmap one first, or map fewer, larger ones");
  regions_.emplace(id, region);
  return MappedRegion{std::move(region), std::move(shared->exported)};
}

Status DeviceRegions::unmap(uint32_t id) {
  std::shared_ptr<const DeviceRegion> gone;  // freed outside the lock
  std::lock_guard lock(mutex_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return Status::NotFound("this session maps no device region " + std::to_string(id));
  gone = std::move(it->second);
  regions_.erase(it);
  return Status::OK();
}

Result<std::shared_ptr<const DeviceRegion>> DeviceRegions::find(uint32_t id) const {
  std::lock_guard lock(mutex_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return Status::NotFound("this session maps no device region " + std::to_string(id) +
                            "; map one (kMapRegion) and address requests into it");
  return it->second;
}

void DeviceRegions::clear() {
  std::map<uint32_t, std::shared_ptr<const DeviceRegion>> gone;  // freed outside the lock
  std::lock_guard lock(mutex_);
  gone.swap(regions_);
}

size_t DeviceRegions::size() const {
  std::lock_guard lock(mutex_);
  return regions_.size();
}

}  // namespace tutel::daemon
