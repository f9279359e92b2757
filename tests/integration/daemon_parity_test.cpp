// A layer in the daemon gives bit-for-bit the results of the same layer run in-process
// (kernels' layer_forward/layer_backward on a CPU backend with the daemon's thread count):
// forward, backward, several micro-batches in flight, the optimizer step, save and reload,
// and a daemon restart from state_dir.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "../kernels/layer_test_util.hpp"
#include "daemon_fixture.hpp"
#include "raw_session.hpp"
#include "tutel/core/safetensors.hpp"

namespace tutel::testing {
namespace {

const LayerSpec kSpec = [] {
  LayerSpec s;
  s.experts = 4;
  s.model_dim = 32;
  s.hidden = 48;
  s.k = 2;
  s.capacity_factor = 1.0;
  return s;
}();

constexpr const char* kSpecToml = R"(
name = "parity"
experts = 4
model_dim = 32
hidden = 48
k = 2
capacity_factor = 1.0
weights = "start.safetensors"
[optimizer]
kind = "adamw"
lr = 0.01
weight_decay = 0.01
)";

class DaemonParity : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    rng_.seed(seed);
    params_ = random_params(rng_, kSpec);
    daemon_ = std::make_unique<DaemonProcess>(DaemonOptions{});
    // Client paths name files in the tenant's checkpoint directory.
    checkpoints_ = daemon_->dir() + "/state/default/checkpoints";
    std::filesystem::create_directories(checkpoints_);
    const auto wg = to_f32(params_.wg), w1 = to_f32(params_.fc1_w), b1 = to_f32(params_.fc1_b),
               w2 = to_f32(params_.fc2_w), b2 = to_f32(params_.fc2_b);
    const int64_t E = 4, M = 32, H = 48;
    ASSERT_TRUE(write_safetensors(checkpoints_ + "/start.safetensors",
                                  {{kGateWeightName, DType::kF32, {E, M}, wg.data()},
                                   {kFc1WeightName, DType::kF32, {E, H, M}, w1.data()},
                                   {kFc1BiasName, DType::kF32, {E, H}, b1.data()},
                                   {kFc2WeightName, DType::kF32, {E, H, M}, w2.data()},
                                   {kFc2BiasName, DType::kF32, {E, M}, b2.data()}})
                    .ok());
    ASSERT_TRUE(daemon_->start());
  }
  void TearDown() override { EXPECT_EQ(daemon_->stop(), 0) << daemon_->log(); }

  // Writes `data` into the arena at data offset `slot` bytes.
  float* arena_floats(RawSession& s, uint64_t byte_offset) {
    return reinterpret_cast<float*>(s.arena().base() + s.arena().layout().data_offset + byte_offset);
  }

  std::mt19937_64 rng_;
  ref::Params params_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::string checkpoints_;
};

TEST_F(DaemonParity, ForwardBackwardStepSaveMatchInProcessBitForBit) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpecToml);
  ASSERT_TRUE(handle.ok()) << handle.status();

  // In-process twin: same weights, the daemon's thread count (1, from the fixture's config).
  auto backend = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  DeviceLayer local(b, kSpec), grads(b, kSpec);
  local.upload(params_);

  const int64_t M = 32, O = 32;
  const int64_t batches[] = {40, 17, 64};  // three micro-batches in flight at once
  std::vector<std::vector<float>> xs, dys;
  for (int64_t S : batches) {
    xs.push_back(to_f32(randn(rng_, S * M, 1.0)));
    dys.push_back(to_f32(randn(rng_, S * O, 1.0)));
  }
  // Forwards for all three, then their backwards in reverse order.
  uint64_t offset = 0;
  std::vector<uint64_t> x_off, y_off;
  for (size_t i = 0; i < 3; ++i) {
    const int64_t S = batches[i];
    x_off.push_back(offset);
    offset += S * M * 4;
    y_off.push_back(offset);
    offset += S * O * 4;
    std::memcpy(arena_floats(s, x_off[i]), xs[i].data(), S * M * 4);
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kForward);
    d.flags = ipc::kFlagTraining;
    d.layer_handle = *handle;
    d.sequence = 100 + i;
    d.tokens = S;
    d.input_offset = s.arena().layout().data_offset + x_off[i];
    d.input_bytes = S * M * 4;
    d.output_offset = s.arena().layout().data_offset + y_off[i];
    d.output_bytes = S * O * 4;
    auto c = s.submit(d);
    ASSERT_TRUE(c && c->status_code == 0) << (c ? c->message : "no completion");

    DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O});
    x.upload(xs[i]);
    LayerWorkspace ws;
    RoutingStats stats;
    ASSERT_TRUE(layer_forward(b, kSpec, local.weights(), x.view(), 0, true, ws, y.view(), &stats).ok());
    const std::vector<float> want = y.download();
    EXPECT_EQ(0, std::memcmp(want.data(), arena_floats(s, y_off[i]), S * O * 4)) << "y of batch " << i;
    EXPECT_EQ(c->l_aux, stats.l_aux);
    EXPECT_EQ(c->capacity, stats.capacity);
    EXPECT_EQ(c->dropped, stats.dropped);
  }
  for (int i = 2; i >= 0; --i) {
    const int64_t S = batches[i];
    std::memcpy(arena_floats(s, y_off[i]), dys[i].data(), S * O * 4);  // dy where y was
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kBackward);
    d.layer_handle = *handle;
    d.sequence = 100 + i;
    d.tokens = S;
    d.dl_aux = 0.25f;
    d.input_offset = s.arena().layout().data_offset + y_off[i];
    d.input_bytes = S * O * 4;
    d.output_offset = s.arena().layout().data_offset + x_off[i];  // dx where x was
    d.output_bytes = S * M * 4;
    auto c = s.submit(d);
    ASSERT_TRUE(c && c->status_code == 0) << (c ? c->message : "no completion");

    DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O}), dy(b, DType::kF32, {S, O}),
        dx(b, DType::kF32, {S, M});
    x.upload(xs[i]);
    dy.upload(dys[i]);
    LayerWorkspace ws;
    ASSERT_TRUE(layer_forward(b, kSpec, local.weights(), x.view(), 0, true, ws, y.view(), nullptr).ok());
    ASSERT_TRUE(layer_backward(b, kSpec, local.weights(), x.view(), ws, dy.view(), 0.25f, dx.view(), grads.weights()).ok());
    const std::vector<float> want = dx.download();
    EXPECT_EQ(0, std::memcmp(want.data(), arena_floats(s, x_off[i]), S * M * 4)) << "dx of batch " << i;
  }

  // One AdamW step on both sides, then the daemon saves; the file must equal the local weights.
  auto step = s.call(ipc::FrameType::kStep, {{"handle", *handle}}, ipc::FrameType::kOk);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ((*step)["step"], 1);
  DeviceLayer m1(b, kSpec), m2(b, kSpec);
  auto adam = [&](DeviceTensor& p, DeviceTensor& g, DeviceTensor& a, DeviceTensor& v) {
    AdamWArgs args{p.view(), g.view(), a.view(), v.view()};
    args.lr = 0.01f;
    args.weight_decay = 0.01f;
    args.step = 1;
    ASSERT_TRUE(b.adamw_step(args).ok());
  };
  adam(local.wg, grads.wg, m1.wg, m2.wg);
  adam(local.fc1_w, grads.fc1_w, m1.fc1_w, m2.fc1_w);
  adam(local.fc1_b, grads.fc1_b, m1.fc1_b, m2.fc1_b);
  adam(local.fc2_w, grads.fc2_w, m1.fc2_w, m2.fc2_w);
  adam(local.fc2_b, grads.fc2_b, m1.fc2_b, m2.fc2_b);
  ASSERT_TRUE(s.call(ipc::FrameType::kSave, {{"handle", *handle}, {"path", "after.safetensors"}}, ipc::FrameType::kOk).ok());
  auto saved = SafetensorsFile::open(checkpoints_ + "/after.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  auto expect_tensor = [&](const char* name, const DeviceTensor& t) {
    const SafetensorsTensor* f = saved->find(name);
    ASSERT_NE(f, nullptr) << name;
    const std::vector<float> want = t.download();
    ASSERT_EQ(f->nbytes, want.size() * 4) << name;
    EXPECT_EQ(0, std::memcmp(f->data, want.data(), f->nbytes)) << name;
  };
  expect_tensor(kGateWeightName, local.wg);
  expect_tensor(kFc1WeightName, local.fc1_w);
  expect_tensor(kFc2BiasName, local.fc2_b);
  expect_tensor("optimizer.state0.experts.batched_fc1_w", m1.fc1_w);
  expect_tensor("optimizer.state1.experts.batched_fc2_w", m2.fc2_w);
  EXPECT_EQ(saved->metadata().at("tuteld.step"), "1");

  // Restart: the layer comes back from state_dir with its step and weights.
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  RawSession again(daemon_->client_socket());
  ASSERT_TRUE(again.hello().ok());
  auto info = again.call(ipc::FrameType::kAttachLayer, {{"name", "parity"}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(info.ok()) << info.status() << daemon_->log();
  EXPECT_EQ((*info)["step"], 1);
  ASSERT_TRUE(again.call(ipc::FrameType::kSave, {{"handle", (*info)["handle"]}, {"path", "restarted.safetensors"}},
                         ipc::FrameType::kOk).ok());
  saved = SafetensorsFile::open(checkpoints_ + "/restarted.safetensors");
  ASSERT_TRUE(saved.ok());
  expect_tensor(kFc1WeightName, local.fc1_w);
  expect_tensor("optimizer.state1.experts.batched_fc2_w", m2.fc2_w);
}

TEST_F(DaemonParity, LoadRefusesAMismatchedFileAndKeepsTheLayer) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpecToml);
  ASSERT_TRUE(handle.ok());
  const std::vector<float> wrong(4 * 31, 1.f);
  ASSERT_TRUE(write_safetensors(checkpoints_ + "/wrong.safetensors",
                                {{kGateWeightName, DType::kF32, {4, 31}, wrong.data()}}).ok());
  auto load = s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "wrong.safetensors"}}, ipc::FrameType::kOk);
  EXPECT_FALSE(load.ok());
  EXPECT_NE(load.status().message().find(kGateWeightName), std::string_view::npos) << load.status();
  std::filesystem::resize_file(checkpoints_ + "/start.safetensors", 100);
  load = s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "start.safetensors"}}, ipc::FrameType::kOk);
  EXPECT_FALSE(load.ok());
  // The layer is unchanged: saving it gives the original weights.
  ASSERT_TRUE(s.call(ipc::FrameType::kSave, {{"handle", *handle}, {"path", "same.safetensors"}}, ipc::FrameType::kOk).ok());
  auto saved = SafetensorsFile::open(checkpoints_ + "/same.safetensors");
  ASSERT_TRUE(saved.ok());
  const auto want = to_f32(params_.wg);
  EXPECT_EQ(0, std::memcmp(saved->find(kGateWeightName)->data, want.data(), want.size() * 4));
}

// A load replaces the optimizer state too: with the file's where it carries one, afresh (zeros,
// step 0) where it does not. It used to keep the state of the weights it replaced beside the new
// ones. A step count that does not fit is refused, not clamped into an overflow at the next step.
TEST_F(DaemonParity, LoadReplacesTheOptimizerStateAndRefusesAStepThatDoesNotFit) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpecToml);
  ASSERT_TRUE(handle.ok()) << handle.status();
  const int64_t E = 4, M = 32, H = 48;
  const std::vector<std::pair<const char*, Shape>> tensors = {{kGateWeightName, {E, M}},
                                                              {kFc1WeightName, {E, H, M}},
                                                              {kFc1BiasName, {E, H}},
                                                              {kFc2WeightName, {E, H, M}},
                                                              {kFc2BiasName, {E, M}}};
  std::vector<std::vector<float>> data;
  std::vector<std::string> names;
  for (const auto& [name, shape] : tensors) {
    for (const char* prefix : {"", "optimizer.state0.", "optimizer.state1."}) {
      names.push_back(prefix + std::string(name));
      data.emplace_back(static_cast<size_t>(shape.numel()), 0.5f);
    }
  }
  std::vector<SafetensorsEntry> entries;
  for (size_t i = 0; i < names.size(); ++i)
    entries.push_back({names[i], DType::kF32, tensors[i / 3].second, data[i].data()});
  auto save_and_open = [&](const std::string& name) -> Result<SafetensorsFile> {
    TUTEL_RETURN_IF_ERROR(
        s.call(ipc::FrameType::kSave, {{"handle", *handle}, {"path", name}}, ipc::FrameType::kOk).status());
    return SafetensorsFile::open(checkpoints_ + "/" + name);
  };
  auto state_values = [](const SafetensorsFile& f, const std::string& name) {
    const SafetensorsTensor* t = f.find(name);
    const float* v = t ? static_cast<const float*>(t->data) : nullptr;
    return v ? std::vector<float>(v, v + t->nbytes / 4) : std::vector<float>();
  };
  const std::string state0 = std::string("optimizer.state0.") + kFc1WeightName;

  ASSERT_TRUE(write_safetensors(checkpoints_ + "/trained.safetensors", entries, {{"tuteld.step", "7"}}).ok());
  ASSERT_TRUE(s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "trained.safetensors"}}, ipc::FrameType::kOk)
                  .ok());
  auto trained = save_and_open("a.safetensors");
  ASSERT_TRUE(trained.ok()) << trained.status();
  EXPECT_EQ(trained->metadata().at("tuteld.step"), "7");
  EXPECT_EQ(state_values(*trained, state0), std::vector<float>(static_cast<size_t>(E * H * M), 0.5f));

  // Weights only (a Tutel file): the optimizer starts afresh.
  ASSERT_TRUE(
      s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "start.safetensors"}}, ipc::FrameType::kOk).ok());
  auto fresh = save_and_open("b.safetensors");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->metadata().at("tuteld.step"), "0");
  for (const auto& [name, shape] : tensors)
    for (const char* prefix : {"optimizer.state0.", "optimizer.state1."})
      EXPECT_EQ(state_values(*fresh, prefix + std::string(name)), std::vector<float>(static_cast<size_t>(shape.numel()), 0.f))
          << prefix << name;

  for (const char* step : {"99999999999999999999", "9223372036854775807", "-1", "7x"}) {
    ASSERT_TRUE(write_safetensors(checkpoints_ + "/step.safetensors", entries, {{"tuteld.step", step}}).ok());
    auto load = s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "step.safetensors"}}, ipc::FrameType::kOk);
    EXPECT_EQ(load.status().code(), StatusCode::kCorruption) << step << ": " << load.status();
    EXPECT_NE(load.status().message().find("not a step count"), std::string_view::npos) << load.status();
  }
  auto after = save_and_open("c.safetensors");  // the refused loads changed nothing
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->metadata().at("tuteld.step"), "0");
}

}  // namespace
}  // namespace tutel::testing
