#include "device_regions.hpp"

#include <string>

namespace tutel::daemon {
namespace {

// What the region keeps of its export: everything but the descriptor, which goes to the client.
MemoryExport without_fd(const MemoryExport& e) {
  MemoryExport out;
  out.kind = e.kind;
  out.handle = e.handle;
  out.device_id = e.device_id;
  out.keep_until_exit = e.keep_until_exit;
  return out;
}

}  // namespace

RetiredRegions::~RetiredRegions() {
  for (Entry& e : entries_) {
    const uint64_t bytes = e.buffer.bytes();
    {
      FairLock::Seat seat(e.rank->lock, memory_->tenant());
      std::lock_guard lock(seat);
      e.buffer.reset();
    }
    memory_->release_region(bytes);
  }
}

void RetiredRegions::put(Entry entry) {
  std::lock_guard lock(mutex_);
  entries_.push_back(std::move(entry));
}

std::optional<RetiredRegions::Entry> RetiredRegions::take(const Rank& rank, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  auto best = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    const uint64_t size = it->buffer.bytes();
    if (it->rank != &rank || size < bytes) continue;
    if (best == entries_.end() || size < best->buffer.bytes()) best = it;
  }
  if (best == entries_.end()) return std::nullopt;
  Entry out = std::move(*best);
  entries_.erase(best);
  return out;
}

uint64_t RetiredRegions::bytes() const {
  std::lock_guard lock(mutex_);
  uint64_t n = 0;
  for (const Entry& e : entries_) n += e.buffer.bytes();
  return n;
}

DeviceRegion::DeviceRegion(uint32_t id, Rank& rank, uint64_t bytes, DeviceBuffer buffer, MemoryExport exported,
                           std::shared_ptr<TenantMemory> memory, std::shared_ptr<RetiredRegions> retired)
    : id_(id), rank_(rank), bytes_(bytes), buffer_(std::move(buffer)), exported_(std::move(exported)),
      memory_(std::move(memory)), retired_(std::move(retired)) {}

DeviceRegion::~DeviceRegion() {
  if (exported_.keep_until_exit) {
    // Still charged: the tenant holds it until a later region of its own takes it over.
    retired_->put({&rank_, std::move(buffer_), std::move(exported_)});
    return;
  }
  const uint64_t bytes = buffer_.bytes();
  {
    FairLock::Seat seat(rank_.lock, memory_->tenant());
    std::lock_guard lock(seat);
    if (discard_.load(std::memory_order_relaxed) && buffer_.data() != nullptr)
      rank_.backend->discard_shareable(buffer_.data());
    buffer_.reset();
  }
  memory_->release_region(bytes);
}

uint32_t DeviceRegions::next_free_id() {
  // 2^32 ids and at most kMaxRegions in use: a free one is a few steps away even after wrapping.
  while (next_id_ == 0 || regions_.count(next_id_)) ++next_id_;
  return next_id_++;
}

Result<MappedRegion> DeviceRegions::map(Rank& rank, uint64_t bytes, std::shared_ptr<TenantMemory> memory,
                                        std::shared_ptr<RetiredRegions> retired) {
  if (bytes == 0 || bytes > kMaxRegionBytes)
    return Status::InvalidArgument("a device region of " + std::to_string(bytes) + " bytes is out of range (4 to " +
                                   std::to_string(kMaxRegionBytes) + ")");
  if (bytes % 4 != 0)
    return Status::InvalidArgument("a device region of " + std::to_string(bytes) +
                                   " bytes is not a whole number of f32 values; ask for a multiple of 4 bytes");
  const Status too_many = Status::ResourceExhausted("the session already maps " + std::to_string(kMaxRegions) +
                                                    " device regions; unmap one first, or map fewer, larger ones");
  {
    std::lock_guard lock(mutex_);
    if (closed_) return Status::Unavailable("the session is closing");
    if (regions_.size() >= kMaxRegions) return too_many;
  }
  // The rank's time this takes is the tenant's (FairLock): a client asks for it.
  FairLock::Seat seat(rank.lock, memory->tenant());
  ShareableBuffer shared;
  if (std::optional<RetiredRegions::Entry> reused = retired->take(rank, bytes)) {
    // The tenant's own memory, already charged to it: cleared of its earlier contents.
    shared.buffer = std::move(reused->buffer);
    shared.exported = std::move(reused->exported);
    std::lock_guard lock(seat);
    // Cleared only once the clear has run: a clear that fails on the device (reported by the
    // synchronize) must not hand the tenant's earlier data to this client.
    Status cleared =
        rank.backend->fill_zero(TensorView(shared.buffer.data(), DType::kU8,
                                           {static_cast<int64_t>(shared.buffer.bytes())}, rank.backend->device()));
    if (cleared.ok()) cleared = rank.backend->synchronize();
    if (!cleared.ok()) {
      retired->put({&rank, std::move(shared.buffer), std::move(shared.exported)});
      return cleared.with_context("clearing a retired device region");
    }
  } else {
    // Charged at the requested size first (a refusal allocates nothing), then at what the
    // backend allocated (whole pages, 2 MiB units on a GPU).
    TUTEL_RETURN_IF_ERROR(memory->try_charge_region(bytes));
    Result<ShareableBuffer> made = [&] {
      std::lock_guard lock(seat);
      return rank.backend->allocate_shareable(bytes);
    }();
    if (!made.ok()) {
      memory->release_region(bytes);
      return made.status().with_context("device region on rank " + std::to_string(rank.index));
    }
    shared = std::move(*made);
    if (const Status st = memory->try_charge_region(shared.buffer.bytes() - bytes); !st.ok()) {
      memory->release_region(bytes);
      std::lock_guard lock(seat);
      shared.buffer.reset();  // never exported: free to free
      return st;
    }
  }
  // From here the region owns the memory and its charge.
  std::unique_lock lock(mutex_);
  if (closed_ || regions_.size() >= kMaxRegions) {
    // Another map raced past the checks above, or the session ended meanwhile: a region that
    // never reaches the client frees (or, if a client of the tenant may map it from before,
    // retires) the memory as any region does, outside the lock.
    const Status st = closed_ ? Status::Unavailable("the session is closing") : too_many;
    lock.unlock();
    DeviceRegion unused(0, rank, bytes, std::move(shared.buffer), without_fd(shared.exported), std::move(memory),
                        std::move(retired));
    return st;
  }
  const uint32_t id = next_free_id();
  auto region = std::make_shared<const DeviceRegion>(id, rank, bytes, std::move(shared.buffer), without_fd(shared.exported),
                                                     std::move(memory), std::move(retired));
  regions_.emplace(id, region);
  return MappedRegion{std::move(region), std::move(shared.exported)};
}

Status DeviceRegions::unmap(uint32_t id) {
  std::shared_ptr<const DeviceRegion> gone;  // freed outside the lock
  std::lock_guard lock(mutex_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return Status::NotFound("this session maps no device region " + std::to_string(id));
  gone = std::move(it->second);
  regions_.erase(it);
  gone->discard_when_released();  // the client unmapped its side first (Session::unmap_device_region)
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

void DeviceRegions::close(bool client_gone) {
  std::map<uint32_t, std::shared_ptr<const DeviceRegion>> gone;  // freed outside the lock
  std::lock_guard lock(mutex_);
  closed_ = true;
  gone.swap(regions_);
  if (client_gone)
    for (const auto& [id, region] : gone) region->discard_when_released();
}

size_t DeviceRegions::size() const {
  std::lock_guard lock(mutex_);
  return regions_.size();
}

}  // namespace tutel::daemon
