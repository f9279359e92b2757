// A client session's device regions (FrameType::kMapRegion): memory on one rank's device that
// the client maps into its own address space, so its tokens reach a layer and the results come
// back without a copy (docs/protocol.md §7). On a GPU the region is device memory the client
// opens through CUDA IPC; on the CPU backend, a sealed memfd both processes map.
//
// A region belongs to its session: it is freed when the client unmaps it or the session ends,
// and a request in progress keeps the region it uses alive until it completes. Its bytes count
// against the tenant's max_memory_bytes.
// Thread-safety: DeviceRegions may be used from any thread (the event loop's pool maps and
// unmaps, the session's worker looks regions up).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "served_layer.hpp"
#include "tenant_memory.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::daemon {

class DeviceRegion {
 public:
  DeviceRegion(uint32_t id, Rank& rank, uint64_t bytes, DeviceBuffer buffer, std::shared_ptr<TenantMemory> memory)
      : id_(id), rank_(rank), bytes_(bytes), buffer_(std::move(buffer)), memory_(std::move(memory)) {}
  DeviceRegion(const DeviceRegion&) = delete;
  DeviceRegion& operator=(const DeviceRegion&) = delete;
  // Frees the memory under the rank's lock (its backend is used by one thread at a time) and
  // gives its bytes back to the tenant.
  ~DeviceRegion();

  uint32_t id() const { return id_; }
  int rank_index() const { return rank_.index; }
  Device device() const { return rank_.backend->device(); }
  // What requests may address: [data(), data() + bytes()).
  uint64_t bytes() const { return bytes_; }
  uint8_t* data() const { return static_cast<uint8_t*>(buffer_.data()); }

 private:
  const uint32_t id_;
  Rank& rank_;
  const uint64_t bytes_;
  DeviceBuffer buffer_;
  std::shared_ptr<TenantMemory> memory_;
};

struct MappedRegion {
  std::shared_ptr<const DeviceRegion> region;
  MemoryExport exported;  // what the client needs to map it
};

class DeviceRegions {
 public:
  // Bounds per session, so one client cannot exhaust the daemon's descriptors or handles.
  static constexpr size_t kMaxRegions = 16;
  static constexpr uint64_t kMaxRegionBytes = uint64_t{1} << 40;

  // Allocates a region of `bytes` on `rank`'s device, charged to `memory`.
  Result<MappedRegion> map(Rank& rank, uint64_t bytes, std::shared_ptr<TenantMemory> memory);
  // Forgets region `id`; its memory goes once no request uses it.
  Status unmap(uint32_t id);
  // The region `id`, or NotFound naming what to do.
  Result<std::shared_ptr<const DeviceRegion>> find(uint32_t id) const;
  // Forgets every region (the session ended).
  void clear();
  size_t size() const;

 private:
  mutable std::mutex mutex_;
  std::map<uint32_t, std::shared_ptr<const DeviceRegion>> regions_;
  uint32_t next_id_ = 1;  // 0 never names a region
};

}  // namespace tutel::daemon
