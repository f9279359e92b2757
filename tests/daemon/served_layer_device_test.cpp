// The daemon's data path on a backend whose memory is not host memory: a ServedLayer fed from a
// session arena must stage every input into device memory and copy every output back, and must
// give, bit for bit, what the same layer gives on the CPU backend (which must keep working on the
// client's buffers in place). The device is simulated (simulated_device.hpp): no GPU needed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include "host_registration.hpp"
#include "served_layer.hpp"
#include "simulated_device.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/ipc/arena.hpp"
#include "tutel/kernels/cuda_devices.hpp"

namespace tutel::daemon {
namespace {

using testing::CopyRecord;
using testing::CountingCpu;
using testing::overlaps;
using testing::SimulatedDevice;

constexpr uint64_t kOwner = 1;

struct Case {
  std::string name;
  LayerSpec spec;
  OptimizerConfig optimizer;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<Case> cases() {
  std::vector<Case> out;
  {
    // Output width differs from the model width, so x/dx and y/dy buffers differ in size.
    LayerSpec s;
    s.experts = 4;
    s.model_dim = 32;
    s.hidden = 48;
    s.output_dim = 24;
    s.k = 2;
    s.capacity_factor = 1.0;
    s.activation = Activation::kGelu;
    s.gate_noise = 1.0;
    s.noise_seed = 5;
    OptimizerConfig o;
    o.kind = OptimizerKind::kAdamW;
    o.lr = 1e-2f;
    o.weight_decay = 0.01f;
    out.push_back({"GeluNoisyGateAdamW", s, o});
  }
  {
    LayerSpec s;
    s.experts = 4;
    s.model_dim = 24;
    s.hidden = 32;
    s.k = 1;
    s.capacity_factor = 0.0;  // dropless: capacity follows the routing
    s.batch_prioritized = true;
    s.is_postscore = false;
    s.has_fc1_bias = false;
    s.matmul_dtype = DType::kBF16;
    OptimizerConfig o;
    o.kind = OptimizerKind::kSgd;
    o.lr = 0.05f;
    o.momentum = 0.9f;
    o.nesterov = true;
    out.push_back({"DroplessPrescoreBf16SgdNesterov", s, o});
  }
  return out;
}

LayerDefinition definition(const Case& c) {
  LayerDefinition def;
  def.name = "moe";
  def.spec = c.spec;
  def.optimizer = c.optimizer;
  def.init_seed = 1234;
  return def;
}

std::unique_ptr<Backend> cpu_backend() {
  auto b = make_backend("cpu", BackendOptions{.threads = 2});
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(b).value();
}

std::vector<std::unique_ptr<Rank>> one_rank(std::unique_ptr<Backend> backend) {
  std::vector<std::unique_ptr<Rank>> ranks;
  ranks.push_back(std::make_unique<Rank>());
  ranks.back()->options = BackendOptions{.threads = 2};
  ranks.back()->backend = std::move(backend);
  return ranks;
}

// What a client buffer in the arena holds.
enum class Role { kInferenceX, kTrainingX, kY, kDy, kDx };

// The client's side of a session: an arena as the daemon makes one, carved into request buffers.
class ClientMemory {
 public:
  ClientMemory() {
    auto a = ipc::Arena::create(1 << 20);
    EXPECT_TRUE(a.ok()) << a.status();
    arena_ = std::move(a).value();
  }
  uint8_t* data() const { return arena_.data(); }
  size_t data_bytes() const { return arena_.layout().data_bytes; }

  float* take(int64_t floats, Role role) {
    const size_t bytes = static_cast<size_t>(floats) * 4;
    EXPECT_LE(used_ + bytes, data_bytes());
    float* p = reinterpret_cast<float*>(data() + used_);
    used_ += (bytes + 63) / 64 * 64;
    regions_.push_back({p, bytes, role});
    return p;
  }
  // The role of the buffer [p, p + bytes) lies in, or nullopt when it is not one buffer's.
  std::optional<Role> role_of(const void* p, size_t bytes) const {
    const auto a = reinterpret_cast<uintptr_t>(p);
    for (const Region& r : regions_) {
      const auto start = reinterpret_cast<uintptr_t>(r.data);
      if (a >= start && a + bytes <= start + r.bytes) return r.role;
    }
    return std::nullopt;
  }
  bool touches(const CopyRecord& c) const {
    return overlaps(c.dst, c.bytes, data(), data_bytes()) ||
           overlaps(c.src, c.bytes, data(), data_bytes());
  }

 private:
  struct Region {
    const void* data;
    size_t bytes;
    Role role;
  };
  ipc::Arena arena_;
  size_t used_ = 0;
  std::vector<Region> regions_;
};

// Everything a script run produced: the outputs in order, and the saved state after the run.
struct Trace {
  std::vector<std::vector<float>> outputs;
  std::map<std::string, std::vector<uint8_t>> state;
  int training_forwards = 0, inference_forwards = 0, backwards = 0;
};

// A client's training: forwards in flight with backwards in another order, inference between,
// steps. After each training forward the client reuses x's buffer (here: NaNs).
class Script {
 public:
  Script(ServedLayer& layer, ClientMemory& memory, Trace& trace)
      : layer_(layer), memory_(memory), trace_(trace), rng_(99) {}

  void forward(int64_t tokens, bool training, uint64_t sequence = 0) {
    const LayerSpec& s = layer_.definition().spec;
    float* x = memory_.take(tokens * s.model_dim, training ? Role::kTrainingX : Role::kInferenceX);
    float* y = memory_.take(tokens * s.out_dim(), Role::kY);
    fill(x, tokens * s.model_dim, 1.0);
    auto r = layer_.forward(x, tokens, y, training, kOwner, sequence);
    ASSERT_TRUE(r.ok()) << r.status();
    trace_.outputs.emplace_back(y, y + tokens * s.out_dim());
    if (training) {
      std::fill(x, x + tokens * s.model_dim, std::numeric_limits<float>::quiet_NaN());
      tokens_[sequence] = tokens;
      ++trace_.training_forwards;
    } else {
      ++trace_.inference_forwards;
    }
  }
  void backward(uint64_t sequence, float dl_aux) {
    const LayerSpec& s = layer_.definition().spec;
    const int64_t tokens = tokens_.at(sequence);
    float* dy = memory_.take(tokens * s.out_dim(), Role::kDy);
    float* dx = memory_.take(tokens * s.model_dim, Role::kDx);
    fill(dy, tokens * s.out_dim(), 0.1);
    const Status st = layer_.backward(dy, tokens, dl_aux, dx, kOwner, sequence);
    ASSERT_TRUE(st.ok()) << st;
    trace_.outputs.emplace_back(dx, dx + tokens * s.model_dim);
    ++trace_.backwards;
  }
  void step() {
    auto r = layer_.step();
    ASSERT_TRUE(r.ok()) << r.status();
  }
  void zero_grad() { ASSERT_TRUE(layer_.zero_grad().ok()); }
  void save(const std::string& path) {
    const Status st = layer_.save(path);
    ASSERT_TRUE(st.ok()) << st;
    auto file = SafetensorsFile::open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    for (const SafetensorsTensor& t : file->tensors()) {
      const auto* b = static_cast<const uint8_t*>(t.data);
      trace_.state[t.name].assign(b, b + t.nbytes);
    }
  }

 private:
  void fill(float* p, int64_t n, double scale) {
    std::normal_distribution<float> d(0.f, static_cast<float>(scale));
    for (int64_t i = 0; i < n; ++i) p[i] = d(rng_);
  }

  ServedLayer& layer_;
  ClientMemory& memory_;
  Trace& trace_;
  std::mt19937_64 rng_;
  std::map<uint64_t, int64_t> tokens_;
};

void run_training(ServedLayer& layer, ClientMemory& memory, const std::string& save_path,
                  Trace& trace) {
  Script s(layer, memory, trace);
  ASSERT_NO_FATAL_FAILURE(s.forward(20, /*training=*/false));
  // Three micro-batches in flight, of different sizes; their backwards come in another order.
  ASSERT_NO_FATAL_FAILURE(s.forward(16, true, 1));
  ASSERT_NO_FATAL_FAILURE(s.forward(24, true, 2));
  ASSERT_NO_FATAL_FAILURE(s.forward(20, true, 3));
  ASSERT_NO_FATAL_FAILURE(s.forward(12, false));  // inference while training forwards wait
  ASSERT_NO_FATAL_FAILURE(s.backward(2, 0.01f));
  ASSERT_NO_FATAL_FAILURE(s.backward(3, 0.f));
  ASSERT_NO_FATAL_FAILURE(s.backward(1, 0.02f));
  ASSERT_NO_FATAL_FAILURE(s.step());
  ASSERT_NO_FATAL_FAILURE(s.zero_grad());
  ASSERT_NO_FATAL_FAILURE(s.forward(24, true, 4));
  ASSERT_NO_FATAL_FAILURE(s.forward(8, true, 5));
  ASSERT_NO_FATAL_FAILURE(s.backward(5, 0.01f));
  ASSERT_NO_FATAL_FAILURE(s.backward(4, 0.01f));
  ASSERT_NO_FATAL_FAILURE(s.step());
  ASSERT_NO_FATAL_FAILURE(s.forward(20, false));
  ASSERT_NO_FATAL_FAILURE(s.save(save_path));
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same(const Trace& expected, const Trace& actual, const char* what) {
  ASSERT_EQ(expected.outputs.size(), actual.outputs.size()) << what;
  for (size_t i = 0; i < expected.outputs.size(); ++i)
    EXPECT_TRUE(same_bits(expected.outputs[i], actual.outputs[i]))
        << what << ": output " << i << " differs";
  ASSERT_EQ(expected.state.size(), actual.state.size()) << what;
  for (const auto& [name, bytes] : expected.state) {
    auto it = actual.state.find(name);
    ASSERT_NE(it, actual.state.end()) << what << ": no " << name;
    EXPECT_TRUE(bytes == it->second) << what << ": " << name << " differs after the steps";
  }
}

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "served_layer_device_test.XXXXXX").string();
    EXPECT_NE(::mkdtemp(pattern.data()), nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

class ServedLayerDeviceTest : public ::testing::TestWithParam<Case> {};

TEST_P(ServedLayerDeviceTest, StagesThroughDeviceMemoryAndMatchesCpuBitForBit) {
  const LayerDefinition def = definition(GetParam());
  TempDir dir;

  // The plain CPU backend: the reference.
  auto cpu_ranks = one_rank(cpu_backend());
  ClientMemory cpu_memory;
  Trace cpu_trace;
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *cpu_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(
        run_training(**layer, cpu_memory, dir.file("cpu.safetensors"), cpu_trace));
  }

  // The simulated device, with the arena registered as the daemon registers a session's.
  auto device_owner = std::make_unique<SimulatedDevice>(cpu_backend());
  SimulatedDevice& device = *device_owner;
  auto device_ranks = one_rank(std::move(device_owner));
  ClientMemory device_memory;
  Trace device_trace;
  HostRegistration pinned = HostRegistration::register_with(
      device_ranks, "tenant", device_memory.data(), device_memory.data_bytes(), "the test arena");
  EXPECT_EQ(pinned.registered_ranks(), 1u);
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *device_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(
        run_training(**layer, device_memory, dir.file("device.safetensors"), device_trace));
  }
  pinned.reset();
  for (const std::string& v : device.violations()) ADD_FAILURE() << "device misuse: " << v;
  EXPECT_TRUE(device.violations().empty());
  ASSERT_EQ(device.registrations().size(), 1u);
  EXPECT_EQ(device.registrations()[0].first, device_memory.data());
  EXPECT_EQ(device.registrations()[0].second, device_memory.data_bytes());
  EXPECT_TRUE(device.registered().empty()) << "the arena is still registered";

  expect_same(cpu_trace, device_trace, "simulated device vs cpu");

  // Every input crossed to the device once and every output came back once, all through the
  // registered arena.
  int h2d = 0, d2h = 0;
  for (const CopyRecord& c : device.copies()) {
    if (!device_memory.touches(c)) continue;
    EXPECT_TRUE(c.host_side_registered);
    if (c.kind == CopyKind::kHostToDevice) {
      ++h2d;
      const auto role = device_memory.role_of(c.src, c.bytes);
      EXPECT_TRUE(role == Role::kInferenceX || role == Role::kTrainingX || role == Role::kDy);
    } else {
      ASSERT_EQ(c.kind, CopyKind::kDeviceToHost);
      ++d2h;
      const auto role = device_memory.role_of(c.dst, c.bytes);
      EXPECT_TRUE(role == Role::kY || role == Role::kDx);
    }
  }
  const int forwards = device_trace.training_forwards + device_trace.inference_forwards;
  EXPECT_EQ(h2d, forwards + device_trace.backwards);
  EXPECT_EQ(d2h, forwards + device_trace.backwards);
}

TEST_P(ServedLayerDeviceTest, CpuBackendWorksOnTheClientBuffersInPlace) {
  const LayerDefinition def = definition(GetParam());
  TempDir dir;
  auto cpu_ranks = one_rank(cpu_backend());
  ClientMemory cpu_memory;
  Trace cpu_trace;
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *cpu_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(
        run_training(**layer, cpu_memory, dir.file("cpu.safetensors"), cpu_trace));
  }

  auto counting_owner = std::make_unique<CountingCpu>(cpu_backend());
  CountingCpu& counting = *counting_owner;
  auto counting_ranks = one_rank(std::move(counting_owner));
  ClientMemory memory;
  Trace trace;
  // Registering is a no-op that succeeds on the CPU backend.
  HostRegistration pinned =
      HostRegistration::register_with(
      counting_ranks, "tenant", memory.data(), memory.data_bytes(), "arena");
  EXPECT_EQ(pinned.registered_ranks(), 1u);
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *counting_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(run_training(**layer, memory, dir.file("counting.safetensors"), trace));
  }
  expect_same(cpu_trace, trace, "counting cpu vs cpu");

  // The only copy touching the client's buffers is a training forward's x, which its backward
  // needs after the client has reused the buffer. No staging of y, dy, dx or inference inputs.
  int x_copies = 0;
  for (const CopyRecord& c : counting.copies()) {
    if (!memory.touches(c)) continue;
    EXPECT_EQ(c.kind, CopyKind::kHostToDevice);
    EXPECT_TRUE(memory.role_of(c.src, c.bytes) == Role::kTrainingX)
        << "a copy of " << c.bytes << " bytes touches a client buffer that is not a training input";
    ++x_copies;
  }
  EXPECT_EQ(x_copies, trace.training_forwards);
}

INSTANTIATE_TEST_SUITE_P(Layers, ServedLayerDeviceTest, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// A bf16 layer keeps bf16 copies of its expert weights; they must follow the f32 weights through
// initialisation, every optimizer step and a load. The check: after each, the layer's inference
// equals, bit for bit, the kernels' layer_forward on the layer's saved f32 weights with the
// weights converted on the fly (no copies), which a stale copy could not match.
TEST(ServedLayerBf16, WeightCopiesFollowInitialisationStepsAndLoad) {
  const Case c = cases()[1];
  ASSERT_EQ(c.spec.matmul_dtype, DType::kBF16);
  const LayerDefinition def = definition(c);
  TempDir dir;
  auto ranks = one_rank(cpu_backend());
  auto created = ServedLayer::create(def, format_layer_spec(def), "tenant", *ranks[0]);
  ASSERT_TRUE(created.ok()) << created.status();
  ServedLayer& layer = **created;
  const size_t f32 = dtype_size(DType::kF32);
  const int64_t S = 32, M = c.spec.model_dim, O = c.spec.out_dim();
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<float> x(S * M), dy(S * O), dx(S * M), y(S * O);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);

  auto backend = cpu_backend();
  auto expect_matches_on_the_fly = [&](const char* when) {
    const std::string path = dir.file(std::string(when) + ".safetensors");
    ASSERT_TRUE(layer.save(path).ok());
    auto file = SafetensorsFile::open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    auto view = [&](const char* name) {
      const SafetensorsTensor* t = file->find(name);
      return t ? TensorView(const_cast<void*>(t->data), DType::kF32, t->shape) : TensorView();
    };
    LayerWeights w;  // f32 only: converted on the fly
    w.gate_weight = view(kGateWeightName);
    w.experts = {view(kFc1WeightName), view(kFc1BiasName), view(kFc2WeightName), view(kFc2BiasName)};
    ASSERT_FALSE(w.experts.has_bf16_copies());
    std::vector<float> want(S * O);
    LayerWorkspace ws;
    ASSERT_TRUE(layer_forward(*backend, c.spec, w, TensorView(x.data(), DType::kF32, {S, M}), 0, false, ws,
                              TensorView(want.data(), DType::kF32, {S, O}), nullptr)
                    .ok());
    auto got = layer.forward(x.data(), S, y.data(), false, kOwner, 0);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(std::memcmp(y.data(), want.data(), y.size() * f32), 0) << when;
  };
  ASSERT_NO_FATAL_FAILURE(expect_matches_on_the_fly("initialised"));
  for (int step = 1; step <= 3; ++step) {
    ASSERT_TRUE(layer.forward(x.data(), S, y.data(), true, kOwner, step).ok());
    ASSERT_TRUE(layer.backward(dy.data(), S, 0.01f, dx.data(), kOwner, step).ok());
    ASSERT_TRUE(layer.step().ok());
    ASSERT_NO_FATAL_FAILURE(expect_matches_on_the_fly(("step" + std::to_string(step)).c_str()));
  }
  // Loading the initial weights back rewrites the copies too.
  ASSERT_TRUE(layer.load(dir.file("initialised.safetensors")).ok());
  ASSERT_NO_FATAL_FAILURE(expect_matches_on_the_fly("loaded"));
  // The copies are parameters: charged as half the expert weights' f32 bytes.
  const int64_t E = c.spec.experts, H = c.spec.hidden;
  const uint64_t copies = static_cast<uint64_t>(E * H * M + E * H * O) * 2;
  const uint64_t f32_params =
      static_cast<uint64_t>(E * M + E * H * M + E * H * O + (c.spec.has_fc1_bias ? E * H : 0) +
                            (c.spec.has_fc2_bias ? E * O : 0)) *
      4;
  const uint64_t per_param = 2 + 1;  // value and grad, SGD momentum
  const uint64_t norm_sum = 4;       // grad_norm's one f32
  EXPECT_EQ(layer.memory_bytes(), f32_params * per_param + copies + norm_sum);
}

// Once the layer has seen its largest batch, requests allocate nothing on the device: the
// staging buffers and the per-forward entries are reused.
TEST(ServedLayerDevice, AllocatesNothingOnceWarm) {
  const LayerDefinition def = definition(cases()[0]);
  auto device_owner = std::make_unique<SimulatedDevice>(cpu_backend());
  SimulatedDevice& device = *device_owner;
  auto ranks = one_rank(std::move(device_owner));
  ClientMemory memory;
  Trace trace;
  auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *ranks[0]);
  ASSERT_TRUE(layer.ok()) << layer.status();
  auto round = [&](uint64_t first_sequence) {
    Script s(**layer, memory, trace);
    for (uint64_t q = 0; q < 3; ++q)
      ASSERT_NO_FATAL_FAILURE(s.forward(24, true, first_sequence + q));
    ASSERT_NO_FATAL_FAILURE(s.forward(24, false));
    ASSERT_NO_FATAL_FAILURE(s.backward(first_sequence + 1, 0.f));
    ASSERT_NO_FATAL_FAILURE(s.backward(first_sequence, 0.f));
    ASSERT_NO_FATAL_FAILURE(s.backward(first_sequence + 2, 0.f));
    ASSERT_NO_FATAL_FAILURE(s.step());
  };
  ASSERT_NO_FATAL_FAILURE(round(10));
  const int64_t warm = device.allocations();
  ASSERT_NO_FATAL_FAILURE(round(20));
  EXPECT_EQ(device.allocations(), warm) << "a warm layer allocated device memory for a request";
  EXPECT_TRUE(device.violations().empty());
}

// Training forwards waiting for their backwards are bounded per layer, empty batches too (their
// entries hold nothing the quota counts: two million once took a gigabyte): past the bound a
// training forward is refused saying what to do, inferences go on, and a backward or a discard
// makes room again.
TEST(ServedLayerPending, TrainingForwardsWaitingForBackwardsAreBounded) {
  LayerDefinition def = definition(cases()[0]);
  auto ranks = one_rank(cpu_backend());
  auto created = ServedLayer::create(def, format_layer_spec(def), "tenant", *ranks[0]);
  ASSERT_TRUE(created.ok()) << created.status();
  ServedLayer& layer = **created;
  const size_t limit = ServedLayer::kMaxPendingForwards;
  for (uint64_t seq = 0; seq < limit; ++seq) {
    // Two owners (sessions) share the bound.
    const Result<ForwardResult> r = layer.forward(nullptr, 0, nullptr, true, 1 + seq % 2, seq);
    ASSERT_TRUE(r.ok()) << seq << ": " << r.status();
  }
  const Result<ForwardResult> refused = layer.forward(nullptr, 0, nullptr, true, 3, 0);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("backward or discard some first"), std::string_view::npos)
      << refused.status();
  const int64_t M = def.spec.model_dim, O = def.spec.out_dim();
  std::vector<float> x(4 * M, 0.5f), y(4 * O);
  EXPECT_TRUE(layer.forward(x.data(), 4, y.data(), false, 3, 0).ok()) << "an inference keeps nothing";
  ASSERT_TRUE(layer.discard(1, 0).ok());
  ASSERT_TRUE(layer.backward(nullptr, 0, 0.f, nullptr, 2, 1).ok());
  EXPECT_TRUE(layer.forward(nullptr, 0, nullptr, true, 3, 0).ok());
  EXPECT_TRUE(layer.forward(nullptr, 0, nullptr, true, 3, 1).ok());
  EXPECT_FALSE(layer.forward(nullptr, 0, nullptr, true, 3, 2).ok());
}

// A layer's token_buckets are built when it is created, inference and training plans alike, and
// serve its requests without building more; past the last bucket the buckets double. A tenant
// whose quota cannot hold them gets the layer refused with what to do.
TEST(ServedLayerPlans, ConfiguredBucketsArePrebuiltAndServeRequests) {
  LayerDefinition def = definition(cases()[0]);
  def.token_buckets = {16, 48};
  auto ranks = one_rank(cpu_backend());
  auto created = ServedLayer::create(def, format_layer_spec(def), "tenant", *ranks[0]);
  ASSERT_TRUE(created.ok()) << created.status();
  ServedLayer& layer = **created;
  ServedLayer::PlanSummary plans = layer.plan_summary();
  EXPECT_EQ(plans.kind, "host");
  EXPECT_EQ(plans.cache.builds, 4u);  // 2 buckets x (inference, training)
  EXPECT_EQ(plans.cache.plans, 4u);
  EXPECT_EQ(plans.cache.misses, 0u);
  EXPECT_GT(layer.activation_bytes(), 0u);

  const int64_t M = def.spec.model_dim, O = def.spec.out_dim();
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  auto batch = [&](int64_t tokens) {
    std::vector<float> v(tokens * std::max(M, O));
    for (float& f : v) f = normal(rng);
    return v;
  };
  std::vector<float> x = batch(40), y = batch(40);
  ASSERT_TRUE(layer.forward(x.data(), 40, y.data(), false, 1, 0).ok());
  std::vector<float> xt = batch(10), yt = batch(10), dy = batch(10), dx = batch(10);
  ASSERT_TRUE(layer.forward(xt.data(), 10, yt.data(), true, 1, 7).ok());
  EXPECT_EQ(layer.plan_summary().cache.held, 1u);
  ASSERT_TRUE(layer.backward(dy.data(), 10, 0.f, dx.data(), 1, 7).ok());
  plans = layer.plan_summary();
  EXPECT_EQ(plans.cache.hits, 2u);
  EXPECT_EQ(plans.cache.misses, 0u);
  EXPECT_EQ(plans.cache.builds, 4u);
  EXPECT_EQ(plans.cache.held, 0u);

  std::vector<float> xb = batch(90), yb = batch(90);
  ASSERT_TRUE(layer.forward(xb.data(), 90, yb.data(), false, 1, 0).ok());  // bucket 96
  plans = layer.plan_summary();
  EXPECT_EQ(plans.cache.misses, 1u);
  EXPECT_EQ(plans.cache.builds, 5u);

  // The same definition in a tenant with room for its parameters and little more: measured
  // beside the parameters (which the registry charges later), the plans do not fit.
  auto tight = std::make_shared<TenantMemory>("tight", layer.memory_bytes() + 4096);
  auto refused = ServedLayer::create(def, format_layer_spec(def), tight, *ranks[0]);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("building the plans of token_buckets"), std::string::npos)
      << refused.status();
  EXPECT_EQ(tight->activation_bytes(), 0u) << "a refused layer left memory charged";
  EXPECT_EQ(tight->parameter_bytes(), 0u) << "a refused layer left its parameters charged";
  // A tenant with room for the parameters and the plans creates it.
  auto roomy = std::make_shared<TenantMemory>("roomy", layer.memory_bytes() + layer.activation_bytes() + 4096);
  auto fits = ServedLayer::create(def, format_layer_spec(def), roomy, *ranks[0]);
  EXPECT_TRUE(fits.ok()) << fits.status();
}

// The simulated device is only worth its name if it catches the mistakes it exists for.
TEST(ServedLayerDevice, SimulatedDeviceRefusesHostPointersAndWrongCopyKinds) {
  SimulatedDevice device(cpu_backend());
  auto buf = device.allocate(64 * 4);
  ASSERT_TRUE(buf.ok());
  std::vector<float> host(64, 1.f);
  // A host view handed to a kernel op.
  EXPECT_FALSE(device.fill_zero(TensorView(host.data(), DType::kF32, {64}, device.device())).ok());
  EXPECT_EQ(device.violations().size(), 1u);
  // A device view that claims to be on the CPU.
  EXPECT_FALSE(device.fill_zero(TensorView(buf->data(), DType::kF32, {64}, Device{})).ok());
  EXPECT_EQ(device.violations().size(), 2u);
  // Copies whose kind does not match where the pointers are.
  EXPECT_FALSE(device.copy(buf->data(), host.data(), 256, CopyKind::kDeviceToHost).ok());
  EXPECT_FALSE(device.copy(host.data(), buf->data(), 256, CopyKind::kHostToDevice).ok());
  EXPECT_FALSE(device.copy(host.data(), host.data() + 32, 64, CopyKind::kDeviceToDevice).ok());
  // A view running past its allocation.
  EXPECT_FALSE(device.fill_zero(TensorView(buf->data(), DType::kF32, {128}, device.device())).ok());
  EXPECT_EQ(device.violations().size(), 6u);
  // And the right ones pass.
  EXPECT_TRUE(device.copy(buf->data(), host.data(), 256, CopyKind::kHostToDevice).ok());
  EXPECT_TRUE(device.fill_zero(TensorView(buf->data(), DType::kF32, {64}, device.device())).ok());
  EXPECT_TRUE(device.copy(host.data(), buf->data(), 256, CopyKind::kDeviceToHost).ok());
  EXPECT_EQ(host[0], 0.f);
  EXPECT_EQ(device.violations().size(), 6u);
}

// A session's arena is registered with every rank; a rank that refuses is skipped (copies still
// work), and only the ranks that accepted it are asked to unregister it.
TEST(ServedLayerDevice, ArenaRegistrationCoversEveryRankAndSurvivesARefusal) {
  std::vector<std::unique_ptr<Rank>> ranks;
  std::vector<SimulatedDevice*> devices;
  for (int r = 0; r < 3; ++r) {
    auto d = std::make_unique<SimulatedDevice>(cpu_backend());
    devices.push_back(d.get());
    ranks.push_back(std::make_unique<Rank>());
    ranks.back()->index = r;
    ranks.back()->backend = std::move(d);
  }
  devices[1]->fail_registration(true);
  auto arena = ipc::Arena::create(1 << 20);
  ASSERT_TRUE(arena.ok()) << arena.status();
  void* const data = arena->data();
  const size_t bytes = arena->layout().data_bytes;

  HostRegistration pinned =
      HostRegistration::register_with(
      ranks, "tenant", data, bytes, "session 1's arena");
  EXPECT_EQ(pinned.registered_ranks(), 2u);
  for (int r : {0, 2}) {
    ASSERT_EQ(devices[r]->registered().size(), 1u) << "rank " << r;
    EXPECT_EQ(devices[r]->registered().begin()->first, reinterpret_cast<uintptr_t>(data));
    EXPECT_EQ(devices[r]->registered().begin()->second, bytes);
  }
  EXPECT_TRUE(devices[1]->registered().empty());

  HostRegistration moved = std::move(pinned);
  EXPECT_EQ(pinned.registered_ranks(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
  pinned.reset();                            // nothing to undo
  for (SimulatedDevice* d : {devices[0], devices[2]}) EXPECT_EQ(d->registered().size(), 1u);
  moved.reset();
  for (SimulatedDevice* d : devices) {
    EXPECT_TRUE(d->registered().empty());
    EXPECT_TRUE(d->violations().empty());
  }
}

// On a real GPU (skipped elsewhere): the same script from a page-locked arena. The kernels differ
// from the CPU's, so outputs before the first step are compared with cuda_layer_parity_test's
// f32 gradient tolerance (|got − want| <= 1e-4·max|want| + 1e-3·|want|); after the steps, only
// that every request succeeds and every output is finite (AdamW magnifies rounding in near-zero
// gradients).
TEST(ServedLayerOnCuda, ArenaStagedRunMatchesCpu) {
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device here; run served_layer_device_test on a GPU machine";
  const LayerDefinition def = definition(cases()[0]);
  TempDir dir;
  auto cpu_ranks = one_rank(cpu_backend());
  ClientMemory cpu_memory;
  Trace cpu_trace;
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *cpu_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(
        run_training(**layer, cpu_memory, dir.file("cpu.safetensors"), cpu_trace));
  }
  auto gpu = make_backend("cuda", {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto gpu_ranks = one_rank(std::move(gpu).value());
  ClientMemory gpu_memory;
  Trace gpu_trace;
  HostRegistration pinned = HostRegistration::register_with(
      gpu_ranks, "tenant", gpu_memory.data(), gpu_memory.data_bytes(), "the test arena");
  EXPECT_EQ(pinned.registered_ranks(), 1u) << "the memfd arena could not be page-locked";
  {
    auto layer = ServedLayer::create(def, format_layer_spec(def), "tenant", *gpu_ranks[0]);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_NO_FATAL_FAILURE(
        run_training(**layer, gpu_memory, dir.file("gpu.safetensors"), gpu_trace));
  }
  pinned.reset();
  ASSERT_EQ(cpu_trace.outputs.size(), gpu_trace.outputs.size());
  // Outputs 0..7: the forwards and backwards before the first step (see run_training).
  for (size_t i = 0; i < gpu_trace.outputs.size(); ++i) {
    const std::vector<float>& want = cpu_trace.outputs[i];
    const std::vector<float>& got = gpu_trace.outputs[i];
    ASSERT_EQ(want.size(), got.size());
    float max_abs = 0.f;
    for (float w : want) max_abs = std::max(max_abs, std::abs(w));
    int bad = 0;
    for (size_t j = 0; j < got.size(); ++j) {
      if (!std::isfinite(got[j]))
        ++bad;
      else if (i < 8 && std::abs(got[j] - want[j]) > 1e-4f * max_abs + 1e-3f * std::abs(want[j]))
        ++bad;
    }
    EXPECT_EQ(bad, 0) << "output " << i << ": " << bad << " of " << got.size() << " values off";
  }
}

}  // namespace
}  // namespace tutel::daemon
