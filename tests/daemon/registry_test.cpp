// Registry: the tenant's quotas and the layer table under concurrent control requests. Control
// frames of one tenant's sessions run on different threads of the daemon's pool, so two requests
// about one layer (or two creations against one quota) may run at the same moment. Also the
// bound a layer's save reserves against the tenant's checkpoint quota.
#include "registry.hpp"

#include <gtest/gtest.h>

#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace tutel::daemon {
namespace {

struct OneRankRegistry {
  std::vector<std::unique_ptr<Rank>> ranks;
  std::unique_ptr<Registry> registry;
  explicit OneRankRegistry(int64_t max_layers, uint64_t max_memory_bytes = TenantConfig{}.max_memory_bytes,
                           std::unique_ptr<Backend> backend = nullptr) {
    auto rank = std::make_unique<Rank>();
    if (backend == nullptr) {
      auto cpu = make_backend("cpu", BackendOptions{.threads = 1});
      EXPECT_TRUE(cpu.ok()) << cpu.status();
      backend = std::move(cpu).value();
    }
    rank->backend = std::move(backend);
    ranks.push_back(std::move(rank));
    TenantConfig t;
    t.name = "a";
    t.max_layers = max_layers;
    t.max_memory_bytes = max_memory_bytes;
    registry = std::make_unique<Registry>(std::vector<TenantConfig>{t}, ranks);
  }
};

// The CPU backend, counting every byte allocated through it.
class AllocationCounter final : public ForwardingBackend {
 public:
  explicit AllocationCounter(std::unique_ptr<Backend> cpu) : ForwardingBackend(*cpu), cpu_(std::move(cpu)) {}
  Result<DeviceBuffer> allocate(size_t bytes) override {
    allocated_.fetch_add(bytes);
    return ForwardingBackend::allocate(bytes);
  }
  uint64_t allocated() const { return allocated_.load(); }

 private:
  std::unique_ptr<Backend> cpu_;  // outlives nothing it forwards to: ForwardingBackend holds a reference
  std::atomic<uint64_t> allocated_{0};
};

LayerDefinition definition(const std::string& name, int64_t hidden, int64_t model_dim = 32) {
  const std::string spec = "name = \"" + name + "\"\nexperts = 4\nmodel_dim = " + std::to_string(model_dim) +
                           "\nhidden = " + std::to_string(hidden) + "\nk = 2\ninit_seed = 1\n";
  auto def = parse_layer_spec(spec, "test");
  EXPECT_TRUE(def.ok()) << def.status();
  return def.ok() ? *def : LayerDefinition{};
}

// Runs fn(i) on `n` threads released together.
template <typename Fn>
void at_once(int n, Fn fn) {
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < n) std::this_thread::yield();
      fn(i);
    });
  for (auto& t : threads) t.join();
}

// How many of `created` succeeded; each refusal must be ResourceExhausted saying `why`.
int count_created(const std::vector<Result<LayerRef>>& created, std::string_view why) {
  int ok = 0;
  for (const auto& c : created) {
    if (c.ok()) {
      ++ok;
      continue;
    }
    EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted) << c.status();
    EXPECT_NE(c.status().message().find(why), std::string_view::npos) << c.status();
  }
  return ok;
}

// The checkpoint quota reserves ServedLayer::save_bytes_bound() before a save: the file written
// must never be larger. Its worst case here: AdamW's two states per parameter (allocated with
// the layer), and a spec text of ~40 KB whose comment is all characters JSON escapes (quotes,
// backslashes, tabs), kept whole in the file's metadata: large beside the bound's fixed
// headroom, so a bound that did not allow for the escapes would fail here.
TEST(Registry, ASavedLayerFitsTheBoundItsQuotaReserves) {
  OneRankRegistry r(4);
  std::string spec = "name = \"bounded\"\nexperts = 4\nmodel_dim = 32\nhidden = 48\nk = 2\ninit_seed = 1\n"
                     "[optimizer]\nkind = \"adamw\"\nlr = 0.001\n# ";
  for (int i = 0; i < 40000; ++i) spec += i % 3 == 0 ? "\"" : i % 3 == 1 ? "\\" : "\t";
  spec += "\n";
  auto def = parse_layer_spec(spec, "test");
  ASSERT_TRUE(def.ok()) << def.status();
  auto ref = r.registry->create("a", *def, spec);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const std::string path = ::testing::TempDir() + "bounded_" + std::to_string(::getpid()) + ".safetensors";
  ASSERT_TRUE(ref->layer->save(path).ok());
  std::error_code ec;
  const uint64_t written = std::filesystem::file_size(path, ec);
  ASSERT_FALSE(ec) << ec.message();
  {
    auto file = SafetensorsFile::open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    const auto kept = file->metadata().find("tuteld.spec");
    ASSERT_NE(kept, file->metadata().end());
    EXPECT_EQ(kept->second, spec) << "the spec is kept whole, escapes and all";
  }
  std::filesystem::remove(path, ec);
  EXPECT_LE(written, ref->layer->save_bytes_bound());
  EXPECT_GT(written, 80000u + 3 * 4 * uint64_t(4 * 32 * 48 * 2))
      << "the file holds the escaped spec, the experts and both states";
}

TEST(Registry, ConcurrentDestroysOfOneLayerReleaseItsParametersOnce) {
  OneRankRegistry r(/*max_layers=*/64);
  const LayerDefinition def = definition("moe", 64);
  for (int round = 0; round < 100; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto created = r.registry->create("a", def, "");
    ASSERT_TRUE(created.ok()) << created.status();
    ASSERT_GT(r.registry->memory_bytes("a"), 0u);
    std::atomic<int> destroyed{0}, not_found{0};
    at_once(4, [&](int) {
      const Status st = r.registry->destroy("a", created->handle);
      if (st.ok()) destroyed.fetch_add(1);
      else if (st.code() == StatusCode::kNotFound) not_found.fetch_add(1);
    });
    EXPECT_EQ(destroyed.load(), 1);
    EXPECT_EQ(not_found.load(), 3);
    // A request in progress (here, the test's reference) keeps the layer, and its memory counts
    // until it is really gone.
    ASSERT_EQ(r.registry->memory_bytes("a"), created->layer->memory_bytes());
    created->layer.reset();
    ASSERT_EQ(r.registry->memory_bytes("a"), 0u) << "the parameters were released more or less than once";
    ASSERT_EQ(r.registry->layer_count("a"), 0);
  }
}

TEST(Registry, ConcurrentCreationsStayWithinMaxLayers) {
  OneRankRegistry r(/*max_layers=*/1);
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<Result<LayerRef>> created(3, Status::Internal("not run"));
    // Layers large enough that their construction (outside the registry's lock) overlaps.
    at_once(3, [&](int i) { created[i] = r.registry->create("a", definition("l" + std::to_string(i), 256), ""); });
    EXPECT_EQ(count_created(created, "quota of 1 layers"), 1);
    EXPECT_EQ(r.registry->layer_count("a"), 1);
    for (const auto& c : created) {
      if (c.ok()) {
        ASSERT_TRUE(r.registry->destroy("a", c->handle).ok());
      }
    }
    created.clear();
    ASSERT_EQ(r.registry->memory_bytes("a"), 0u);
  }
}

TEST(Registry, ConcurrentCreationsNeverAllocatePastMaxMemoryBytes) {
  // Each layer's parameters (values and gradients, f32) take most of the quota: one fits, and
  // the others must be refused before they allocate, not after (they were once each checked
  // against the quota before any was charged, so all allocated together).
  const LayerDefinition probe = definition("probe", 1024, 256);
  uint64_t layer_bytes = 0;
  {
    OneRankRegistry sizing(/*max_layers=*/1);
    auto one = sizing.registry->create("a", probe, "");
    ASSERT_TRUE(one.ok()) << one.status();
    layer_bytes = one->layer->memory_bytes();
  }
  const uint64_t quota = layer_bytes * 3 / 2;
  auto cpu = make_backend("cpu", BackendOptions{.threads = 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto counter = std::make_unique<AllocationCounter>(std::move(cpu).value());
  AllocationCounter& allocations = *counter;
  OneRankRegistry r(/*max_layers=*/8, quota, std::move(counter));
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const uint64_t before = allocations.allocated();
    std::vector<Result<LayerRef>> created(3, Status::Internal("not run"));
    at_once(3, [&](int i) { created[i] = r.registry->create("a", definition("l" + std::to_string(i), 1024, 256), ""); });
    EXPECT_EQ(count_created(created, "max_memory_bytes"), 1);
    EXPECT_EQ(r.registry->memory_bytes("a"), layer_bytes);
    EXPECT_LE(allocations.allocated() - before, quota) << "refused creations allocated before they were refused";
    for (const auto& c : created) {
      if (c.ok()) {
        ASSERT_TRUE(r.registry->destroy("a", c->handle).ok());
      }
    }
    created.clear();
    ASSERT_EQ(r.registry->memory_bytes("a"), 0u);
    ASSERT_EQ(r.registry->tenant_memory("a")->total_bytes(), 0u);
  }
}

// A backend whose allocations fail while `failing` is set, as a device another process filled.
class FailingAllocations final : public ForwardingBackend {
 public:
  explicit FailingAllocations(std::unique_ptr<Backend> cpu) : ForwardingBackend(*cpu), cpu_(std::move(cpu)) {}
  Result<DeviceBuffer> allocate(size_t bytes) override {
    if (failing.load()) return Status::ResourceExhausted("cannot allocate " + std::to_string(bytes) + " bytes");
    return ForwardingBackend::allocate(bytes);
  }
  std::atomic<bool> failing{false};

 private:
  std::unique_ptr<Backend> cpu_;
};

// The start leaves a client's layer out (its file moved aside) only when the tenant's quota
// refused it: a ResourceExhausted from memory the node lacks at the moment is no quota's, and
// quota_refusals tells the two apart.
TEST(Registry, QuotaRefusalsCountTheQuotasNotAFailedAllocation) {
  const LayerDefinition probe = definition("probe", 64);
  uint64_t layer_bytes = 0;
  {
    OneRankRegistry sizing(/*max_layers=*/1);
    auto one = sizing.registry->create("a", probe, "");
    ASSERT_TRUE(one.ok()) << one.status();
    layer_bytes = one->layer->memory_bytes();
  }
  auto cpu = make_backend("cpu", BackendOptions{.threads = 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto failing = std::make_unique<FailingAllocations>(std::move(cpu).value());
  FailingAllocations& backend = *failing;
  OneRankRegistry r(/*max_layers=*/2, layer_bytes * 3 / 2, std::move(failing));
  EXPECT_EQ(r.registry->quota_refusals("a"), 0u);
  backend.failing = true;
  auto short_of_memory = r.registry->create("a", definition("l0", 64), "");
  ASSERT_EQ(short_of_memory.status().code(), StatusCode::kResourceExhausted) << short_of_memory.status();
  EXPECT_EQ(r.registry->quota_refusals("a"), 0u) << short_of_memory.status();
  backend.failing = false;
  ASSERT_TRUE(r.registry->create("a", definition("l0", 64), "").ok());
  auto over_memory = r.registry->create("a", definition("l1", 64), "");
  ASSERT_EQ(over_memory.status().code(), StatusCode::kResourceExhausted) << over_memory.status();
  EXPECT_EQ(r.registry->quota_refusals("a"), 1u) << over_memory.status();
  ASSERT_TRUE(r.registry->create("a", definition("small", 1), "").ok());
  auto over_layers = r.registry->create("a", definition("l2", 1), "");
  ASSERT_EQ(over_layers.status().code(), StatusCode::kResourceExhausted) << over_layers.status();
  EXPECT_EQ(r.registry->quota_refusals("a"), 2u) << over_layers.status();
  EXPECT_EQ(r.registry->quota_refusals("nobody"), 0u);
}

}  // namespace
}  // namespace tutel::daemon
