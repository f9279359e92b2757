// A rank whose device is lost (a sticky CUDA error; here SimulatedDevice::lose) goes out of
// service: its layers' requests, steps, checkpoints and loads are refused at once with a message
// naming the rank, the device and the cause; a checkpoint file written before keeps its bytes;
// new layers go to the ranks still serving, and with none left creation is refused. Failures
// that are not the device's (a missing forward, a full device) leave the rank serving.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "registry.hpp"
#include "simulated_device.hpp"

namespace tutel::daemon {
namespace {

using testing::SimulatedDevice;

LayerDefinition definition(const std::string& name) {
  LayerDefinition def;
  def.name = name;
  def.spec.experts = 4;
  def.spec.model_dim = 16;
  def.spec.hidden = 24;
  def.spec.k = 2;
  def.init_seed = 7;
  return def;
}

std::string contents(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

class RankHealthTest : public ::testing::Test {
 protected:
  static constexpr int64_t kTokens = 32;

  void SetUp() override {
    for (int r = 0; r < 2; ++r) {
      auto cpu = make_backend("cpu", BackendOptions{.threads = 1});
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      auto device = std::make_unique<SimulatedDevice>(std::move(cpu).value());
      devices_.push_back(device.get());
      ranks_.push_back(std::make_unique<Rank>());
      ranks_.back()->index = r;
      ranks_.back()->options = BackendOptions{.threads = 1};
      ranks_.back()->backend = std::move(device);
    }
    TenantConfig t;
    t.name = "a";
    registry_ = std::make_unique<Registry>(std::vector<TenantConfig>{t}, ranks_);
    std::normal_distribution<float> normal;
    for (float& v : x_) v = normal(rng_);
    for (float& v : dy_) v = normal(rng_);
    dir_ = std::filesystem::temp_directory_path() / ("rank_health_test." + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  LayerRef create(const std::string& name) {
    auto ref = registry_->create("a", definition(name), "");
    EXPECT_TRUE(ref.ok()) << ref.status();
    return ref.ok() ? *ref : LayerRef{};
  }
  Status forward(ServedLayer& layer, uint64_t sequence) {
    return layer.forward(x_.data(), kTokens, y_.data(), /*training=*/true, /*owner=*/1, sequence).status();
  }
  Status backward(ServedLayer& layer, uint64_t sequence) {
    return layer.backward(dy_.data(), kTokens, 0.f, dx_.data(), /*owner=*/1, sequence);
  }
  static void expect_out_of_service(const Status& st, int rank, const std::string& what) {
    EXPECT_EQ(st.code(), StatusCode::kUnavailable) << what << ": " << st;
    const std::string m(st.message());
    EXPECT_NE(m.find("rank " + std::to_string(rank) + " of this tuteld (cuda:0) is out of service since"),
              std::string::npos)
        << what << ": " << m;
    EXPECT_NE(m.find("an illegal memory access (test)"), std::string::npos) << what << ": the cause: " << m;
    EXPECT_NE(m.find("restart tuteld"), std::string::npos) << what << ": what to do: " << m;
  }

  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<SimulatedDevice*> devices_;
  std::unique_ptr<Registry> registry_;
  std::mt19937 rng_{std::random_device{}()};
  std::vector<float> x_ = std::vector<float>(kTokens * 16), y_ = std::vector<float>(kTokens * 16);
  std::vector<float> dy_ = std::vector<float>(kTokens * 16), dx_ = std::vector<float>(kTokens * 16);
  std::filesystem::path dir_;
};

TEST_F(RankHealthTest, ALostDeviceTakesItsRankOutOfServiceAndOnlyItsLayers) {
  const LayerRef a = create("a");  // both ranks empty: the first
  const LayerRef b = create("b");  // rank 0 holds a: the second
  ASSERT_TRUE(a.layer && b.layer);
  ASSERT_EQ(a.layer->rank_index(), 0);
  ASSERT_EQ(b.layer->rank_index(), 1);
  const std::string checkpoint = (dir_ / "a.safetensors").string();
  ASSERT_TRUE(a.layer->save(checkpoint).ok());
  const std::string saved = contents(checkpoint);
  ASSERT_FALSE(saved.empty());

  // Failures that are not the device's leave it serving.
  EXPECT_EQ(backward(*a.layer, 99).code(), StatusCode::kNotFound);
  devices_[0]->limit_memory(devices_[0]->live_bytes());  // full: the next allocation fails
  EXPECT_EQ(forward(*a.layer, 1).code(), StatusCode::kResourceExhausted);
  devices_[0]->limit_memory(~size_t{0});
  EXPECT_TRUE(ranks_[0]->health.in_service());
  ASSERT_TRUE(forward(*a.layer, 1).ok());

  // The device is lost between a forward and its backward: the backward fails with the op's own
  // error, saying the device is now out of service.
  devices_[0]->lose("an illegal memory access (test)");
  const Status failed = backward(*a.layer, 1);
  EXPECT_EQ(failed.code(), StatusCode::kInternal) << failed;
  EXPECT_NE(failed.message().find("rank 0's device is lost and out of service now"), std::string_view::npos) << failed;
  EXPECT_FALSE(ranks_[0]->health.in_service());
  ASSERT_TRUE(ranks_[0]->health.loss().has_value());
  EXPECT_EQ(ranks_[0]->health.loss()->rank, 0);
  EXPECT_EQ(ranks_[0]->health.loss()->device, "cuda:0");
  EXPECT_NE(ranks_[0]->health.loss()->error.find("an illegal memory access (test)"), std::string::npos);

  // From now on everything on the rank is refused before it runs, with what to do.
  expect_out_of_service(forward(*a.layer, 2), 0, "forward");
  expect_out_of_service(backward(*a.layer, 2), 0, "backward");
  expect_out_of_service(a.layer->step().status(), 0, "step");
  expect_out_of_service(a.layer->zero_grad(), 0, "zero_grad");
  expect_out_of_service(a.layer->grad_norm().status(), 0, "grad_norm");
  expect_out_of_service(a.layer->scale_grads(0.5), 0, "scale_grads");
  expect_out_of_service(a.layer->save(checkpoint), 0, "save");
  expect_out_of_service(a.layer->load(checkpoint), 0, "load");
  EXPECT_EQ(contents(checkpoint), saved) << "the last checkpoint from the live device must stay as it was";

  // The other rank serves on, and takes every new layer, also where rank 0 would be emptier.
  ASSERT_TRUE(forward(*b.layer, 1).ok());
  ASSERT_TRUE(backward(*b.layer, 1).ok());
  ASSERT_TRUE(b.layer->step().ok());
  ASSERT_TRUE(registry_->destroy("a", a.handle).ok());
  const LayerRef c = create("c");
  ASSERT_TRUE(c.layer);
  EXPECT_EQ(c.layer->rank_index(), 1);
  ASSERT_TRUE(forward(*c.layer, 1).ok());

  // The first loss is the one kept, not the errors after it.
  const std::string first = ranks_[0]->health.loss()->error;
  (void)ranks_[0]->health.observe(0, *ranks_[0]->backend, Status::Internal("later"));
  EXPECT_EQ(ranks_[0]->health.loss()->error, first);

  // With every rank out of service, creation is refused, naming why.
  devices_[1]->lose("an illegal memory access (test)");
  EXPECT_FALSE(forward(*c.layer, 2).ok());
  EXPECT_FALSE(ranks_[1]->health.in_service());
  auto d = registry_->create("a", definition("d"), "");
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kUnavailable) << d.status();
  EXPECT_NE(d.status().message().find("every one is out of service"), std::string_view::npos) << d.status();
  for (SimulatedDevice* device : devices_) EXPECT_TRUE(device->violations().empty());
}

// A layer created on a rank that is lost while it is built: the creation fails, and the rank
// is out of service for the next one.
TEST_F(RankHealthTest, ALossWhileCreatingALayerTakesTheRankOut) {
  devices_[0]->lose("an illegal memory access (test)");
  auto lost = registry_->create("a", definition("a"), "");
  ASSERT_FALSE(lost.ok());
  EXPECT_NE(lost.status().message().find("out of service now"), std::string_view::npos) << lost.status();
  EXPECT_FALSE(ranks_[0]->health.in_service());
  const LayerRef next = create("a");
  ASSERT_TRUE(next.layer);
  EXPECT_EQ(next.layer->rank_index(), 1);
}

}  // namespace
}  // namespace tutel::daemon
