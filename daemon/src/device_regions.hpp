// A client session's device regions (FrameType::kMapRegion): memory on one rank's device that
// the client maps into its own address space, so its tokens reach a layer and the results come
// back without a copy (docs/protocol.md §7). On a GPU the region is device memory the client
// opens through CUDA IPC; on the CPU backend, a sealed memfd both processes map.
//
// A region belongs to its session: it goes when the client unmaps it or the session ends, and a
// request in progress keeps the region it uses alive until it completes. Its bytes (whole pages,
// or 2 MiB units on a GPU) count against the tenant's max_memory_bytes.
//
// Memory the client may still map after that (CUDA IPC: freeing it before the importer closes
// its mapping is undefined, and an untrusted client need never close it) is never freed while
// the daemon runs: it is retired to its tenant (RetiredRegions), stays charged to it, and is
// handed out again only to that tenant's later regions, so no other tenant's data can reach it.
// Thread-safety: DeviceRegions and RetiredRegions may be used from any thread (the event loop's
// pool maps and unmaps, the session's worker looks regions up).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "served_layer.hpp"
#include "tenant_memory.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::daemon {

class RetiredRegions {
 public:
  struct Entry {
    Rank* rank = nullptr;
    DeviceBuffer buffer;
    MemoryExport exported;  // as the clients were told (no descriptor)
  };

  explicit RetiredRegions(std::shared_ptr<TenantMemory> memory) : memory_(std::move(memory)) {}
  RetiredRegions(const RetiredRegions&) = delete;
  RetiredRegions& operator=(const RetiredRegions&) = delete;
  // The daemon is exiting (its clients' mappings go with their processes or the driver's
  // teardown): frees every entry under its rank's lock. The ranks must still be alive.
  ~RetiredRegions();

  void put(Entry entry);
  // The smallest entry on `rank` that holds `bytes`, if any (already charged to the tenant, so
  // a larger one costs nothing more).
  std::optional<Entry> take(const Rank& rank, uint64_t bytes);
  uint64_t bytes() const;

 private:
  std::shared_ptr<TenantMemory> memory_;
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;
};

class DeviceRegion {
 public:
  DeviceRegion(uint32_t id, Rank& rank, uint64_t bytes, DeviceBuffer buffer, MemoryExport exported,
               std::shared_ptr<TenantMemory> memory, std::shared_ptr<RetiredRegions> retired);
  DeviceRegion(const DeviceRegion&) = delete;
  DeviceRegion& operator=(const DeviceRegion&) = delete;
  // Retires the memory (keep_until_exit), or frees it under the rank's lock (its backend is used
  // by one thread at a time) and gives its bytes back to the tenant.
  ~DeviceRegion();

  uint32_t id() const { return id_; }
  int rank_index() const { return rank_.index; }
  Device device() const { return rank_.backend->device(); }
  // What requests may address: [data(), data() + bytes()); the allocation may be larger.
  uint64_t bytes() const { return bytes_; }
  uint64_t allocated_bytes() const { return buffer_.bytes(); }
  uint8_t* data() const { return static_cast<uint8_t*>(buffer_.data()); }
  // Its client can read nothing more from it (it unmapped the region, or hung up): memory the
  // client could keep at the daemon's charge (a CPU backend's memfd) is freed when the region
  // goes (Backend::discard_shareable), also where the client still holds the descriptor. Not for a session the daemon closes: the
  // client's tensors may still point into a region it has not unmapped.
  void discard_when_released() const { discard_.store(true, std::memory_order_relaxed); }

 private:
  mutable std::atomic<bool> discard_{false};
  const uint32_t id_;
  Rank& rank_;
  const uint64_t bytes_;
  DeviceBuffer buffer_;
  MemoryExport exported_;  // what was sent, without the descriptor
  std::shared_ptr<TenantMemory> memory_;
  std::shared_ptr<RetiredRegions> retired_;
};

struct MappedRegion {
  std::shared_ptr<const DeviceRegion> region;
  MemoryExport exported;  // what the client needs to map it
};

class DeviceRegions {
 public:
  // Bounds per session. Each CPU region costs the daemon a mapping, no descriptor.
  static constexpr size_t kMaxRegions = 16;
  static constexpr uint64_t kMaxRegionBytes = uint64_t{1} << 40;

  // A region of `bytes` on `rank`'s device, charged to `memory`: one of the tenant's retired
  // allocations when one fits, else a new one.
  Result<MappedRegion> map(Rank& rank, uint64_t bytes, std::shared_ptr<TenantMemory> memory,
                           std::shared_ptr<RetiredRegions> retired);
  // Forgets region `id`; its memory goes once no request uses it.
  Status unmap(uint32_t id);
  // The region `id`, or NotFound naming what to do.
  Result<std::shared_ptr<const DeviceRegion>> find(uint32_t id) const;
  // Forgets every region, and refuses maps from now on (the session ended). `client_gone`: it
  // hung up, so its regions' host memory goes with them (DeviceRegion::discard_when_released).
  void close(bool client_gone = false);
  size_t size() const;

 private:
  // An id no region of the session has (never 0); under mutex_.
  uint32_t next_free_id();

  mutable std::mutex mutex_;
  std::map<uint32_t, std::shared_ptr<const DeviceRegion>> regions_;
  uint32_t next_id_ = 1;
  bool closed_ = false;
};

}  // namespace tutel::daemon
