// DeviceRegions: what a session's regions cost, how many it may map, and what happens to memory
// a client may still map after the region is gone (MemoryExport::keep_until_exit, as CUDA IPC's):
// it is never freed while the daemon runs, stays charged to its tenant, and only that tenant's
// later regions get it again, cleared. Exercised on the CPU backend through a wrapper that
// marks its exports as CUDA's are marked.
#include "device_regions.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "simulated_device.hpp"

namespace tutel::daemon {
namespace {

using testing::CountingCpu;

struct OneRank {
  Rank rank;
  CountingCpu* backend = nullptr;
  explicit OneRank(bool keep_until_exit) {
    auto cpu = make_backend("cpu", BackendOptions{.threads = 1});
    EXPECT_TRUE(cpu.ok()) << cpu.status();
    auto counting = std::make_unique<CountingCpu>(std::move(cpu).value());
    counting->keep_exports_until_exit(keep_until_exit);
    backend = counting.get();
    rank.backend = std::move(counting);
  }
};

TEST(DeviceRegions, ChargesWhatIsAllocatedAndGivesItBackUnlessTheClientMayStillMapIt) {
  for (const bool keep : {false, true}) {
    SCOPED_TRACE(keep ? "keep_until_exit" : "freed at once");
    OneRank r(keep);
    auto memory = std::make_shared<TenantMemory>("a", uint64_t{1} << 30);
    auto retired = std::make_shared<RetiredRegions>(memory);
    DeviceRegions regions;
    auto m = regions.map(r.rank, 100, memory, retired);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->region->bytes(), 100u);
    EXPECT_EQ(m->region->allocated_bytes() % page_bytes(), 0u);
    EXPECT_EQ(memory->region_bytes(), m->region->allocated_bytes());  // whole pages, not 100
    EXPECT_EQ(m->exported.keep_until_exit, keep);
    const uint64_t allocated = m->region->allocated_bytes();
    const uint32_t id = m->region->id();
    std::memset(m->region->data(), 0x5a, 100);
    m->region.reset();
    ASSERT_TRUE(regions.unmap(id).ok());
    if (!keep) {
      EXPECT_EQ(memory->region_bytes(), 0u);
      EXPECT_EQ(retired->bytes(), 0u);
      EXPECT_EQ(r.backend->releases(), 1);
      continue;
    }
    // Retired: not freed, still the tenant's.
    EXPECT_EQ(r.backend->releases(), 0);
    EXPECT_EQ(retired->bytes(), allocated);
    EXPECT_EQ(memory->region_bytes(), allocated);
    // The tenant's next region of a fitting size gets it back, cleared, without a new charge.
    auto again = regions.map(r.rank, 64, memory, retired);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(r.backend->shareable_allocations(), 1);
    EXPECT_EQ(again->region->allocated_bytes(), allocated);
    EXPECT_EQ(memory->region_bytes(), allocated);
    EXPECT_EQ(retired->bytes(), 0u);
    for (uint64_t i = 0; i < allocated; ++i) ASSERT_EQ(again->region->data()[i], 0) << i;
    // With nothing retired left, the next region gets memory of its own.
    auto small = regions.map(r.rank, 4, memory, retired);
    ASSERT_TRUE(small.ok());
    EXPECT_EQ(r.backend->shareable_allocations(), 2);
    again->region.reset();
    small->region.reset();
    regions.close();  // the session ends: both retire
    EXPECT_EQ(retired->bytes(), 2 * allocated);
    EXPECT_EQ(r.backend->releases(), 0);
    // Only the daemon's exit frees them, giving the charge back.
    retired.reset();
    EXPECT_EQ(r.backend->releases(), 2);
    EXPECT_EQ(memory->region_bytes(), 0u);
  }
}

TEST(DeviceRegions, RetiredMemoryCountsAgainstTheQuotaAndAClosedSessionMapsNothing) {
  OneRank r(true);
  const uint64_t page = page_bytes();
  auto memory = std::make_shared<TenantMemory>("a", 3 * page);
  auto retired = std::make_shared<RetiredRegions>(memory);
  DeviceRegions regions;
  std::vector<uint32_t> ids;
  for (int i = 0; i < 3; ++i) {
    auto m = regions.map(r.rank, page, memory, retired);
    ASSERT_TRUE(m.ok()) << m.status();
    ids.push_back(m->region->id());
  }
  EXPECT_EQ(regions.map(r.rank, 4, memory, retired).status().code(), StatusCode::kResourceExhausted);
  for (uint32_t id : ids) ASSERT_TRUE(regions.unmap(id).ok());
  // Unmapped but retired: the quota is still taken, except by regions that reuse it.
  EXPECT_EQ(memory->region_bytes(), 3 * page);
  EXPECT_EQ(regions.map(r.rank, 2 * page + 4, memory, retired).status().code(), StatusCode::kResourceExhausted);
  auto reused = regions.map(r.rank, page, memory, retired);
  ASSERT_TRUE(reused.ok()) << reused.status();
  EXPECT_EQ(r.backend->shareable_allocations(), 3);
  regions.close();
  auto refused = regions.map(r.rank, 4, memory, retired);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();
}

// A retired region whose clear fails on the device (the failure reported by the synchronize after
// it, as a GPU reports an asynchronous error) is not handed out: it may still hold the tenant's
// earlier data. It stays retired and charged, and the next map clears it and hands it out.
TEST(DeviceRegions, ARetiredRegionWhoseClearFailedIsNotHandedOut) {
  OneRank r(true);
  auto memory = std::make_shared<TenantMemory>("a", uint64_t{1} << 30);
  auto retired = std::make_shared<RetiredRegions>(memory);
  DeviceRegions regions;
  auto m = regions.map(r.rank, 100, memory, retired);
  ASSERT_TRUE(m.ok()) << m.status();
  const uint64_t allocated = m->region->allocated_bytes();
  uint8_t* const memory_of_region = m->region->data();  // host memory here, retired (not freed) below
  std::memset(memory_of_region, 0x5a, 100);
  const uint32_t id = m->region->id();
  m->region.reset();
  ASSERT_TRUE(regions.unmap(id).ok());
  ASSERT_EQ(retired->bytes(), allocated);
  r.backend->fail_next_synchronize(Status::Internal("an illegal address was encountered"));
  auto refused = regions.map(r.rank, 64, memory, retired);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("clearing a retired device region"), std::string_view::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("illegal address"), std::string_view::npos) << refused.status();
  EXPECT_EQ(retired->bytes(), allocated);
  EXPECT_EQ(memory->region_bytes(), allocated);
  // (The failed attempt's clear did write its zeros here: dirty again, so the check below sees
  // the next map's own clear.)
  std::memset(memory_of_region, 0x5a, allocated);
  auto again = regions.map(r.rank, 64, memory, retired);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(r.backend->shareable_allocations(), 1);
  for (uint64_t i = 0; i < allocated; ++i) ASSERT_EQ(again->region->data()[i], 0) << i;
}

TEST(DeviceRegions, IdsStayUniqueAndNonZeroAcrossManyMaps) {
  OneRank r(false);
  auto memory = std::make_shared<TenantMemory>("a", uint64_t{1} << 30);
  auto retired = std::make_shared<RetiredRegions>(memory);
  DeviceRegions regions;
  auto kept = regions.map(r.rank, 4, memory, retired);
  ASSERT_TRUE(kept.ok());
  for (int i = 0; i < 200; ++i) {
    auto m = regions.map(r.rank, 4, memory, retired);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_NE(m->region->id(), 0u);
    EXPECT_NE(m->region->id(), kept->region->id());
    const uint32_t id = m->region->id();
    m->region.reset();
    ASSERT_TRUE(regions.unmap(id).ok());
  }
  EXPECT_EQ(regions.size(), 1u);
}

}  // namespace
}  // namespace tutel::daemon
