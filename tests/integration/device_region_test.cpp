// Zero-copy submission through device regions (docs/protocol.md §7), against the real tuteld on
// the CPU backend, where a region is a sealed memfd both processes map. Every result is compared
// with the same request made through the arena (the copying path, itself checked against the
// float64 reference by daemon_parity_test): same layer, same inputs, so they must be identical.
// Then the malformed uses: from the client library, and by hand on the wire.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "../common/loopback.hpp"
#include "daemon_fixture.hpp"
#include "raw_session.hpp"
#include "tutel/client.h"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

constexpr const char* kSpec =
    "name = \"zc\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ncapacity_factor = 1.0\ninit_seed = 5\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 0.01\n";
constexpr int64_t kDim = 16;

std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// tutelctl's output for `args` on the daemon's admin socket.
std::string tutelctl(const DaemonProcess& d, const std::string& args) {
  auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " " + args, false);
  EXPECT_EQ(code, 0) << out;
  return out;
}

nlohmann::json tenant_json(const DaemonProcess& d) {
  const std::string out = tutelctl(d, "--json tenants");
  const auto reply = nlohmann::json::parse(out, nullptr, false);
  for (const auto& t : reply.value("tenants", nlohmann::json::array()))
    if (t["name"] == "default") return t;
  ADD_FAILURE() << "no tenant 'default' in " << out;
  return {};
}

struct Started {
  std::unique_ptr<DaemonProcess> daemon;
  std::optional<client::Client> client;
};

Started start(DaemonOptions options = {}) {
  Started s;
  s.daemon = std::make_unique<DaemonProcess>(options);
  EXPECT_TRUE(s.daemon->start());
  auto c = client::Client::connect(s.daemon->client_socket());
  EXPECT_TRUE(c.ok()) << c.status();
  if (c.ok()) s.client.emplace(std::move(*c));
  return s;
}

TEST(DeviceRegion, ZeroCopyRequestsEqualTheArenaPath) {
  Started s = start();
  ASSERT_TRUE(s.client);
  auto layer = s.client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->info().rank, 0);
  EXPECT_EQ(layer->info().device, "cpu:0");

  // Four micro-batches of different sizes, laid out in one region: x, y, dy, dx each.
  const std::vector<int64_t> tokens = {37, 64, 5, 128};
  std::mt19937 rng(std::random_device{}());
  size_t floats = 0;
  std::vector<size_t> at;
  for (int64_t t : tokens) {
    at.push_back(floats);
    floats += 4 * static_cast<size_t>(t * kDim) + 16;  // a gap, so nothing is adjacent by accident
  }
  auto region = s.client->map_device_region(layer->info().rank, floats * 4);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->kind(), "host_memfd");
  EXPECT_EQ(region->device(), "cpu");
  EXPECT_EQ(region->bytes(), floats * 4);
  ASSERT_NE(region->data(), nullptr);
  // Charged at what the daemon allocated: whole pages.
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)), charged = (floats * 4 + page - 1) / page * page;
  EXPECT_EQ(tenant_json(*s.daemon)["region_bytes"].get<uint64_t>(), charged);
  EXPECT_NE(tutelctl(*s.daemon, "metrics").find("tuteld_tenant_region_bytes{tenant=\"default\"} " +
                                                std::to_string(charged)),
            std::string::npos);
  float* base = static_cast<float*>(region->data());
  auto x = [&](size_t i) { return base + at[i]; };
  auto y = [&](size_t i) { return base + at[i] + tokens[i] * kDim; };
  auto dy = [&](size_t i) { return base + at[i] + 2 * tokens[i] * kDim; };
  auto dx = [&](size_t i) { return base + at[i] + 3 * tokens[i] * kDim; };

  std::vector<std::vector<float>> xs, dys;
  for (size_t i = 0; i < tokens.size(); ++i) {
    xs.push_back(randn(tokens[i] * kDim, rng));
    dys.push_back(randn(tokens[i] * kDim, rng));
    std::memcpy(x(i), xs[i].data(), xs[i].size() * 4);
    std::memcpy(dy(i), dys[i].data(), dys[i].size() * 4);
  }

  // The arena path, one micro-batch at a time: the expected values.
  std::vector<std::vector<float>> want_y, want_dx;
  std::vector<client::ForwardInfo> want_info;
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::vector<float> yy(tokens[i] * kDim), dxx(tokens[i] * kDim);
    client::ForwardInfo info;
    ASSERT_TRUE(layer->forward(xs[i].data(), tokens[i], yy.data(), &info).ok());
    ASSERT_TRUE(layer->backward(info.sequence, dys[i].data(), 0.01f, dxx.data()).ok());
    want_y.push_back(std::move(yy));
    want_dx.push_back(std::move(dxx));
    want_info.push_back(info);
  }

  // The same in place: all forwards in flight at once, the backwards in reverse order.
  std::vector<client::Ticket> forwards;
  for (size_t i = 0; i < tokens.size(); ++i) {
    auto t = layer->submit_forward_device(x(i), tokens[i], y(i));
    ASSERT_TRUE(t.ok()) << t.status();
    forwards.push_back(*t);
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    auto info = s.client->wait(forwards[i]);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->capacity, want_info[i].capacity);
    EXPECT_EQ(info->dropped, want_info[i].dropped);
    EXPECT_EQ(info->l_aux, want_info[i].l_aux);
    EXPECT_EQ(std::memcmp(y(i), want_y[i].data(), want_y[i].size() * 4), 0) << "micro-batch " << i;
  }
  for (size_t i = tokens.size(); i-- > 0;) {
    const Status st = layer->backward_device(forwards[i].sequence, dy(i), 0.01f, dx(i));
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(std::memcmp(dx(i), want_dx[i].data(), want_dx[i].size() * 4), 0) << "micro-batch " << i;
  }
  EXPECT_EQ(layer->pending_backwards(), 0u);

  // Inference in place equals inference through the arena; the inputs are left untouched.
  std::vector<float> infer_y(tokens[1] * kDim);
  ASSERT_TRUE(layer->infer(xs[1].data(), tokens[1], infer_y.data()).ok());
  std::memset(y(1), 0xff, infer_y.size() * 4);
  ASSERT_TRUE(layer->infer_device(x(1), tokens[1], y(1)).ok());
  EXPECT_EQ(std::memcmp(y(1), infer_y.data(), infer_y.size() * 4), 0);
  EXPECT_EQ(std::memcmp(x(1), xs[1].data(), xs[1].size() * 4), 0);

  // The gradients of both paths accumulated: a step works and the region goes back on unmap.
  ASSERT_TRUE(layer->step().ok());
  ASSERT_TRUE(region->unmap().ok());
  EXPECT_EQ(region->data(), nullptr);
  EXPECT_EQ(tenant_json(*s.daemon)["region_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(s.daemon->stop(), 0) << s.daemon->log();
}

// A [group] layer (expert parallel, here a group of one) takes device regions the same way.
TEST(DeviceRegion, GroupLayersUseRegionsInPlaceToo) {
  Started s = start();
  ASSERT_TRUE(s.client);
  const std::string spec = std::string(kSpec) + "[group]\ncoordinator = \"127.0.0.1:" +
                           std::to_string(free_port()) + "\"\nsize = 1\nrank = 0\n";
  auto layer = s.client->create_layer(spec);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const int64_t tokens = 48;
  const size_t tensor = tokens * kDim;
  auto region = s.client->map_device_region(layer->info().rank, 4 * tensor * 4);
  ASSERT_TRUE(region.ok()) << region.status();
  float* p = static_cast<float*>(region->data());
  std::mt19937 rng(std::random_device{}());
  const std::vector<float> x = randn(tensor, rng), dy = randn(tensor, rng);
  std::memcpy(p, x.data(), tensor * 4);
  std::memcpy(p + 2 * tensor, dy.data(), tensor * 4);

  std::vector<float> want_y(tensor), want_dx(tensor);
  client::ForwardInfo want, got;
  ASSERT_TRUE(layer->forward(x.data(), tokens, want_y.data(), &want).ok());
  ASSERT_TRUE(layer->backward(want.sequence, dy.data(), 0.01f, want_dx.data()).ok());
  ASSERT_TRUE(layer->forward_device(p, tokens, p + tensor, &got).ok());
  ASSERT_TRUE(layer->backward_device(got.sequence, p + 2 * tensor, 0.01f, p + 3 * tensor).ok());
  EXPECT_EQ(got.l_aux, want.l_aux);
  EXPECT_EQ(std::memcmp(p + tensor, want_y.data(), tensor * 4), 0);
  EXPECT_EQ(std::memcmp(p + 3 * tensor, want_dx.data(), tensor * 4), 0);
  // dx alone from a device region: the same dx, and the gradients stay zeroed.
  ASSERT_TRUE(layer->zero_grad().ok());
  std::memset(p + 3 * tensor, 0, tensor * 4);
  ASSERT_TRUE(layer->forward_device(p, tokens, p + tensor, &got).ok());
  ASSERT_TRUE(layer->backward_device(got.sequence, p + 2 * tensor, 0.01f, p + 3 * tensor,
                                     client::Layer::ParamGrads::kKeep)
                  .ok());
  EXPECT_EQ(std::memcmp(p + 3 * tensor, want_dx.data(), tensor * 4), 0);
  const Result<double> norm = layer->grad_norm();
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_EQ(*norm, 0.0);
  ASSERT_TRUE(layer->step().ok());
  EXPECT_EQ(s.daemon->stop(), 0) << s.daemon->log();
}

TEST(DeviceRegion, MisuseFromTheClientIsRefusedWithWhatToDo) {
  DaemonOptions options;
  options.ranks = 2;
  options.default_max_memory_bytes = 4 << 20;
  Started s = start(options);
  ASSERT_TRUE(s.client);
  auto layer = s.client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const int64_t tokens = 8;
  const size_t tensor = tokens * kDim;

  auto a = s.client->map_device_region(0, 4 * tensor * 4);
  auto b = s.client->map_device_region(1, 4 * tensor * 4);
  ASSERT_TRUE(a.ok() && b.ok());
  float* pa = static_cast<float*>(a->data());
  float* pb = static_cast<float*>(b->data());
  std::vector<float> host(tensor);

  // Host memory where a region is expected.
  Status st = layer->infer_device(host.data(), tokens, pa);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("does not point into a device region"), std::string::npos) << st;
  // A region of the other rank (CPU ranks all name the device cpu:0).
  client::DeviceRegion& other_rank = layer->info().rank == 0 ? *b : *a;
  float* po = static_cast<float*>(other_rank.data());
  st = layer->infer_device(po, tokens, po + tensor);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("map a region on the layer's rank"), std::string::npos) << st;
  // An empty batch may put its (empty) y at the region's very end (docs/protocol.md §4).
  st = layer->infer_device(pa, 0, pa + 4 * tensor);
  EXPECT_TRUE(st.ok()) << st;
  // Tensors split over two regions.
  st = layer->infer_device(pa, tokens, pb);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("must share one region"), std::string::npos) << st;
  // A tensor running past the region's end.
  st = layer->infer_device(pa, tokens, pa + 3 * tensor + 1);
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st;
  // Overlapping input and output: the daemon refuses it.
  st = layer->infer_device(pa, tokens, pa + tensor / 2);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("overlap"), std::string::npos) << st;
  // A backward without its forward.
  EXPECT_FALSE(layer->backward_device(12345, pa, 0.f, pa + tensor).ok());

  // Sizes and ranks the daemon cannot map.
  EXPECT_EQ(s.client->map_device_region(0, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.client->map_device_region(0, 6).status().code(), StatusCode::kInvalidArgument);
  auto no_rank = s.client->map_device_region(2, 4096);
  EXPECT_EQ(no_rank.status().code(), StatusCode::kInvalidArgument) << no_rank.status();
  EXPECT_NE(no_rank.status().message().find("ranks 0 to 1"), std::string::npos) << no_rank.status();
  EXPECT_EQ(s.client->map_device_region(-1, 4096).status().code(), StatusCode::kInvalidArgument);
  // Over the tenant's quota, with what to do; nothing is charged for it.
  const uint64_t before = tenant_json(*s.daemon)["region_bytes"].get<uint64_t>();
  auto too_big = s.client->map_device_region(0, 8 << 20);
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted) << too_big.status();
  EXPECT_NE(too_big.status().message().find("unmap regions it no longer uses"), std::string::npos) << too_big.status();
  EXPECT_EQ(tenant_json(*s.daemon)["region_bytes"].get<uint64_t>(), before);

  // At most 16 per session.
  std::vector<client::DeviceRegion> many;
  Status last;
  for (int i = 0; i < 20; ++i) {
    auto r = s.client->map_device_region(0, 4096);
    if (!r.ok()) {
      last = r.status();
      break;
    }
    many.push_back(std::move(*r));
  }
  EXPECT_EQ(many.size(), 14u);  // with a and b
  EXPECT_EQ(last.code(), StatusCode::kResourceExhausted) << last;
  many.clear();  // unmapped on destruction

  // An unmapped region cannot be used, and everything still works afterwards.
  ASSERT_TRUE(b->unmap().ok());
  EXPECT_TRUE(b->unmap().ok());  // idempotent
  st = layer->infer_device(pb, tokens, pb + tensor);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  ASSERT_TRUE(layer->infer_device(pa, tokens, pa + tensor).ok());
  ASSERT_TRUE(s.client->ping().ok());

  // A session's end frees its regions, whatever the client did not unmap.
  EXPECT_GT(tenant_json(*s.daemon)["region_bytes"].get<uint64_t>(), 0u);
  s.client->close();
  // The session is gone, the mapping stays until the handle goes; requests through it fail.
  ASSERT_NE(a->data(), nullptr);
  pa[0] = 1.f;
  EXPECT_FALSE(layer->infer_device(pa, tokens, pa + tensor).ok());
  EXPECT_TRUE(a->unmap().ok());
  EXPECT_EQ(a->data(), nullptr);
  for (int i = 0; i < 200 && tenant_json(*s.daemon)["region_bytes"].get<uint64_t>() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(tenant_json(*s.daemon)["region_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(s.daemon->stop(), 0) << s.daemon->log();
}

TEST(DeviceRegion, TheCApiMapsAndSubmitsInPlace) {
  Started s = start();
  ASSERT_TRUE(s.client);
  tutel_client* c = tutel_connect(s.daemon->client_socket().c_str());
  ASSERT_NE(c, nullptr) << tutel_last_error();
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_create(c, kSpec, &layer), TUTEL_OK) << tutel_last_error();
  int rank = -1;
  ASSERT_EQ(tutel_layer_rank(layer, &rank), TUTEL_OK);
  EXPECT_EQ(rank, 0);
  const int64_t tokens = 32;
  const size_t tensor = tokens * kDim;
  tutel_region* region = nullptr;
  ASSERT_EQ(tutel_region_map(c, rank, 4 * tensor * 4, &region), TUTEL_OK) << tutel_last_error();
  void* data = nullptr;
  uint64_t bytes = 0;
  const char *kind = nullptr, *device = nullptr;
  ASSERT_EQ(tutel_region_info(region, &data, &bytes, &kind, &device), TUTEL_OK);
  EXPECT_EQ(bytes, 4 * tensor * 4);
  EXPECT_STREQ(kind, "host_memfd");
  EXPECT_STREQ(device, "cpu");
  float* p = static_cast<float*>(data);
  std::mt19937 rng(std::random_device{}());
  const std::vector<float> x = randn(tensor, rng), dy = randn(tensor, rng);
  std::memcpy(p, x.data(), tensor * 4);
  std::memcpy(p + 2 * tensor, dy.data(), tensor * 4);

  std::vector<float> want_y(tensor), want_dx(tensor);
  float want_aux = 0.f, aux = 0.f;
  ASSERT_EQ(tutel_forward(layer, x.data(), tokens, want_y.data(), &want_aux), TUTEL_OK) << tutel_last_error();
  ASSERT_EQ(tutel_backward(layer, dy.data(), 0.f, want_dx.data()), TUTEL_OK) << tutel_last_error();
  ASSERT_EQ(tutel_forward_device(layer, p, tokens, p + tensor, &aux), TUTEL_OK) << tutel_last_error();
  ASSERT_EQ(tutel_backward_device(layer, p + 2 * tensor, 0.f, p + 3 * tensor), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(aux, want_aux);
  EXPECT_EQ(std::memcmp(p + tensor, want_y.data(), tensor * 4), 0);
  EXPECT_EQ(std::memcmp(p + 3 * tensor, want_dx.data(), tensor * 4), 0);
  ASSERT_EQ(tutel_infer_device(layer, p, tokens, p + tensor, nullptr), TUTEL_OK) << tutel_last_error();
  // dx alone: the same dx, the gradients as they were (zeroed).
  ASSERT_EQ(tutel_zero_grad(layer), TUTEL_OK) << tutel_last_error();
  std::memset(p + 3 * tensor, 0, tensor * 4);
  ASSERT_EQ(tutel_forward_device(layer, p, tokens, p + tensor, nullptr), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(tutel_backward_device_flags(layer, p + 2 * tensor, 0.f, p + 3 * tensor, 2u), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tutel_last_error()).find("unknown flags 2"), std::string::npos) << tutel_last_error();
  ASSERT_EQ(tutel_backward_device_flags(layer, p + 2 * tensor, 0.f, p + 3 * tensor, TUTEL_KEEP_PARAM_GRADS), TUTEL_OK)
      << tutel_last_error();
  EXPECT_EQ(std::memcmp(p + 3 * tensor, want_dx.data(), tensor * 4), 0);
  double norm = -1;
  ASSERT_EQ(tutel_grad_norm(layer, &norm), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(norm, 0.0);

  // Misuse: no pending forward, host pointers, a released region handle.
  EXPECT_EQ(tutel_backward_device(layer, p, 0.f, p + tensor), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_forward_device(layer, x.data(), tokens, want_y.data(), nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_region_map(c, 0, 4096, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_region_info(nullptr, &data, nullptr, nullptr, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_region_unmap(region), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(tutel_region_unmap(nullptr), TUTEL_OK);
  tutel_layer_release(layer);
  tutel_close(c);
  EXPECT_EQ(s.daemon->stop(), 0) << s.daemon->log();
}

// Training forwards backwarded in reverse order from C (autograd's order), by sequence: two
// zero-copy forwards of different sizes submitted at once, their backwards submitted newest
// first, equal the same done through the arena (tutel_forward_with_info gives each sequence),
// dx and the accumulated gradients alike. tutel_backward_device would pair the first backward
// with the oldest forward, of another size.
TEST(DeviceRegion, TheCApiBackwardsZeroCopyForwardsInAnyOrder) {
  Started s = start();
  ASSERT_TRUE(s.client);
  tutel_client* c = tutel_connect(s.daemon->client_socket().c_str());
  ASSERT_NE(c, nullptr) << tutel_last_error();
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_create(c, kSpec, &layer), TUTEL_OK) << tutel_last_error();
  std::mt19937 rng(std::random_device{}());
  const int64_t tokens[2] = {8, 21};
  std::vector<float> x[2], dy[2], want_y[2], want_dx[2];
  for (int i = 0; i < 2; ++i) {
    x[i] = randn(tokens[i] * kDim, rng);
    dy[i] = randn(tokens[i] * kDim, rng);
    want_y[i].resize(x[i].size());
    want_dx[i].resize(x[i].size());
  }
  tutel_forward_info info[2]{};
  tutel_ticket ticket{};
  ASSERT_EQ(tutel_zero_grad(layer), TUTEL_OK) << tutel_last_error();
  for (int i = 0; i < 2; ++i)
    ASSERT_EQ(tutel_forward_with_info(layer, x[i].data(), tokens[i], want_y[i].data(), &info[i]), TUTEL_OK)
        << tutel_last_error();
  EXPECT_NE(info[0].sequence, info[1].sequence);
  EXPECT_GT(info[1].capacity, 0);
  for (int i = 1; i >= 0; --i) {
    ASSERT_EQ(tutel_submit_backward(layer, info[i].sequence, dy[i].data(), 0.5f, want_dx[i].data(), &ticket), TUTEL_OK)
        << tutel_last_error();
    ASSERT_EQ(tutel_wait(c, ticket, nullptr), TUTEL_OK) << tutel_last_error();
  }
  double want_norm = -1, norm = -2;
  ASSERT_EQ(tutel_grad_norm(layer, &want_norm), TUTEL_OK) << tutel_last_error();
  ASSERT_GT(want_norm, 0.0);

  // The region: x, y, dy, dx of each forward, one after the other.
  const size_t rows = static_cast<size_t>(tokens[0] + tokens[1]) * kDim;
  tutel_region* region = nullptr;
  ASSERT_EQ(tutel_region_map(c, 0, 4 * rows * 4, &region), TUTEL_OK) << tutel_last_error();
  void* data = nullptr;
  ASSERT_EQ(tutel_region_info(region, &data, nullptr, nullptr, nullptr), TUTEL_OK);
  float* at = static_cast<float*>(data);
  float *rx[2], *ry[2], *rdy[2], *rdx[2];
  for (int i = 0; i < 2; ++i) {
    const size_t n = x[i].size();
    rx[i] = at, ry[i] = at + n, rdy[i] = at + 2 * n, rdx[i] = at + 3 * n;
    at += 4 * n;
    std::memcpy(rx[i], x[i].data(), n * 4);
    std::memcpy(rdy[i], dy[i].data(), n * 4);
  }
  ASSERT_EQ(tutel_zero_grad(layer), TUTEL_OK) << tutel_last_error();
  tutel_ticket forwards[2]{};
  for (int i = 0; i < 2; ++i)
    ASSERT_EQ(tutel_submit_forward_device(layer, rx[i], tokens[i], ry[i], 1, &forwards[i]), TUTEL_OK)
        << tutel_last_error();
  tutel_forward_info got{};
  for (int i = 1; i >= 0; --i) {
    ASSERT_EQ(tutel_wait(c, forwards[i], &got), TUTEL_OK) << tutel_last_error();
    EXPECT_EQ(got.sequence, forwards[i].sequence);
    EXPECT_EQ(got.l_aux, info[i].l_aux);
    EXPECT_EQ(got.capacity, info[i].capacity);
    EXPECT_EQ(std::memcmp(ry[i], want_y[i].data(), want_y[i].size() * 4), 0) << "forward " << i;
  }
  EXPECT_EQ(tutel_submit_backward_device(layer, forwards[1].sequence, rdy[1], 0.5f, rdx[1], 4u, &ticket),
            TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tutel_last_error()).find("unknown flags 4"), std::string::npos) << tutel_last_error();
  EXPECT_EQ(tutel_submit_backward_device(layer, forwards[1].sequence, rdy[1], 0.5f, rdx[1], 0, nullptr),
            TUTEL_E_INVALID_ARGUMENT);
  tutel_ticket backwards[2]{};
  for (int i = 1; i >= 0; --i)
    ASSERT_EQ(tutel_submit_backward_device(layer, forwards[i].sequence, rdy[i], 0.5f, rdx[i], 0, &backwards[i]),
              TUTEL_OK)
        << tutel_last_error();
  for (int i = 1; i >= 0; --i) {
    ASSERT_EQ(tutel_wait(c, backwards[i], nullptr), TUTEL_OK) << tutel_last_error();
    EXPECT_EQ(std::memcmp(rdx[i], want_dx[i].data(), want_dx[i].size() * 4), 0) << "backward " << i;
  }
  ASSERT_EQ(tutel_grad_norm(layer, &norm), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(norm, want_norm);

  // The synchronous zero-copy forward gives its sequence too; a keyed one and one without noise
  // (the layer draws none) are training forwards backwarded by theirs; host buffers are refused.
  ASSERT_EQ(tutel_forward_device_with_info(layer, rx[0], tokens[0], ry[0], &got), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(got.l_aux, info[0].l_aux);
  EXPECT_EQ(std::memcmp(ry[0], want_y[0].data(), want_y[0].size() * 4), 0);
  const uint64_t synchronous = got.sequence;
  std::memset(ry[1], 0, want_y[1].size() * 4);
  ASSERT_EQ(tutel_submit_forward_device_keyed(layer, rx[1], tokens[1], ry[1], 1, 77, &forwards[1]), TUTEL_OK)
      << tutel_last_error();
  ASSERT_EQ(tutel_wait(c, forwards[1], &got), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(std::memcmp(ry[1], want_y[1].data(), want_y[1].size() * 4), 0);
  std::memset(ry[1], 0, want_y[1].size() * 4);
  ASSERT_EQ(tutel_submit_forward_device(layer, rx[1], tokens[1], ry[1], TUTEL_TRAINING_WITHOUT_NOISE, &forwards[0]),
            TUTEL_OK)
      << tutel_last_error();
  ASSERT_EQ(tutel_wait(c, forwards[0], &got), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(std::memcmp(ry[1], want_y[1].data(), want_y[1].size() * 4), 0);
  EXPECT_EQ(tutel_submit_forward_device_keyed(layer, rx[1], tokens[1], ry[1], TUTEL_TRAINING_WITHOUT_NOISE, 77,
                                              &ticket),
            TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tutel_last_error()).find("takes no key"), std::string::npos) << tutel_last_error();
  EXPECT_EQ(tutel_submit_forward_device(layer, rx[1], tokens[1], ry[1], 3, &ticket), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_submit_forward_device(layer, x[1].data(), tokens[1], want_y[1].data(), 1, &ticket),
            TUTEL_E_INVALID_ARGUMENT);
  for (const uint64_t sequence : {forwards[0].sequence, synchronous, forwards[1].sequence}) {
    const int i = sequence == synchronous ? 0 : 1;
    std::memset(rdx[i], 0, want_dx[i].size() * 4);
    ASSERT_EQ(tutel_submit_backward_device(layer, sequence, rdy[i], 0.5f, rdx[i], TUTEL_KEEP_PARAM_GRADS, &ticket),
              TUTEL_OK)
        << tutel_last_error();
    ASSERT_EQ(tutel_wait(c, ticket, nullptr), TUTEL_OK) << tutel_last_error();
    EXPECT_EQ(std::memcmp(rdx[i], want_dx[i].data(), want_dx[i].size() * 4), 0) << "sequence " << sequence;
  }
  ASSERT_EQ(tutel_grad_norm(layer, &norm), TUTEL_OK) << tutel_last_error();
  EXPECT_EQ(norm, want_norm) << "dx alone left the gradients as they were";
  // Oldest first with the rows checked: buffers sized for another forward are refused, nothing
  // written (the backward would have run over the region's next tensors).
  for (int i = 0; i < 2; ++i)
    ASSERT_EQ(tutel_forward_device(layer, rx[i], tokens[i], ry[i], nullptr), TUTEL_OK) << tutel_last_error();
  std::memset(rdx[1], 0, want_dx[1].size() * 4);
  EXPECT_EQ(tutel_backward_device_checked(layer, tokens[1], rdy[1], 0.5f, rdx[1], TUTEL_KEEP_PARAM_GRADS),
            TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tutel_last_error()).find("dy and dx hold 21 tokens, but the oldest"), std::string::npos)
      << tutel_last_error();
  EXPECT_EQ(std::count(rdx[1], rdx[1] + want_dx[1].size(), 0.f), static_cast<long>(want_dx[1].size()));
  EXPECT_EQ(tutel_backward_device_checked(layer, tokens[0], rdy[0], 0.5f, rdx[0], 8u), TUTEL_E_INVALID_ARGUMENT);
  for (int i = 0; i < 2; ++i) {
    std::memset(rdx[i], 0, want_dx[i].size() * 4);
    ASSERT_EQ(tutel_backward_device_checked(layer, tokens[i], rdy[i], 0.5f, rdx[i], TUTEL_KEEP_PARAM_GRADS),
              TUTEL_OK)
        << tutel_last_error();
    EXPECT_EQ(std::memcmp(rdx[i], want_dx[i].data(), want_dx[i].size() * 4), 0) << "checked backward " << i;
  }
  EXPECT_EQ(tutel_backward_device(layer, rdy[0], 0.f, rdx[0]), TUTEL_E_INVALID_ARGUMENT) << "none pending";
  EXPECT_EQ(tutel_region_unmap(region), TUTEL_OK) << tutel_last_error();
  tutel_layer_release(layer);
  tutel_close(c);
  EXPECT_EQ(s.daemon->stop(), 0) << s.daemon->log();
}

// A client killed with regions mapped and requests in flight: the daemon frees its regions
// (and their charge) when the session ends, and serves the next client.
TEST(DeviceRegion, AKilledClientsRegionsAreFreed) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    auto c = client::Client::connect(d.client_socket());
    if (!c.ok()) _exit(2);
    auto layer = c->create_layer(kSpec);
    if (!layer.ok()) _exit(3);
    std::vector<client::DeviceRegion> regions;
    for (int i = 0; i < 3; ++i) {
      auto r = c->map_device_region(0, 1 << 20);
      if (!r.ok()) _exit(4);
      regions.push_back(std::move(*r));
    }
    float* p = static_cast<float*>(regions[0].data());
    const int64_t tokens = 4096;
    for (int i = 0; i < 8; ++i)
      if (!layer->submit_forward_device(p, tokens, p + tokens * kDim).ok()) _exit(5);
    const char one = 1;
    (void)!::write(ready[1], &one, 1);
    for (;;) ::pause();  // killed here, with requests in flight and three regions mapped
  }
  ::close(ready[1]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the child client did not get as far as submitting";
  ::close(ready[0]);
  EXPECT_EQ(tenant_json(d)["region_bytes"].get<uint64_t>(), 3u << 20);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  for (int i = 0; i < 500 && tenant_json(d)["region_bytes"].get<uint64_t>() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(tenant_json(d)["region_bytes"].get<uint64_t>(), 0u);
  // The daemon goes on serving.
  auto c = client::Client::connect(d.client_socket());
  ASSERT_TRUE(c.ok()) << c.status();
  auto region = c->map_device_region(0, 4096);
  ASSERT_TRUE(region.ok()) << region.status();
  auto layer = c->attach_layer("zc");
  ASSERT_TRUE(layer.ok()) << layer.status();
  float* p = static_cast<float*>(region->data());
  ASSERT_TRUE(layer->infer_device(p, 8, p + 8 * kDim).ok());
  EXPECT_TRUE(d.alive());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// The wire, by hand: what no client library would send.
TEST(DeviceRegion, MalformedFramesAndDescriptorsAreRefusedAndTheSessionGoesOn) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  RawSession s(d.client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();

  // kMapRegion bodies: missing, mistyped, out of range.
  for (const nlohmann::json& body :
       {nlohmann::json::object(), nlohmann::json{{"rank", 0}}, nlohmann::json{{"bytes", 4096}},
        nlohmann::json{{"rank", "0"}, {"bytes", 4096}}, nlohmann::json{{"rank", 0}, {"bytes", -4}},
        nlohmann::json{{"rank", 0}, {"bytes", 0}}, nlohmann::json{{"rank", 0}, {"bytes", 4097}},
        nlohmann::json{{"rank", 0}, {"bytes", int64_t{1} << 50}}, nlohmann::json{{"rank", 7}, {"bytes", 4096}},
        nlohmann::json{{"rank", 0}, {"bytes", 1.5}}}) {
    auto r = s.call(ipc::FrameType::kMapRegion, body, ipc::FrameType::kOk);
    EXPECT_FALSE(r.ok()) << body.dump();
  }
  for (const nlohmann::json& body : {nlohmann::json::object(), nlohmann::json{{"region", 0}},
                                     nlohmann::json{{"region", 99}}, nlohmann::json{{"region", -1}},
                                     nlohmann::json{{"region", int64_t{1} << 40}}}) {
    auto r = s.call(ipc::FrameType::kUnmapRegion, body, ipc::FrameType::kOk);
    EXPECT_FALSE(r.ok()) << body.dump();
  }

  // A good region, mapped by hand.
  ASSERT_TRUE(s.send(ipc::FrameType::kMapRegion, {{"rank", 0}, {"bytes", 65536}}).ok());
  auto frame = s.receive();
  ASSERT_TRUE(frame.ok()) << frame.status();
  auto info = ipc::reply_body(*frame, ipc::FrameType::kOk);
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(frame->fds.size(), 1u);
  auto memory = SharedMemory::attach(std::move(frame->fds[0]), "the region", 65536);
  ASSERT_TRUE(memory.ok()) << memory.status();
  const uint32_t region = (*info)["region"].get<uint32_t>();
  EXPECT_EQ((*info)["kind"], "host_memfd");

  const uint64_t x_bytes = 8 * kDim * 4;
  ipc::RequestDescriptor good{};
  good.op = static_cast<uint32_t>(ipc::Op::kForward);
  good.flags = ipc::kFlagDeviceRegion;
  good.region = region;
  good.layer_handle = *handle;
  good.tokens = 8;
  good.input_offset = 0;
  good.input_bytes = x_bytes;
  good.output_offset = x_bytes;
  good.output_bytes = x_bytes;

  struct Case {
    const char* what;
    std::function<void(ipc::RequestDescriptor&)> spoil;
    StatusCode code;
  };
  const std::vector<Case> cases = {
      {"unknown region", [](auto& r) { r.region = 42; }, StatusCode::kNotFound},
      {"region 0", [](auto& r) { r.region = 0; }, StatusCode::kNotFound},
      {"input past the end", [](auto& r) { r.input_offset = 65536 - 64; }, StatusCode::kOutOfRange},
      {"output offset wraps", [](auto& r) { r.output_offset = ~uint64_t{0} - 3; }, StatusCode::kOutOfRange},
      {"misaligned", [](auto& r) { r.output_offset = x_bytes + 2; }, StatusCode::kInvalidArgument},
      {"overlap", [](auto& r) { r.output_offset = 64; }, StatusCode::kInvalidArgument},
      {"wrong size", [](auto& r) { r.input_bytes = 4; }, StatusCode::kInvalidArgument},
      {"unknown flag", [](auto& r) { r.flags |= 1u << 7; }, StatusCode::kInvalidArgument},
      {"checksum in a region", [](auto& r) { r.op = static_cast<uint32_t>(ipc::Op::kChecksum); },
       StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    ipc::RequestDescriptor bad = good;
    c.spoil(bad);
    auto done = s.submit(bad);
    ASSERT_TRUE(done.has_value()) << c.what;
    EXPECT_EQ(done->status_code, static_cast<int32_t>(c.code)) << c.what << ": " << done->message;
  }
  // The session goes on: the good request runs in place.
  std::mt19937 rng(std::random_device{}());
  const std::vector<float> x = randn(8 * kDim, rng);
  std::memcpy(memory->data(), x.data(), x_bytes);
  auto done = s.submit(good);
  ASSERT_TRUE(done.has_value());
  EXPECT_EQ(done->status_code, 0) << done->message;
  std::vector<float> zero(8 * kDim, 0.f);
  EXPECT_NE(std::memcmp(memory->data() + x_bytes, zero.data(), x_bytes), 0);  // y was written there

  // Unmapped, it is gone for requests too.
  ASSERT_TRUE(s.call(ipc::FrameType::kUnmapRegion, {{"region", region}}, ipc::FrameType::kOk).ok());
  done = s.submit(good);
  ASSERT_TRUE(done.has_value());
  EXPECT_EQ(done->status_code, static_cast<int32_t>(StatusCode::kNotFound)) << done->message;
  EXPECT_TRUE(d.alive());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

}  // namespace
}  // namespace tutel::testing
