// A tenant's max_memory_bytes bounds what its in-flight training forwards hold, not only its
// parameters: the forward that would take it over is refused with a message saying what to do,
// leaves nothing behind, and the layer keeps working. Unit checks of the accounting first, then
// the real tuteld with the client library and tutelctl.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "daemon_fixture.hpp"
#include "tenant_memory.hpp"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

using daemon::ActivationBackend;
using daemon::TenantMemory;

TEST(ActivationBackend, ChargesExactSizesAndRefusesOnlyWhileEnforcing) {
  auto cpu = make_backend("cpu", BackendOptions{1, 0});
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  auto memory = std::make_shared<TenantMemory>("a", 10000);
  auto parameters = daemon::ParameterCharge::take(memory, 4000, "layer 'p'");
  ASSERT_TRUE(parameters.ok());
  ActivationBackend b(**cpu, memory);

  auto first = b.allocate(3000);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(b.bytes(), 3000u);
  EXPECT_EQ(memory->activation_bytes(), 3000u);
  EXPECT_EQ(memory->total_bytes(), 7000u);
  {
    ActivationBackend::Enforce enforce(b);
    // 7000 + 3000 fits exactly; one byte more does not.
    auto refused = b.allocate(3001);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
    EXPECT_NE(
        refused.status().message().find(
            "tenant 'a' would hold 10001 bytes (parameters 4000, in-flight forwards and workspaces "
            "6001) "
            "over its max_memory_bytes 10000: run the backwards of pending forwards, or raise "
            "max_memory_bytes"),
        std::string::npos)
        << refused.status().to_string();
    EXPECT_EQ(memory->total_bytes(), 7000u);  // a refusal charges nothing
    auto fits = b.allocate(3000);
    ASSERT_TRUE(fits.ok());
    EXPECT_EQ(memory->total_bytes(), 10000u);
  }  // the buffer is freed here
  EXPECT_EQ(b.bytes(), 3000u);
  // A backward's growth is let through, and shows as over the quota.
  auto unenforced = b.allocate(5000);
  ASSERT_TRUE(unenforced.ok());
  EXPECT_TRUE(memory->over_quota());
  // A new layer does not fit while the forwards hold the memory.
  EXPECT_EQ(daemon::ParameterCharge::take(memory, 1, "layer 'q'").status().code(), StatusCode::kResourceExhausted);
  unenforced->reset();
  first->reset();
  EXPECT_EQ(b.bytes(), 0u);
  EXPECT_EQ(memory->activation_bytes(), 0u);
  EXPECT_EQ(memory->total_bytes(), 4000u);
  parameters->reset();
  EXPECT_EQ(memory->total_bytes(), 0u);
}

nlohmann::json ctl_json(const DaemonProcess& d, const std::string& what) {
  auto [code, out] =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json " + what, false);
  EXPECT_EQ(code, 0) << out;
  return nlohmann::json::parse(out, nullptr, false);
}

nlohmann::json default_tenant(const DaemonProcess& d) {
  const nlohmann::json reply = ctl_json(d, "tenants");
  for (const auto& t : reply["tenants"])
    if (t["name"] == "default") return t;
  ADD_FAILURE() << "no tenant 'default' in " << reply.dump();
  return nlohmann::json::object();
}

constexpr const char* kSpec =
    "name = \"quota\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ncapacity_factor = "
    "1.0\ninit_seed = 3\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 0.01\nmomentum = 0.9\n";
constexpr int64_t kTokens = 64, kDim = 16;

struct Batch {
  std::vector<float> x, y, dy, dx;
  explicit Batch(unsigned seed)
      : x(kTokens * kDim), y(kTokens * kDim), dy(kTokens * kDim), dx(kTokens * kDim) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n;
    for (float& v : x) v = n(rng);
    for (float& v : dy) v = n(rng);
  }
};

TEST(TenantActivationQuota, RefusesTheForwardOverQuotaAndRecovers) {
  // Calibration on a daemon with the default quota: the parameters' bytes and one in-flight
  // forward's (a capacity factor, so the capacity and every buffer size follow from the tokens).
  uint64_t parameters = 0, entry = 0;
  {
    DaemonProcess d(DaemonOptions{});
    ASSERT_TRUE(d.start());
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status().to_string();
    auto layer = client->create_layer(kSpec);
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    Batch b(1);
    client::ForwardInfo f1, f2;
    ASSERT_TRUE(layer->forward(b.x.data(), kTokens, b.y.data(), &f1).ok());
    nlohmann::json t = default_tenant(d);
    parameters = t["memory_bytes"].get<uint64_t>();
    entry = t["pending_bytes"].get<uint64_t>();
    ASSERT_GT(entry, uint64_t{kTokens * kDim * 4});           // at least its copy of x
    EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), entry);  // the CPU backend stages nothing
    ASSERT_TRUE(layer->forward(b.x.data(), kTokens, b.y.data(), &f2).ok());
    EXPECT_EQ(default_tenant(d)["pending_bytes"].get<uint64_t>(), 2 * entry);
    ASSERT_TRUE(layer->backward(f1.sequence, b.dy.data(), 0.f, b.dx.data()).ok());
    ASSERT_TRUE(layer->backward(f2.sequence, b.dy.data(), 0.f, b.dx.data()).ok());
    EXPECT_EQ(default_tenant(d)["pending_bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ(d.stop(), 0) << d.log();
  }

  // Room for the layer and kFits in-flight forwards, not one more.
  constexpr int kFits = 3;
  const uint64_t quota = parameters + kFits * entry + entry / 2;
  DaemonOptions options;
  options.default_max_memory_bytes = quota;
  DaemonProcess d(options);
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status().to_string();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  nlohmann::json t = default_tenant(d);
  EXPECT_EQ(t["memory_bytes"].get<uint64_t>(), parameters);
  EXPECT_EQ(t["max_memory_bytes"].get<uint64_t>(), quota);
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), 0u);

  std::vector<Batch> batches;
  for (int i = 0; i <= kFits; ++i) batches.emplace_back(10 + i);
  std::vector<uint64_t> sequences;
  for (int i = 0; i < kFits; ++i) {
    client::ForwardInfo info;
    ASSERT_TRUE(layer->forward(batches[i].x.data(), kTokens, batches[i].y.data(), &info).ok());
    sequences.push_back(info.sequence);
    t = default_tenant(d);
    EXPECT_EQ(t["pending_bytes"].get<uint64_t>(), (i + 1) * entry);
    EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), (i + 1) * entry);
  }

  const Status refused = layer->forward(batches[kFits].x.data(), kTokens, batches[kFits].y.data());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused.to_string();
  ::testing::Test::RecordProperty("refusal", refused.to_string());
  for (const std::string& part :
       {std::string("layer 'quota'"), std::string("tenant 'default' would hold "),
        "(parameters " + std::to_string(parameters) + ", in-flight forwards and workspaces ",
        "over its max_memory_bytes " + std::to_string(quota),
        std::string("run the backwards of pending forwards, or raise max_memory_bytes")})
    EXPECT_NE(refused.message().find(part), std::string::npos)
        << part << " not in: " << refused.to_string();
  // Nothing left behind: no entry, and the charge is what it was.
  t = default_tenant(d);
  EXPECT_EQ(t["pending_bytes"].get<uint64_t>(), kFits * entry);
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), kFits * entry);
  nlohmann::json layers = ctl_json(d, "layers")["layers"];
  ASSERT_EQ(layers.size(), 1u);
  EXPECT_EQ(layers[0]["pending_backwards"].get<int64_t>(), kFits);
  EXPECT_EQ(layers[0]["pending_bytes"].get<uint64_t>(), kFits * entry);
  EXPECT_EQ(layer->pending_backwards(), static_cast<size_t>(kFits));

  // The pending backwards still run, in any order, and give the memory back.
  for (int i = kFits - 1; i >= 0; --i) {
    const Status st =
        layer->backward(sequences[i], batches[i].dy.data(), 0.01f, batches[i].dx.data());
    ASSERT_TRUE(st.ok()) << st.to_string();
    EXPECT_EQ(default_tenant(d)["pending_bytes"].get<uint64_t>(), i * entry);
  }
  t = default_tenant(d);
  // Recycled entries may stay, within the quota.
  EXPECT_LE(t["activation_bytes"].get<uint64_t>() + parameters, quota);
  ASSERT_TRUE(layer->step().ok());

  // And new training forwards run again.
  for (int round = 0; round < 2; ++round) {
    client::ForwardInfo info;
    const Status f =
        layer->forward(batches[kFits].x.data(), kTokens, batches[kFits].y.data(), &info);
    ASSERT_TRUE(f.ok()) << f.to_string();
    // A recycled entry also holds the gradient buffers its backward added.
    t = default_tenant(d);
    EXPECT_GE(t["pending_bytes"].get<uint64_t>(), entry);
    EXPECT_LE(t["activation_bytes"].get<uint64_t>() + parameters, quota);
    const Status b =
        layer->backward(info.sequence, batches[kFits].dy.data(), 0.01f, batches[kFits].dx.data());
    ASSERT_TRUE(b.ok()) << b.to_string();
  }
  EXPECT_EQ(default_tenant(d)["pending_bytes"].get<uint64_t>(), 0u);

  auto [mcode, metrics] =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " metrics", false);
  EXPECT_EQ(mcode, 0);
  EXPECT_NE(metrics.find("tuteld_tenant_activation_bytes{tenant=\"default\"} "), std::string::npos)
      << metrics;
  EXPECT_TRUE(d.alive()) << d.log();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// Plans a layer keeps for later requests (graphs' PlanCache) never crowd out a training forward:
// an inference forward that does not fit is refused, an idle plan that fits stays cached, and a training forward that
// would not fit beside it gets it dropped first and runs, also when the plan is another layer's
// of the tenant, unless the operator pinned that layer (tutelctl pin): then the forward is
// refused and the pinned plan stays, until it is unpinned.
TEST(TenantActivationQuota, IdlePlansAreDroppedBeforeATrainingForwardIsRefused) {
  uint64_t parameters = 0, entry = 0, inference_plan = 0;
  {
    DaemonProcess d(DaemonOptions{});
    ASSERT_TRUE(d.start());
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status().to_string();
    auto layer = client->create_layer(kSpec);
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    Batch b(1);
    ASSERT_TRUE(layer->infer(b.x.data(), kTokens, b.y.data()).ok());
    inference_plan = default_tenant(d)["activation_bytes"].get<uint64_t>();
    ASSERT_TRUE(layer->forward(b.x.data(), kTokens, b.y.data()).ok());
    const nlohmann::json t = default_tenant(d);
    parameters = t["memory_bytes"].get<uint64_t>();
    entry = t["pending_bytes"].get<uint64_t>();
    EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), inference_plan + entry);
    EXPECT_EQ(d.stop(), 0) << d.log();
  }
  ASSERT_GT(inference_plan, 0u);
  ASSERT_GT(entry, inference_plan);  // a training plan keeps more, and x
  // Room for two layers and one in-flight forward, not for an idle inference plan beside them.
  const uint64_t quota = 2 * parameters + entry + inference_plan / 2;
  DaemonOptions options;
  options.default_max_memory_bytes = quota;
  DaemonProcess d(options);
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status().to_string();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  std::string other_spec = kSpec;
  other_spec.replace(other_spec.find("\"quota\""), 7, "\"other\"");
  auto other = client->create_layer(other_spec);
  ASSERT_TRUE(other.ok()) << other.status().to_string();

  // A big inference forward that does not fit is refused, like a training one, and leaves
  // nothing behind.
  {
    const int64_t tokens = 1024;
    std::vector<float> x(tokens * kDim, 0.5f), y(tokens * kDim);
    const Status st = layer->infer(x.data(), tokens, y.data());
    EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.to_string();
    EXPECT_NE(st.message().find("over its max_memory_bytes"), std::string::npos) << st.to_string();
    EXPECT_EQ(default_tenant(d)["activation_bytes"].get<uint64_t>(), 0u);
  }
  // One that fits keeps its plan for the next: here the other layer's.
  Batch b(2);
  ASSERT_TRUE(other->infer(b.x.data(), kTokens, b.y.data()).ok());
  nlohmann::json t = default_tenant(d);
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), inference_plan);
  ASSERT_GT(t["activation_bytes"].get<uint64_t>() + 2 * parameters + entry, quota);

  // Pinned, the other layer keeps it, and the training forward that needs its room is refused.
  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " ";
  auto [pin_code, pin_out] = run_command(ctl + "pin default/other");
  ASSERT_EQ(pin_code, 0) << pin_out;
  const Status refused = layer->forward(b.x.data(), kTokens, b.y.data());
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused.to_string();
  t = default_tenant(d);
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), inference_plan);
  EXPECT_EQ(t["pending_bytes"].get<uint64_t>(), 0u);
  auto [plans_code, plans_table] = run_command(ctl + "plans");
  EXPECT_NE(plans_table.find("default/other  host  yes"), std::string::npos) << plans_table;
  auto [unpin_code, unpin_out] = run_command(ctl + "unpin default/other");
  ASSERT_EQ(unpin_code, 0) << unpin_out;

  // The training forward would not fit beside it: it goes, the forward runs.
  client::ForwardInfo info;
  const Status f = layer->forward(b.x.data(), kTokens, b.y.data(), &info);
  ASSERT_TRUE(f.ok()) << f.to_string();
  t = default_tenant(d);
  EXPECT_EQ(t["pending_bytes"].get<uint64_t>(), entry);
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), entry);
  ASSERT_TRUE(layer->backward(info.sequence, b.dy.data(), 0.f, b.dx.data()).ok());
  EXPECT_EQ(default_tenant(d)["pending_bytes"].get<uint64_t>(), 0u);
  EXPECT_TRUE(d.alive()) << d.log();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// An inference forward is held to the quota like a training one. Its buffers grow with the
// capacity, and a capacity_factor far above E/k (valid up to 1e6) asks for ~0.5 GB here at 64
// tokens: refused, not allocated (before, it was let through; at larger factors the daemon ran
// out of memory for every tenant). And an idle plan of another layer of the tenant is dropped to
// make room for an inference forward, as for a training one.
TEST(TenantActivationQuota, AnInferenceForwardIsHeldToTheQuotaAndMayDropIdlePlans) {
  uint64_t parameters = 0, inference_plan = 0;
  {
    DaemonProcess d(DaemonOptions{});
    ASSERT_TRUE(d.start());
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status().to_string();
    auto layer = client->create_layer(kSpec);
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    parameters = default_tenant(d)["memory_bytes"].get<uint64_t>();
    Batch b(1);
    ASSERT_TRUE(layer->infer(b.x.data(), kTokens, b.y.data()).ok());
    inference_plan = default_tenant(d)["activation_bytes"].get<uint64_t>();
    EXPECT_EQ(d.stop(), 0) << d.log();
  }
  ASSERT_GT(inference_plan, 0u);
  // Two layers and one inference plan, not two.
  const uint64_t quota = 3 * parameters + inference_plan + inference_plan / 2;
  DaemonOptions options;
  options.default_max_memory_bytes = quota;
  DaemonProcess d(options);
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status().to_string();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  std::string other_spec = kSpec, wide_spec = kSpec;
  other_spec.replace(other_spec.find("\"quota\""), 7, "\"other\"");
  wide_spec.replace(wide_spec.find("\"quota\""), 7, "\"wide\"");
  wide_spec.replace(wide_spec.find("capacity_factor = 1.0"), 21, "capacity_factor = 10000.0");
  auto other = client->create_layer(other_spec);
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  auto wide = client->create_layer(wide_spec);
  ASSERT_TRUE(wide.ok()) << wide.status().to_string();
  EXPECT_EQ(default_tenant(d)["memory_bytes"].get<uint64_t>(), 3 * parameters);

  Batch b(7);
  const Status refused = wide->infer(b.x.data(), kTokens, b.y.data());
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused.to_string();
  for (const char* part : {"layer 'wide'", "tenant 'default' would hold ", "over its max_memory_bytes"})
    EXPECT_NE(refused.message().find(part), std::string::npos) << part << " not in: " << refused.to_string();
  EXPECT_EQ(default_tenant(d)["activation_bytes"].get<uint64_t>(), 0u);

  // The layer's plan stays cached; the other layer's inference needs its room and gets it.
  ASSERT_TRUE(layer->infer(b.x.data(), kTokens, b.y.data()).ok());
  EXPECT_EQ(default_tenant(d)["activation_bytes"].get<uint64_t>(), inference_plan);
  std::vector<float> y_other(b.y.size());
  const Status st = other->infer(b.x.data(), kTokens, y_other.data());
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(default_tenant(d)["activation_bytes"].get<uint64_t>(), inference_plan);
  // Both layers drew the same weights (init_seed): the same results, whichever plan served them.
  EXPECT_EQ(y_other, b.y);
  EXPECT_TRUE(d.alive()) << d.log();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// A layer destroyed while training forwards wait for their backwards frees what they held, and the
// tenant's count of it goes with it (it used to stay, for good).
TEST(TenantActivationQuota, DestroyingALayerWithPendingForwardsGivesTheirBytesBack) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status().to_string();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  Batch b(5);
  ASSERT_TRUE(layer->forward(b.x.data(), kTokens, b.y.data()).ok());
  ASSERT_TRUE(layer->forward(b.x.data(), kTokens, b.y.data()).ok());
  nlohmann::json t = default_tenant(d);
  ASSERT_GT(t["pending_bytes"].get<uint64_t>(), 0u);
  ASSERT_TRUE(layer->destroy().ok());
  t = default_tenant(d);
  EXPECT_EQ(t["pending_bytes"].get<uint64_t>(), 0u) << t.dump();
  EXPECT_EQ(t["activation_bytes"].get<uint64_t>(), 0u) << t.dump();
  EXPECT_EQ(t["memory_bytes"].get<uint64_t>(), 0u) << t.dump();
  // And the quota it frees serves a new layer's forwards.
  auto again = client->create_layer(kSpec);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  ASSERT_TRUE(again->forward(b.x.data(), kTokens, b.y.data()).ok());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

}  // namespace
}  // namespace tutel::testing
