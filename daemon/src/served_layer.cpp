#include "served_layer.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "tutel/comm/nccl.hpp"
#include "tutel/core/fingerprint.hpp"
#include "tutel/comm/ucx.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/core/shared_memory.hpp"
#include "tutel/kernels/layer_file.hpp"
#include "tuning_record.hpp"

namespace tutel::daemon {
namespace {

constexpr const char* kStepKey = "tuteld.step";
constexpr const char* kSpecKey = "tuteld.spec";
constexpr const char* kTenantKey = "tuteld.tenant";
constexpr const char* kOriginKey = "tuteld.origin";  // "config" or "client"
constexpr const char* kOptimizerKey = "tuteld.optimizer";  // "sgd" or "adamw": whose state it holds
const std::string kState0Prefix(kOptimizerStatePrefixes[0]);  // SGD momentum, AdamW exp_avg
const std::string kState1Prefix(kOptimizerStatePrefixes[1]);  // AdamW exp_avg_sq

// A file's step count (metadata kStepKey), 0 without one.
Result<int64_t> step_of(const SafetensorsFile& file) {
  int64_t step = 0;
  if (auto it = file.metadata().find(kStepKey); it != file.metadata().end()) {
    const std::string& text = it->second;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), step);
    // Below 2^53: more steps than any training takes, so counting on never overflows.
    if (ec != std::errc() || end != text.data() + text.size() || step < 0 || step >= (int64_t{1} << 53))
      return Status::Corruption(file.path() + ": metadata '" + kStepKey + "' is not a step count: " + quote_text(text, '\'', 40));
  }
  return step;
}

// The name of the optimizer whose state a file holds: its kOptimizerKey (any name: a later
// build's optimizer is another one), else its spec's (files written before the key); nullopt
// where neither says (a Tutel checkpoint).
std::optional<std::string> optimizer_of(const SafetensorsFile& file) {
  const auto& m = file.metadata();
  if (auto it = m.find(kOptimizerKey); it != m.end()) return it->second;
  if (auto it = m.find(kSpecKey); it != m.end())
    if (Result<LayerDefinition> def = parse_layer_spec(it->second, file.path()); def.ok())
      return std::string(optimizer_kind_name(def->optimizer.kind));
  return std::nullopt;
}

// Pending entries kept for reuse; more in flight than this allocate afresh.
constexpr size_t kMaxRecycled = 8;

TensorView bytes_view(const DeviceBuffer& b, Device d) {
  return TensorView(b.data(), DType::kU8, {static_cast<int64_t>(b.bytes())}, d);
}

// Grows `buf` to hold `bytes`; contents are not kept. Allocates only when it grows.
Status grow(Backend& b, DeviceBuffer& buf, size_t bytes) {
  if (buf.data() && buf.bytes() >= bytes) return Status::OK();
  buf.reset();
  TUTEL_ASSIGN_OR_RETURN(buf, b.allocate(bytes));
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<ServedLayer>> ServedLayer::create(const LayerDefinition& def, std::string spec_text,
                                                         std::shared_ptr<TenantMemory> memory, Rank& rank) {
  TUTEL_RETURN_IF_ERROR(def.spec.validate());
  std::unique_ptr<ServedLayer> layer(new ServedLayer(def, std::move(spec_text), std::move(memory), rank));
  std::lock_guard lock(layer->mutex_);
  if (def.group) {
    TUTEL_RETURN_IF_ERROR(layer->join_group().with_context("layer '" + def.name + "'"));
    // From here a rank that fails alone would leave the others with a layer whose first step
    // waits for it until the collective timeout: every rank's outcome is agreed first.
    // A rank out of service joins only to refuse with the others.
    Status ready = rank.health.check();
    if (ready.ok()) ready = layer->allocate();
    if (ready.ok())
      ready = def.weights_path ? layer->load_locked(*def.weights_path)
                               : layer->initialise(def.init_seed.value_or(0));
    ready = layer->watch_device(std::move(ready));
    TUTEL_RETURN_IF_ERROR(layer->confirm_group(ready).with_context("layer '" + def.name + "'"));
    return layer;
  }
  TUTEL_RETURN_IF_ERROR(rank.health.check());
  layer->local_activations_ = std::make_unique<ActivationBackend>(*rank.backend, layer->memory_);
  if (Status built = layer->build_local(); !built.ok()) {
    auto device_lock = layer->lock_device();
    return layer->watch_device(std::move(built));
  }
  return layer;
}

// create() of a layer without [group], past the checks: its parameters, plans and values.
Status ServedLayer::build_local() {
  TUTEL_RETURN_IF_ERROR(allocate());
  // The tenant's quota bounds the plans, not a budget of the cache's own: they are charged to
  // it like any activation memory, a forward that would pass it drops the idle ones first, and
  // so does any request that leaves the tenant over it (a backward's growth is let through).
  graphs::PlanCacheOptions options;
  options.max_bytes = SIZE_MAX;
  if (!def_.token_buckets.empty()) {
    TUTEL_ASSIGN_OR_RETURN(options.buckets.tokens, graphs::BucketPolicy::from_list(def_.token_buckets));
  }
  plans_ = std::make_unique<graphs::PlanCache>(*local_activations_, options);
  // No "layer 0" in its errors: forward() names the layer in its refusals.
  TUTEL_RETURN_IF_ERROR(plans_->add_layer(0, {def_.spec, weights_of(0), weights_of(1), ""}));
  plan_kind_ = graphs::resolve_plan_kind(*local_activations_, options.kind);
  if (!def_.token_buckets.empty()) TUTEL_RETURN_IF_ERROR(prebuild_plans());
  publish_plan_summary();
  if (def_.weights_path)
    return load_locked(*def_.weights_path).with_context("layer '" + def_.name + "'");
  return initialise(def_.init_seed.value_or(0));
}

Status ServedLayer::confirm_group(const Status& ready_here) {
  comm::Communicator& comm = *group_->host_comm;
  const int W = comm.size();
  Fingerprint fingerprint;  // the gate's bits and the optimizer's settings
  Status ready = ready_here;
  if (ready.ok()) {
    const Tensor& gate = tensors_.front();  // kGateWeightName, allocated first
    std::vector<float> values(static_cast<size_t>(gate.shape.numel()));
    ready = backend().copy(values.data(), gate.value.data(), values.size() * 4, CopyKind::kDeviceToHost);
    fingerprint.add_bytes(values.data(), values.size() * 4);
    const OptimizerConfig& o = def_.optimizer;
    for (float f : {o.lr, o.momentum, o.weight_decay, o.eps}) fingerprint.add(f);
    fingerprint.add(o.beta1).add(o.beta2);
    fingerprint.add(o.kind).add(o.nesterov);
  }
  const uint64_t mine[2] = {ready.ok() ? 1u : 0u, ready.ok() ? fingerprint.value() : 0u};
  std::vector<uint64_t> all(2 * static_cast<size_t>(W));
  TUTEL_RETURN_IF_ERROR(comm.all_gather(mine, all.data(), sizeof mine));
  if (!ready.ok()) return ready;
  auto join = [](std::string& list, int r) { list += (list.empty() ? "" : ", ") + std::to_string(r); };
  std::string failed, differs;
  for (int r = 0; r < W; ++r)
    if (all[2 * r] == 0) join(failed, r);
  if (!failed.empty())
    return Status::Aborted("no rank of this expert-parallel group creates the layer: rank(s) " + failed +
                           " could not allocate or load their part (their own errors say why)");
  for (int r = 1; r < W; ++r)
    if (all[2 * r + 1] != all[1]) join(differs, r);
  if (differs.empty()) return Status::OK();
  return Status::InvalidArgument(
      "no rank of this expert-parallel group creates the layer: compared with rank 0, rank(s) " + differs +
      " hold another gate (a weights file or init_seed of their own) or another optimizer; every rank routes "
      "with the replicated gate and steps it alike, so all must start from the same one");
}

Status ServedLayer::join_group() {
  const GroupConfig& g = *def_.group;
  // The group's own backend, of the rank's kind on the rank's device: on a GPU rank the
  // collectives run over NCCL on its stream, set up through the UCX group below.
  const bool on_gpu = rank_.backend->device().kind == DeviceKind::kCuda;
  auto group = std::make_unique<Group>();
  TUTEL_ASSIGN_OR_RETURN(group->backend, make_backend(rank_.backend->name(), rank_.options));
  group->activations = std::make_unique<ActivationBackend>(*group->backend, memory_);
  comm::BootstrapOptions o;
  o.coordinator_host = g.coordinator_host;
  o.coordinator_port = g.coordinator_port;
  // Ranks of another tenant's group given the same address are refused by name.
  o.group_name = tenant_ + "/" + g.name;
  if (g.coordinator_port == 0) {
    // No coordinator of its own: the group meets by name at node 0's rendezvous service.
    const GroupRendezvous* rv = rank_.rendezvous.get();
    if (rv == nullptr)
      return Status::InvalidArgument(
          "group '" + g.name + "' has no coordinator, and this daemon is not part of a cluster (no [cluster] "
          "in its config): give the group a coordinator = \"<IPv4>:<port>\", or run the daemons as a cluster");
    if (rv->node0_status) TUTEL_RETURN_IF_ERROR(rv->node0_status());
    o.coordinator_host = rv->host;
    o.coordinator_port = rv->port;
    o.rendezvous_group = tenant_ + "/" + g.name;
    o.rendezvous_owner = "node 0's daemon";
  }
  o.rank = g.rank;
  o.size = g.size;
  o.local_size = g.local_size;
  o.timeout = g.bootstrap_timeout;
  o.collective_timeout = g.collective_timeout;
  o.local_exchange = rank_.local_exchange;
  o.cancel = rank_.stopping;
  o.abandon = rank_.abandon_collectives;
  if (rank_.peer_secret) o.secret = *rank_.peer_secret;
  Result<std::unique_ptr<comm::Communicator>> host_comm = comm::ucx_bootstrap(o);
  if (!host_comm.ok() && rank_.stopping && rank_.stopping->load())
    return host_comm.status().with_context("tuteld is shutting down");
  TUTEL_ASSIGN_OR_RETURN(group->host_comm, std::move(host_comm));
  graphs::ExpertParallelOptions options;
  options.algo = g.all_to_all.value_or(comm::AllToAllAlgo::kLinear);
  options.pipeline = g.pipeline.value_or(1);
  options.r = g.r.value_or(1);
  if (on_gpu) {
    comm::NcclOptions nccl;
    nccl.device = rank_.options.device_index;
    nccl.stream = group->backend->native_stream();
    // The collectives only enqueue on the backend's stream, so that the layer's phases run as
    // CUDA graphs with the NCCL calls inside; the layer waits for them (wait_enqueued, bounded by
    // the collective timeout) where the host needs a result.
    nccl.synchronize = false;
    nccl.abandon = rank_.abandon_collectives;
    // Rank 0's unique id travels over the UCX group, which then keeps watching the peers.
    Result<std::unique_ptr<comm::Communicator>> device_comm =
        comm::nccl_from_host(*group->host_comm, nccl, g.collective_timeout);
    // A rank whose NCCL set-up failed (rank 0's unique id, its CUDA init) tells its peers over the
    // UCX group, which they may be waiting in (the id's all-gather): they fail at once instead of
    // at their timeout. (Peers already inside NCCL's own init still wait for theirs.)
    if (!device_comm.ok()) group->host_comm->give_up(device_comm.status());
    TUTEL_ASSIGN_OR_RETURN(group->device_comm, std::move(device_comm));
    group->runner = graphs::make_phase_runner(*group->backend);
    options.runner = group->runner.get();
    options.comm_on_backend_queue = true;
  }
  if (!g.r || !g.all_to_all || !g.pipeline) {
    // "auto": measured per capacity bucket; d > 1 only where chunks overlap the GEMMs.
    // Where W > E, every divisor of the s = W / E ranks per expert is a parallelism r.
    const Result<graphs::ExpertShard> shard = graphs::expert_shard(def_.spec, g.size, g.rank);
    const int shards = shard.ok() ? static_cast<int>(shard->shards) : 1;
    options.tune.candidates = graphs::auto_candidates(
        g.r, g.all_to_all, g.pipeline, g.size, g.local_size,
        graphs::ExpertParallelLayer::chunks_overlap(*group->activations, options), shards);
    options.tune.warmups = g.tune_warmups;
    options.tune.trials = g.tune_trials;
    if (!def_.resumed_tuning.empty() && options.tune.candidates.size() >= 2)
      options.tune.decided = restored_decisions(tuning_context(*group->backend), options.tune.candidates);
  }
  // Its saved state and workspaces are allocated through `activations`, and so charged.
  TUTEL_ASSIGN_OR_RETURN(graphs::ExpertParallelLayer ep,
                         graphs::ExpertParallelLayer::create(*group->activations, group->comm(), def_.spec, options));
  if (const Status& restored = ep.restored_tuning(); !restored.ok())
    TUTEL_LOG(WARN) << "group layer " << tenant_ << "/" << def_.name << ": its checkpoint's tuner decisions are "
                    << "not restored: " << restored.message();
  else if (!options.tune.decided.empty())
    TUTEL_LOG(INFO) << "group layer " << tenant_ << "/" << def_.name << " restored " << options.tune.decided.size()
                    << " tuner decision(s) from its checkpoint; the other capacity buckets are measured as they come";
  group->layer.emplace(std::move(ep));
  group_ = std::move(group);
  return Status::OK();
}

std::string ServedLayer::tuning_context(const Backend& backend) const {
  const GroupConfig& g = *def_.group;
  return backend.describe() + "; " + std::to_string(g.size) + " ranks, " + std::to_string(g.local_size) + " per node";
}

std::vector<graphs::TunerDecision> ServedLayer::restored_decisions(
    const std::string& measured_on, const std::vector<graphs::ExchangeConfig>& candidates) const {
  // Never an error: what cannot be restored is measured again.
  const std::string& path = def_.weights_path.value_or("the checkpoint");
  Result<std::vector<graphs::TunerDecision>> decided = [&]() -> Result<std::vector<graphs::TunerDecision>> {
    TUTEL_ASSIGN_OR_RETURN(const TuningRecord record, parse_tuning_record(def_.resumed_tuning, path));
    return restorable_decisions(record, measured_on, candidates);
  }();
  if (decided.ok()) return std::move(decided).value();
  TUTEL_LOG(WARN) << "group layer " << tenant_ << "/" << def_.name << ": the tuner decisions in " << path
                  << " are not restored (" << decided.status().message() << "); its capacity buckets are measured again";
  return {};
}

Shape ServedLayer::shape_of(const std::string& name) const {
  const LayerSpec& s = def_.spec;
  const int64_t E = s.experts, M = s.model_dim, H = s.hidden, O = s.out_dim();
  if (name == kGateWeightName) return {E, M};
  if (!group_) {
    if (name == kFc1WeightName) return {E, H, M};
    if (name == kFc1BiasName) return {E, H};
    if (name == kFc2WeightName) return {E, H, O};
    return {E, O};
  }
  const graphs::ExpertShard& shard = group_->layer->shard();
  if (name == kFc1WeightName) return graphs::local_fc1_shape(s, shard);
  if (name == kFc1BiasName) return graphs::local_fc1_bias_shape(s, shard);
  if (name == kFc2WeightName) return graphs::local_fc2_shape(s, shard);
  return graphs::local_fc2_bias_shape(s, shard);
}

Status ServedLayer::allocate() {
  const LayerSpec& s = def_.spec;
  for (const char* name : {kGateWeightName, kFc1WeightName, kFc1BiasName, kFc2WeightName, kFc2BiasName}) {
    if ((name == kFc1BiasName && !s.has_fc1_bias) || (name == kFc2BiasName && !s.has_fc2_bias)) continue;
    tensors_.push_back({name, shape_of(name), {}, {}, {}, {}, {}});
  }
  const bool adam = def_.optimizer.kind == OptimizerKind::kAdamW;
  const bool momentum = def_.optimizer.kind == OptimizerKind::kSgd && def_.optimizer.momentum != 0.f;
  // What the loop below will allocate (value, gradient, optimizer state, bf16 copy), charged to
  // the tenant before any of it is allocated: a spec may ask for terabytes, and two creations at
  // once must not both pass the quota and then allocate together.
  uint64_t planned = 0;
  for (const Tensor& t : tensors_) {
    const uint64_t bytes = static_cast<uint64_t>(t.shape.numel()) * 4;
    planned += bytes * (2 + (adam || momentum ? 1 : 0) + (adam ? 1 : 0)) +
               (keeps_bf16_copy(t) ? bytes / 2 : 0);
  }
  const uint64_t gate_bytes = static_cast<uint64_t>(tensors_.front().shape.numel()) * 4;  // the gate, first
  planned += group_ ? gate_bytes : sizeof(float);  // summed_gate_grad_ or grad_norm_sum_
  TUTEL_ASSIGN_OR_RETURN(parameter_charge_, ParameterCharge::take(memory_, planned, "layer '" + def_.name + "'"));
  Backend& b = backend();
  auto device_lock = lock_device();
  return on_rank([&]() -> Status {
    if (group_) {
      TUTEL_ASSIGN_OR_RETURN(summed_gate_grad_, b.allocate(gate_bytes));
    } else {
      TUTEL_ASSIGN_OR_RETURN(grad_norm_sum_, b.allocate(sizeof(float)));
    }
    for (Tensor& t : tensors_) {
      const size_t bytes = static_cast<size_t>(t.shape.numel()) * 4;
      TUTEL_ASSIGN_OR_RETURN(t.value, b.allocate(bytes));
      TUTEL_ASSIGN_OR_RETURN(t.grad, b.allocate(bytes));
      TUTEL_RETURN_IF_ERROR(b.fill_zero(bytes_view(t.grad, b.device())));
      if (adam || momentum) {
        TUTEL_ASSIGN_OR_RETURN(t.state0, b.allocate(bytes));
        TUTEL_RETURN_IF_ERROR(b.fill_zero(bytes_view(t.state0, b.device())));
      }
      if (adam) {
        TUTEL_ASSIGN_OR_RETURN(t.state1, b.allocate(bytes));
        TUTEL_RETURN_IF_ERROR(b.fill_zero(bytes_view(t.state1, b.device())));
      }
      if (keeps_bf16_copy(t)) {
        TUTEL_ASSIGN_OR_RETURN(t.value_bf16, b.allocate(bytes / 2));
      }
    }
    return Status::OK();
  });
}

bool ServedLayer::keeps_bf16_copy(const Tensor& t) const {
  // The expert weights are what the bf16 matmuls read; converting them once per step instead of
  // on every forward and backward is the point (the gate and biases stay f32).
  return def_.spec.matmul_dtype == DType::kBF16 && (t.name == kFc1WeightName || t.name == kFc2WeightName);
}

Status ServedLayer::refresh_bf16_copies() {
  Backend& b = backend();
  for (Tensor& t : tensors_)
    if (t.value_bf16.data())
      TUTEL_RETURN_IF_ERROR(b.convert(t.view(t.value, b.device()), t.bf16_view(b.device())));
  return Status::OK();
}

// Tutel's initialisation: nn.Linear's U(±1/sqrt(fan_in)) for the gate, fc1 (fan_in M) and fc2
// (fan_in H), weights and biases alike.
// Every rank of a group draws the whole layer from the same seed and keeps its slice, so a
// group layer starts from exactly the weights a single-daemon layer with that seed has.
Status ServedLayer::initialise(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const LayerSpec& s = def_.spec;
  const int64_t E = s.experts, Mi = s.model_dim, Hi = s.hidden, O = s.out_dim();
  const double M = static_cast<double>(Mi), H = static_cast<double>(Hi);
  auto draw = [&](int64_t n, double fan_in) {
    const double bound = 1.0 / std::sqrt(fan_in);
    std::uniform_real_distribution<float> dist(static_cast<float>(-bound), static_cast<float>(bound));
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
  };
  graphs::HostLayerParams whole;
  whole.gate = draw(E * Mi, M);
  whole.fc1 = draw(E * Hi * Mi, M);
  if (s.has_fc1_bias) whole.fc1_bias = draw(E * Hi, M);
  whole.fc2 = draw(E * Hi * O, H);
  if (s.has_fc2_bias) whole.fc2_bias = draw(E * O, H);
  return copy_in(group_ ? graphs::slice_for_rank(s, group_->layer->shard(), whole) : whole);
}

Status ServedLayer::copy_in(const graphs::HostLayerParams& p, int which) {
  Backend& b = backend();
  auto device_lock = lock_device();
  return on_rank([&]() -> Status {
    for (Tensor& t : tensors_) {
      DeviceBuffer& dst = which == 0 ? t.value : which == 1 ? t.state0 : t.state1;
      TUTEL_CHECK(dst.data() != nullptr) << "copy_in into optimizer state " << which << " the layer does not keep";
      const std::vector<float>& src = t.name == kGateWeightName ? p.gate
                                      : t.name == kFc1WeightName ? p.fc1
                                      : t.name == kFc1BiasName   ? p.fc1_bias
                                      : t.name == kFc2WeightName ? p.fc2
                                                                 : p.fc2_bias;
      if (static_cast<int64_t>(src.size()) != t.shape.numel())
        return Status::Internal("parameter " + t.name + " has " + std::to_string(src.size()) + " values for shape " +
                                t.shape.to_string());
      TUTEL_RETURN_IF_ERROR(b.copy(dst.data(), src.data(), src.size() * 4, CopyKind::kHostToDevice));
    }
    return which == 0 ? refresh_bf16_copies() : Status::OK();
  });
}

LayerWeights ServedLayer::weights_of(int which) const {
  const Device d = const_cast<ServedLayer*>(this)->backend().device();
  LayerWeights w;
  for (const Tensor& t : tensors_) {
    const TensorView v = t.view(which == 0 ? t.value : t.grad, d);
    if (t.name == kGateWeightName) w.gate_weight = v;
    else if (t.name == kFc1WeightName) w.experts.fc1_weight = v;
    else if (t.name == kFc1BiasName) w.experts.fc1_bias = v;
    else if (t.name == kFc2WeightName) w.experts.fc2_weight = v;
    else if (t.name == kFc2BiasName) w.experts.fc2_bias = v;
    if (which == 0 && t.value_bf16.data()) {
      if (t.name == kFc1WeightName) w.experts.fc1_weight_bf16 = t.bf16_view(d);
      else w.experts.fc2_weight_bf16 = t.bf16_view(d);
    }
  }
  return w;
}

int64_t ServedLayer::step_count() const { return step_; }

int64_t ServedLayer::pending_backwards() const { return pending_count_; }

uint64_t ServedLayer::activation_bytes() const {
  // Both are set before the layer is published and never change after.
  return group_ ? group_->activations->bytes() : local_activations_->bytes();
}

std::string ServedLayer::group_error() const {
  std::lock_guard lock(stats_mutex_);
  return group_error_;
}

std::vector<comm::PeerStatus> ServedLayer::group_peers() const {
  // group_ is set before the layer is published and never changes after.
  return group_ ? group_->comm().peers() : std::vector<comm::PeerStatus>{};
}

std::vector<graphs::TunerEntry> ServedLayer::group_tuner() const {
  // The tuner guards its dictionary itself; the layer object is never replaced.
  const graphs::ExchangeTuner* tuner = group_ && group_->layer ? group_->layer->tuner() : nullptr;
  return tuner ? tuner->entries() : std::vector<graphs::TunerEntry>{};
}

std::vector<graphs::ExchangeConfig> ServedLayer::group_tuner_candidates() const {
  const graphs::ExchangeTuner* tuner = group_ && group_->layer ? group_->layer->tuner() : nullptr;
  return tuner ? tuner->candidates() : std::vector<graphs::ExchangeConfig>{};
}

Status ServedLayer::note_group_status(Status st) {
  const StatusCode c = st.code();
  if (c == StatusCode::kUnavailable || c == StatusCode::kTimeout || c == StatusCode::kAborted) {
    std::lock_guard lock(stats_mutex_);
    group_error_ = st.to_string();
  }
  return st;
}

RoutingStats ServedLayer::last_stats() const {
  std::lock_guard lock(stats_mutex_);
  return last_stats_;
}

ServedLayer::PlanSummary ServedLayer::plan_summary() const {
  std::lock_guard lock(stats_mutex_);
  if (!plans_) return {};
  return {graphs::plan_kind_name(plan_kind_), plan_stats_};
}

void ServedLayer::publish_plan_summary() {
  if (!plans_) return;
  graphs::PlanCacheStats stats = plans_->refresh_stats();
  stats.max_bytes = memory_->max_bytes();  // what bounds the plans (see create())
  std::lock_guard lock(stats_mutex_);
  plan_stats_ = stats;
}

Status ServedLayer::prebuild_plans() {
  // Charged like any plan, and refused like a training forward's: a layer whose configured
  // plans do not fit beside its parameters (charged already, by allocate()) is not created.
  Status st = [&]() -> Status {
    ActivationBackend::Enforce enforce(*local_activations_);
    auto device_lock = lock_device();
    for (const bool training : {false, true}) {
      TUTEL_ASSIGN_OR_RETURN(const std::vector<graphs::PlanKey> keys, plans_->configured_keys(0, {}, training));
      TUTEL_RETURN_IF_ERROR(plans_->prebuild(0, keys));
    }
    return Status::OK();
  }();
  return st.with_context("layer '" + def_.name +
                         "': building the plans of token_buckets (use fewer or smaller buckets, or "
                         "raise the tenant's max_memory_bytes)");
}

void ServedLayer::trim_plans_over_quota() {
  if (plans_ && memory_->over_quota()) plans_->trim();
}

ServedLayer::~ServedLayer() {
  teardown_lock_ = lock_device();
  // Forwards still pending (a layer destroyed before their backwards) leave the tenant's count
  // with their memory, which goes with pending_.
  memory_->remove_pending(pending_bytes_.load());
}

Status ServedLayer::set_pinned(bool pinned) {
  if (!plans_)
    return Status::InvalidArgument("layer '" + tenant_ + "/" + def_.name +
                                   "' is an expert-parallel group layer: it keeps no plans to pin");
  pinned_.store(pinned, std::memory_order_relaxed);
  return Status::OK();
}

uint64_t ServedLayer::trim_idle_plans() {
  // Set before the layer is published, never changed: a group layer (no plans) is skipped
  // without taking its mutex, which it may hold for a whole collective.
  if (!plans_ || pinned()) return 0;
  LayerLock lock(*this);
  auto device_lock = lock_device();
  const uint64_t freed = plans_->trim();
  publish_plan_summary();
  return freed;
}

std::unique_ptr<ServedLayer::Pending> ServedLayer::take_pending() {
  if (recycled_.empty()) return std::make_unique<Pending>();
  std::unique_ptr<Pending> p = std::move(recycled_.back());
  recycled_.pop_back();
  return p;
}

void ServedLayer::recycle(std::unique_ptr<Pending> pending) {
  pending->step = {};  // the plan goes back to the cache for the next step of its bucket
  // A backward's growth is let through the quota (see tenant_memory.hpp); an entry is kept for
  // reuse only while the tenant is back within it, so the excess lasts one backward.
  if (recycled_.size() < kMaxRecycled && !memory_->over_quota()) recycled_.push_back(std::move(pending));
}

Result<TensorView> ServedLayer::stage_in(const float* in, Shape shape, DeviceBuffer& buf, ClientMemory memory) {
  Backend& b = activations();
  if (!stages(memory)) return TensorView(const_cast<float*>(in), DType::kF32, shape, b.device());
  const size_t bytes = static_cast<size_t>(shape.numel()) * 4;
  TUTEL_RETURN_IF_ERROR(grow(b, buf, bytes));
  TUTEL_RETURN_IF_ERROR(b.copy(buf.data(), in, bytes, CopyKind::kHostToDevice));
  return TensorView(buf.data(), DType::kF32, shape, b.device());
}

Result<TensorView> ServedLayer::stage_out(float* out, Shape shape, DeviceBuffer& buf, ClientMemory memory) {
  Backend& b = activations();
  if (!stages(memory)) return TensorView(out, DType::kF32, shape, b.device());
  TUTEL_RETURN_IF_ERROR(grow(b, buf, static_cast<size_t>(shape.numel()) * 4));
  return TensorView(buf.data(), DType::kF32, shape, b.device());
}

Status ServedLayer::unstage_out(float* out, const TensorView& result, ClientMemory memory) {
  // The client may read the result as soon as it is told: on the host (copied back, which
  // returns once the host has it) or on the device (every op that writes it has finished).
  if (stages(memory))
    return result.nbytes() > 0 ? backend().copy(out, result.data(), result.nbytes(), CopyKind::kDeviceToHost)
                               : backend().synchronize();  // an empty batch's: no copy waits for the step
  return memory == ClientMemory::kDevice ? backend().synchronize() : Status::OK();
}

Result<ForwardResult> ServedLayer::forward(const float* x, int64_t tokens, float* y, bool training,
                                           uint64_t owner, uint64_t sequence, ClientMemory memory,
                                           std::optional<uint64_t> noise_key) {
  const LayerSpec& s = def_.spec;
  const int64_t M = s.model_dim, O = s.out_dim();
  LayerLock lock(*this, Waits::kCounted);
  const auto key = std::make_pair(owner, sequence);
  auto device_lock = lock_device(Waits::kCounted);
  return on_rank([&]() -> Result<ForwardResult> {
    if (Status down = rank_.health.check(); !down.ok())
      return group_ ? refuse_group_step(false, owner, sequence, std::move(down)) : down;
    if (training && pending_.count(key)) {
      Status why = Status::AlreadyExists("layer '" + def_.name + "': sequence " + std::to_string(sequence) +
                                         " already has a forward waiting for its backward; use a new sequence number");
      return group_ ? refuse_group_step(false, owner, sequence, std::move(why)) : why;
    }
    // Each entry costs its bookkeeping whatever it holds, and an empty batch's holds nothing the
    // quota counts: without a bound, empty forwards never backwarded grew the daemon by a
    // gigabyte per two million.
    if (training && pending_.size() >= kMaxPendingForwards) {
      Status why = Status::ResourceExhausted(
          "layer '" + def_.name + "' has " + std::to_string(pending_.size()) +
          " training forwards waiting for their backwards, the most it keeps: backward or discard some first");
      return group_ ? refuse_group_step(false, owner, sequence, std::move(why)) : why;
    }
    ActivationBackend& b = activations();
    const Device d = b.device();
    RoutingStats stats;
    // Pending entries (saved state and input) are recycled, and plans are cached: no allocation
    // per request once the layer has seen its largest batch.
    std::unique_ptr<Pending> pending = training ? take_pending() : nullptr;
    // The quota is checked at each allocation, with the size the layer code computed for it and
    // before it is made, rather than against an estimate up front: the buffers a forward needs
    // depend on the backend's expert workspace and, dropless, on the routing, and an upper bound
    // from the shape would refuse forwards that fit. A refused allocation (a new plan's buffers,
    // x's copy) fails the forward before anything is written to y, and the entry is freed below.
    // A group layer's forward is a collective: its ranks agree on whether each could allocate, and
    // refuse the step together (ExpertParallelLayer), so only the layer's own allocations are
    // enforced there, not the staging before it, which a rank would refuse alone.
    // Inference forwards are held to the quota too: their buffers grow with the tokens and the
    // capacity (a capacity_factor far above E/k), and a daemon that let them through would run out
    // of memory for every tenant instead of refusing one request.
    std::optional<ActivationBackend::Enforce> enforce;
    if (!group_) enforce.emplace(b);
    Status st;
    if (group_) {
      // Its peers run the same forwards in the same order (the clients' contract), so every rank
      // keeps the same micro-batches under the same sequences.
      // Staged like a local layer's on a GPU group; the forward keeps its own copy of x.
      st = note_group_status([&]() -> Status {
        // Staging is this rank's alone: a failure there is refused through the step's agreement,
        // so that every rank refuses the step.
        Result<TensorView> xv = stage_in(x, {tokens, M}, staged_in_, memory);
        Result<TensorView> yv = xv.ok() ? stage_out(y, {tokens, O}, staged_out_, memory) : xv.status();
        if (!yv.ok()) return group_->layer->refuse_forward(yv.status());
        ActivationBackend::Enforce group_enforce(b);
        TUTEL_RETURN_IF_ERROR(
            group_->layer->forward(weights_of(0), *xv, *yv, &stats, pending ? &pending->saved : nullptr));
        return unstage_out(y, *yv, memory);
      }());
      if (!st.ok() && stages_host_memory()) (void)b.synchronize();
    } else if (tokens == 0) {
      // An empty batch: nothing to route or compute (capacity 0, l_aux 0). A training forward's
      // entry (without a plan) still waits for its backward, so a trainer calls the same way
      // whatever its batch holds.
      stats = RoutingStats{};
    } else {
      st = [&]() -> Status {
        TensorView xv;
        if (training && !plans_take_host_memory()) {
          // Kept for the backward on the backend's device: on a device backend this copy is x's
          // staging too, on the CPU backend the only copy the request makes. (A cuda-graph plan
          // copies x into its own input buffer, which stays the held plan's until the backward:
          // that copy is the one kept.)
          const size_t x_bytes = static_cast<size_t>(tokens * M) * 4;
          TUTEL_RETURN_IF_ERROR(grow(b, pending->x, x_bytes));
          TUTEL_RETURN_IF_ERROR(b.copy(pending->x.data(), x, x_bytes,
                                       memory == ClientMemory::kDevice ? CopyKind::kDeviceToDevice
                                                                       : CopyKind::kHostToDevice));
          xv = TensorView(pending->x.data(), DType::kF32, {tokens, M}, d);
        } else {
          TUTEL_ASSIGN_OR_RETURN(xv, stage_in(x, {tokens, M}, staged_in_, memory));
        }
        TUTEL_ASSIGN_OR_RETURN(const TensorView yv, stage_out(y, {tokens, O}, staged_out_, memory));
        // The noise draw is keyed by the client's key, or by the step and the sequence, so a
        // replayed step draws the same noise.
        const uint64_t noise_counter = noise_key ? *noise_key
                                       : training ? (static_cast<uint64_t>(step_) << 32) ^ sequence
                                                  : 0;
        // An inference with a noise key draws the noise as a training forward does: it runs on a
        // training plan (the one whose program draws it) and keeps nothing.
        const bool noisy_inference = !training && noise_key && s.gate_noise > 0;
        // The plan of x's token bucket; a training forward's stays held by its entry until the
        // backward, an inference forward's goes back to the cache at once.
        TUTEL_ASSIGN_OR_RETURN(graphs::PlanStep step,
                               plans_->forward(0, {}, xv, noise_counter, training || noisy_inference, yv));
        stats = step.stats;
        if (pending) pending->step = std::move(step);
        return unstage_out(y, yv, memory);
      }();
      trim_plans_over_quota();
      publish_plan_summary();
      // A failed request's copies from the client's buffers must be over before it is told.
      if (!st.ok() && stages_host_memory()) (void)b.synchronize();
    }
    enforce.reset();
    if (!st.ok()) st = watch_device(std::move(st));
    if (!st.ok()) {
      // Refused for the quota: the entry may have grown some buffers before the one refused, so
      // it is freed rather than kept: a new entry's charge returns to nothing, a recycled one's
      // memory is given back too.
      if (pending && st.code() != StatusCode::kResourceExhausted) recycle(std::move(pending));
      return st.code() == StatusCode::kResourceExhausted ? st.with_context("layer '" + def_.name + "'") : st;
    }
    if (pending) {
      pending->params_version = params_version_;
      add_pending_bytes(*pending);
      pending_.emplace(key, std::move(pending));
    }
    publish_pending();
    {
      std::lock_guard stats_lock(stats_mutex_);
      last_stats_ = stats;
    }
    return ForwardResult{stats};
  });
}

Status ServedLayer::backward(const float* dy, int64_t tokens, float dl_aux, float* dx, uint64_t owner,
                             uint64_t sequence, ClientMemory memory, bool keep_param_grads) {
  const LayerSpec& s = def_.spec;
  const int64_t M = s.model_dim, O = s.out_dim();
  LayerLock lock(*this, Waits::kCounted);
  auto device_lock = lock_device(Waits::kCounted);
  return on_rank([&]() -> Status {
    if (Status down = rank_.health.check(); !down.ok())
      return group_ ? refuse_group_step(true, owner, sequence, std::move(down)) : down;
    auto it = pending_.find({owner, sequence});
    if (it == pending_.end()) {
      Status why = Status::NotFound("layer '" + def_.name + "': no training forward with sequence " +
                                    std::to_string(sequence) + " is waiting for a backward");
      return group_ ? refuse_group_step(true, owner, sequence, std::move(why)) : why;
    }
    Pending& p = *it->second;
    // An empty batch's entry holds no plan (forward).
    const int64_t forward_tokens = group_ ? p.saved.tokens() : p.step.plan ? p.step.plan->tokens() : 0;
    if (forward_tokens != tokens) {
      Status why = Status::InvalidArgument("layer '" + def_.name + "': backward of sequence " +
                                           std::to_string(sequence) + " has " + std::to_string(tokens) +
                                           " tokens, its forward had " + std::to_string(forward_tokens));
      return group_ ? refuse_group_step(true, owner, sequence, std::move(why)) : why;
    }
    if (p.params_version != params_version_) {
      // The forward's activations were made with the parameters before the change, the backward
      // would run with those after it: the gradient of no function, returned without a word (torch
      // refuses the same, "modified by an inplace operation"). The forward is dropped (its group
      // peers drop theirs: they stepped alike).
      Status why = Status::InvalidArgument(
          "layer '" + def_.name + "': the parameters changed (a step, load or import_state) after the training forward "
          "of sequence " + std::to_string(sequence) + ", so its backward would be the gradient of neither the old "
          "parameters nor the new; run every training forward's backward before the step (that forward is dropped)");
      if (group_) return refuse_group_step(true, owner, sequence, std::move(why));
      remove_pending_bytes(p.bytes());
      recycle(std::move(it->second));
      pending_.erase(it);
      publish_pending();
      return why;
    }
    ActivationBackend& b = activations();
    const Device d = b.device();
    // Counted out at what it was counted in with; the backward may grow it.
    const uint64_t held = p.bytes();
    // A backward for dx alone: the parameter gradients are copied aside before and back after, so
    // it leaves them as they were. (The backends always accumulate them; skipping those GEMMs
    // would be faster, but is a change to every backend and to the group layers' collectives, for
    // a backward trainers ask for rarely: the gradient of the input alone, a frozen module.) The
    // copies are activation memory of the tenant's until they are put back.
    std::vector<DeviceBuffer> kept_grads;
    auto keep_grads = [&]() -> Status {
      for (const Tensor& t : tensors_) {
        TUTEL_ASSIGN_OR_RETURN(DeviceBuffer copy, b.allocate(t.grad.bytes()));
        TUTEL_RETURN_IF_ERROR(b.copy(copy.data(), t.grad.data(), t.grad.bytes(), CopyKind::kDeviceToDevice));
        kept_grads.push_back(std::move(copy));
      }
      return Status::OK();
    };
    // Back, whether the backward ran or failed half-way (its partial sums go with it); also when
    // an exception leaves this function (the guard below). The buffers go at once: the backend's
    // memory is stream-ordered, so the copies that read them come first.
    auto restore_grads = [&]() -> Status {
      Status first;
      if (kept_grads.size() == tensors_.size())
        for (size_t i = 0; i < tensors_.size(); ++i) {
          const Status restored = b.copy(tensors_[i].grad.data(), kept_grads[i].data(), kept_grads[i].bytes(),
                                         CopyKind::kDeviceToDevice);
          if (first.ok()) first = restored;
        }
      kept_grads.clear();
      return first;
    };
    struct RestoreOnUnwind {
      const std::function<Status()> restore;
      ~RestoreOnUnwind() {
        if (std::uncaught_exceptions() > 0) (void)restore();
      }
    } restore_on_unwind{restore_grads};
    Status st;
    bool group_backward_ran = false;  // the group's collective backward returned: every rank's did
    if (group_) {
      st = note_group_status([&]() -> Status {
        Result<TensorView> dyv = stage_in(dy, {tokens, O}, staged_in_, memory);
        Result<TensorView> dxv = dyv.ok() ? stage_out(dx, {tokens, M}, staged_out_, memory) : dyv.status();
        if (dxv.ok() && keep_param_grads) {
          if (Status kept = keep_grads(); !kept.ok()) dxv = kept;
        }
        if (!dxv.ok()) return group_->layer->refuse_backward(p.saved, dxv.status());
        // The group checks that every rank asks for dx alone alike (see ExpertParallelLayer).
        TUTEL_RETURN_IF_ERROR(
            group_->layer->backward(weights_of(0), *dyv, dl_aux, *dxv, weights_of(1), p.saved, keep_param_grads));
        group_backward_ran = true;
        return unstage_out(dx, *dxv, memory);
      }());
      if (!st.ok() && stages_host_memory()) (void)b.synchronize();
    } else if (tokens > 0) {  // an empty batch's backward changes nothing
      st = [&]() -> Status {
        TUTEL_ASSIGN_OR_RETURN(const TensorView dyv, stage_in(dy, {tokens, O}, staged_in_, memory));
        TUTEL_ASSIGN_OR_RETURN(const TensorView dxv, stage_out(dx, {tokens, M}, staged_out_, memory));
        if (keep_param_grads) TUTEL_RETURN_IF_ERROR(keep_grads());
        // The forward's x: the entry's copy, or the held cuda-graph plan's own input buffer (which
        // the plan then does not copy again).
        const TensorView xv = plans_take_host_memory() ? p.step.plan->input(tokens)
                                                      : TensorView(p.x.data(), DType::kF32, {tokens, M}, d);
        TUTEL_CHECK(!xv.empty());
        TUTEL_RETURN_IF_ERROR(p.step.plan->backward(xv, dyv, dl_aux, dxv));
        return unstage_out(dx, dxv, memory);
      }();
      if (!st.ok() && stages_host_memory()) (void)b.synchronize();
    }
    if (Status restored = restore_grads(); st.ok()) st = std::move(restored);
    // The gradients are there for a step once a backward added to them: on a group layer once the
    // group's backward returned, whatever this rank's copy of dx did after it (the ranks' flags
    // must agree at the step). One that failed half-way leaves partial sums that only a later
    // backward's step applies, as before: a failed step is the trainer's to redo.
    if ((st.ok() || group_backward_ran) && !keep_param_grads) grads_present_ = true;
    remove_pending_bytes(held);
    recycle(std::move(it->second));
    pending_.erase(it);
    trim_plans_over_quota();
    publish_pending();
    publish_plan_summary();
    return watch_device(std::move(st));
  });
}

Status ServedLayer::refuse_step(bool backward, uint64_t owner, uint64_t sequence, Status why) {
  if (!group_ || why.ok()) return why;
  LayerLock lock(*this, Waits::kCounted);
  auto device_lock = lock_device(Waits::kCounted);
  return refuse_group_step(backward, owner, sequence, std::move(why));
}

Status ServedLayer::refuse_group_step(bool backward, uint64_t owner, uint64_t sequence, Status why) {
  Status agreed;
  if (!backward) {
    agreed = group_->layer->refuse_forward(why);
  } else if (auto it = pending_.find({owner, sequence}); it != pending_.end()) {
    // The group consumes the forward this backward names, so this rank drops it too.
    const uint64_t held = it->second->bytes();
    agreed = group_->layer->refuse_backward(it->second->saved, why);
    remove_pending_bytes(held);
    recycle(std::move(it->second));
    pending_.erase(it);
    publish_pending();
  } else {
    // No forward here to consume (the client named none): the peers still consume theirs.
    graphs::ExpertParallelLayer::Saved none;
    agreed = group_->layer->refuse_backward(none, why);
  }
  // refuse_forward and refuse_backward give `why` back once the group has agreed; anything else
  // is the agreement's own failure, which is the group's (and says why this rank refused).
  if (agreed.code() != why.code() || agreed.message() != why.message())
    return note_group_status(agreed.with_context("refusing a step (" + std::string(why.message()) + ")"));
  return why;
}

Status ServedLayer::discard(uint64_t owner, uint64_t sequence) {
  LayerLock lock(*this, Waits::kCounted);
  auto device_lock = lock_device(Waits::kCounted);  // the entry frees buffers of the rank's backend
  auto it = pending_.find({owner, sequence});
  if (it == pending_.end()) return Status::OK();
  remove_pending_bytes(it->second->bytes());
  recycle(std::move(it->second));
  pending_.erase(it);
  trim_plans_over_quota();
  publish_pending();
  publish_plan_summary();
  return Status::OK();
}

void ServedLayer::drop_pending(uint64_t owner) {
  std::unique_lock lock(mutex_, std::defer_lock);
  if (group_) {
    // A group layer may hold its lock for a whole collective (up to its collective timeout):
    // the closing session does not wait for it; whoever holds the lock drops the entries on
    // its way out (LayerLock).
    if (!lock.try_lock()) {
      {
        std::lock_guard orphans(orphans_mutex_);
        orphaned_owners_.push_back(owner);
        has_orphans_.store(true, std::memory_order_release);
      }
      // The holder may have left meanwhile, past its reaping; otherwise it reaps them, or (in
      // the narrow window between its reaping and its unlock) the layer's next operation does.
      if (lock.try_lock()) drop_orphans_locked();
      return;
    }
  } else {
    lock.lock();  // held for one op at a time, never for a collective
  }
  drop_pending_locked(owner);
}

void ServedLayer::drop_orphans_locked() {
  std::vector<uint64_t> owners;
  {
    std::lock_guard orphans(orphans_mutex_);
    owners.swap(orphaned_owners_);
    has_orphans_.store(false, std::memory_order_relaxed);
  }
  for (const uint64_t owner : owners) drop_pending_locked(owner);
}

void ServedLayer::drop_pending_locked(uint64_t owner) {
  auto device_lock = lock_device();  // the entries free buffers of the rank's backend
  bool dropped = false;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->first.first != owner) {
      ++it;
      continue;
    }
    remove_pending_bytes(it->second->bytes());
    it = pending_.erase(it);
    dropped = true;
  }
  // Each of its forwards held a plan instance, idle now: a client that died with many forwards
  // pending left as many copies of a plan cached and charged to its tenant until the quota ran
  // short (the lifecycle review: 169 plans after 10 such clients). One idle instance per key
  // stays for whoever comes next.
  if (dropped && plans_) plans_->trim_extra_instances();
  publish_pending();
  publish_plan_summary();
}

namespace {

// An override of the spec's optimizer settings: finite, >= 0 and within f32.
Result<float> step_override(const std::optional<double>& value, float spec_value, const char* what,
                            const std::string& layer) {
  if (!value) return spec_value;
  if (!std::isfinite(*value) || *value < 0 || *value > double(std::numeric_limits<float>::max()))
    return Status::InvalidArgument("layer '" + layer + "': a step's " + what +
                                   " must be a finite number >= 0 within f32, not " + std::to_string(*value));
  return static_cast<float>(*value);
}

// A value every rank of a group must pass alike, as the agreement compares it: its bits, the
// sign bit dropped (the values are >= 0; -0 and +0 are the same).
int64_t alike_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<int64_t>(bits & 0x7fffffffu);
}

}  // namespace

Result<ServedLayer::StepOutcome> ServedLayer::step(const StepOverrides& overrides) {
  const OptimizerConfig& o = def_.optimizer;
  StepOutcome out;
  TUTEL_ASSIGN_OR_RETURN(out.lr, step_override(overrides.lr, o.lr, "lr", def_.name));
  TUTEL_ASSIGN_OR_RETURN(out.weight_decay, step_override(overrides.weight_decay, o.weight_decay, "weight_decay", def_.name));
  LayerLock lock(*this, Waits::kCounted);
  auto device_lock = lock_device(Waits::kCounted);
  return on_rank([&]() -> Result<StepOutcome> {
    // A group layer's step is a collective: a rank out of service fails it at its first op, and
    // its peers when their all-reduce times out.
    if (!group_) TUTEL_RETURN_IF_ERROR(rank_.health.check());
    out.applied = grads_present_;
    // The gate is replicated: every rank steps it with the gradient summed over the group, and
    // with the same settings (a rank with another learning rate would move its copy elsewhere).
    // The sum goes to a copy: the rank's own gradient stays its share, as the experts' do. (It
    // was summed in place, so a second step without zero_grad, or gradients accumulated across
    // steps, applied the group's sum W times over, and grad_norm after a step counted it W times.)
    TensorView summed_gate;
    if (group_) {
      const TensorView gate_grad = weights_of(1).gate_weight;
      summed_gate = TensorView(summed_gate_grad_.data(), DType::kF32, gate_grad.shape(), gate_grad.device());
      if (out.applied)
        TUTEL_RETURN_IF_ERROR(watch_device(
            backend().copy(summed_gate.data(), gate_grad.data(), gate_grad.nbytes(), CopyKind::kDeviceToDevice)));
      // The step counts too: a load or import on some ranks only leaves the group's copies of
      // the gate and its optimizer's bias correction apart.
      const graphs::ExpertParallelLayer::Alike alike[] = {
          {"gradients (a backward since zero_grad on some ranks only)", out.applied ? 1 : 0},
          {"learning rates (lr)", alike_bits(out.lr)},
          {"weight decays", alike_bits(out.weight_decay)},
          {"step counts (a load or import_state on some ranks only, or from different checkpoints)",
           step_.load()}};
      TUTEL_RETURN_IF_ERROR(watch_device(
          note_group_status(group_->layer->all_reduce_gate_grad(summed_gate, alike, /*sum=*/out.applied))));
    }
    if (out.applied) {
      ++params_version_;  // also when the pass fails half-way: some parameters moved
      TUTEL_RETURN_IF_ERROR(watch_device(apply_optimizer(out.lr, out.weight_decay, summed_gate)));
      ++step_;
    }
    out.step = step_;
    return out;
  });
}

Status ServedLayer::apply_optimizer(float lr, float weight_decay, TensorView gate_grad) {
  Backend& b = backend();
  const Device d = b.device();
  const OptimizerConfig& o = def_.optimizer;
  for (Tensor& t : tensors_) {
    const TensorView grad = t.name == kGateWeightName && !gate_grad.empty() ? gate_grad : t.view(t.grad, d);
    if (o.kind == OptimizerKind::kAdamW) {
      AdamWArgs a{t.view(t.value, d), grad, t.view(t.state0, d), t.view(t.state1, d)};
      a.lr = lr;
      a.beta1 = o.beta1;
      a.beta2 = o.beta2;
      a.eps = o.eps;
      a.weight_decay = weight_decay;
      a.step = step_ + 1;
      if (t.value_bf16.data()) a.param_bf16 = t.bf16_view(d);
      TUTEL_RETURN_IF_ERROR(b.adamw_step(a));
    } else {
      SgdArgs a{t.view(t.value, d), grad, t.state0.data() ? t.view(t.state0, d) : TensorView()};
      a.lr = lr;
      a.momentum = o.momentum;
      a.weight_decay = weight_decay;
      a.nesterov = o.nesterov;
      a.first_step = step_ == 0;
      if (t.value_bf16.data()) a.param_bf16 = t.bf16_view(d);
      TUTEL_RETURN_IF_ERROR(b.sgd_step(a));
    }
  }
  return Status::OK();
}

Status ServedLayer::zero_grad(bool set_to_none) {
  LayerLock lock(*this);
  Backend& b = backend();
  auto device_lock = lock_device();
  return on_rank([&]() -> Status {
    TUTEL_RETURN_IF_ERROR(rank_.health.check());
    for (Tensor& t : tensors_) TUTEL_RETURN_IF_ERROR(watch_device(b.fill_zero(bytes_view(t.grad, b.device()))));
    // Zeros only where gradients are: torch's zero_grad(set_to_none=False) zeroes the .grad that
    // exist and leaves a None one None, so a later step still skips a frozen or unused layer.
    grads_present_ = grads_present_ && !set_to_none;
    return Status::OK();
  });
}

Result<double> ServedLayer::grad_norm() {
  LayerLock lock(*this, Waits::kCounted);
  auto device_lock = lock_device(Waits::kCounted);
  return on_rank([&]() -> Result<double> {
    // On a group layer a collective: a rank out of service fails it at its first op (as step).
    if (group_) {
      Result<double> squares = group_->layer->grad_sum_squares(weights_of(1));
      TUTEL_RETURN_IF_ERROR(watch_device(note_group_status(squares.status())));
      return std::sqrt(*squares);
    }
    TUTEL_RETURN_IF_ERROR(rank_.health.check());
    Backend& b = backend();
    const Device d = b.device();
    const DeviceBuffer& sum = grad_norm_sum_;
    const TensorView sum_view(sum.data(), DType::kF32, {1}, d);
    float squares = 0;
    const Status st = [&]() -> Status {
      TUTEL_RETURN_IF_ERROR(b.fill_zero(sum_view));
      for (const Tensor& t : tensors_) TUTEL_RETURN_IF_ERROR(b.add_sum_squares(t.view(t.grad, d), sum_view));
      TUTEL_RETURN_IF_ERROR(b.copy(&squares, sum.data(), sizeof squares, CopyKind::kDeviceToHost));
      return b.synchronize();
    }();
    TUTEL_RETURN_IF_ERROR(watch_device(st));
    return std::sqrt(double(squares));
  });
}

Status ServedLayer::scale_grads(double factor) {
  if (!std::isfinite(factor) || std::abs(factor) > double(std::numeric_limits<float>::max())) {
    char shown[32];  // %g: std::to_string printed 1e300 with all its 301 digits
    std::snprintf(shown, sizeof shown, "%g", factor);
    return Status::InvalidArgument("layer '" + def_.name + "': a gradient scale must be a finite f32 number, not " +
                                   shown);
  }
  LayerLock lock(*this);
  Backend& b = backend();
  auto device_lock = lock_device();
  return on_rank([&]() -> Status {
    TUTEL_RETURN_IF_ERROR(rank_.health.check());
    for (Tensor& t : tensors_)
      TUTEL_RETURN_IF_ERROR(watch_device(b.scale(t.view(t.grad, b.device()), static_cast<float>(factor))));
    return Status::OK();
  });
}

uint64_t ServedLayer::save_bytes_bound() const {
  // Gradients and bf16 copies are not saved.
  uint64_t bytes = 0;
  for (const Tensor& t : tensors_)
    bytes += static_cast<uint64_t>(t.shape.numel()) * 4 *
             (1 + (t.state0.data() ? 1 : 0) + (t.state1.data() ? 1 : 0));
  // The header (JSON): the metadata (the spec whole, each character escaped to at most 6; a
  // group layer's tuner record, JSON already, whose characters escape to at most 2: only '"'
  // and '\\' are escaped again) and per tensor a name, a dtype, a shape and offsets, well within
  // 256 bytes each.
  const uint64_t tuning = group_ && group_->layer && group_->layer->tuner() ? 2 * kMaxTuningRecordBytes : 0;
  return bytes + 6 * (spec_text_.size() + tenant_.size()) + tuning + 4096 + 256 * 3 * tensors_.size();
}

std::vector<ServedLayer::SavedTensor> ServedLayer::saved_tensors() const {
  std::vector<SavedTensor> out;
  for (const Tensor& t : tensors_) {
    out.push_back({t.name, &t.shape, &t.value});
    if (t.state0.data()) out.push_back({kState0Prefix + t.name, &t.shape, &t.state0});
    if (t.state1.data()) out.push_back({kState1Prefix + t.name, &t.shape, &t.state1});
  }
  return out;
}

std::map<std::string, std::string> ServedLayer::saved_metadata() const {
  std::map<std::string, std::string> metadata{
      {kStepKey, std::to_string(step_.load())},
      {kSpecKey, spec_text_},
      {kTenantKey, tenant_},
      // Who made it: a config's [[layer]] (the definition names its tenant) or a client. A
      // config layer of this name resumes only from a checkpoint of a config layer.
      {kOriginKey, def_.tenant.empty() ? "client" : "config"},
      {kOptimizerKey, std::string(optimizer_kind_name(def_.optimizer.kind))}};
  // The tuner's decisions, which a resumed group layer takes back (tuning_record.hpp).
  const graphs::ExchangeTuner* tuner = group_ && group_->layer ? group_->layer->tuner() : nullptr;
  if (tuner != nullptr) {
    TuningRecord record;
    record.measured_on = tuning_context(*group_->backend);
    for (const graphs::ExchangeConfig& c : tuner->candidates()) record.candidates.push_back(c.to_string());
    // Buckets where the group refused a candidate for want of memory are left out: that refusal
    // holds for the memory of the moment (a quota raised since, another tenant gone), and kept it
    // would outlive every restart. Clearing the flag instead would let the candidate's total of
    // 0 (never measured) win. They are measured again.
    for (graphs::TunerDecision& d : tuner->decisions())
      if (std::none_of(d.excluded.begin(), d.excluded.end(), [](bool x) { return x; }))
        record.decisions.push_back(std::move(d));
    // (Past the bound, which no dictionary reaches, save_bytes_bound would not hold.)
    if (std::string text = format_tuning_record(record);
        !record.decisions.empty() && text.size() <= kMaxTuningRecordBytes)
      metadata[kTuningKey] = std::move(text);
  }
  return metadata;
}

Status ServedLayer::save(const std::string& path) {
  LayerLock lock(*this);
  return save_locked(path);
}

Status ServedLayer::save_locked(const std::string& path) {
  // Written from where the tensors are, as an export is (state_writer): no staged copy of the
  // whole state, which for a large layer (values and both moments, three times the parameters)
  // could not be had at exit, and without it no layer after it was checkpointed.
  // Never from a lost device: the file keeps the last checkpoint written from a live one.
  TUTEL_RETURN_IF_ERROR(rank_.health.check());
  const StateWriter w = state_writer();
  return write_safetensors(path, w.entries, saved_metadata(), w.fill);
}

Result<bool> ServedLayer::checkpoint_if_changed(const std::string& path) {
  LayerLock lock(*this);
  std::error_code ec;
  const bool file_in_place = std::filesystem::is_regular_file(std::filesystem::symlink_status(path, ec));
  if (checkpointed_version_ == params_version_ && file_in_place) return false;
  TUTEL_RETURN_IF_ERROR(save_locked(path));
  checkpointed_version_ = params_version_;
  return true;
}

void ServedLayer::note_checkpointed() {
  LayerLock lock(*this);
  checkpointed_version_ = params_version_;
}

Result<uint64_t> ServedLayer::export_state(int memfd) {
  LayerLock lock(*this);
  // The rank's device lock (every layer's on the rank, whatever their tenant) is never held
  // while the client's file is written: a client can make that write wait as long as it likes
  // (a page of its source it never serves), and another tenant's forward, or the exit's
  // checkpoints, would wait with it. (The health check takes none.)
  TUTEL_RETURN_IF_ERROR(rank_.health.check());
  const StateWriter w = state_writer();
  return write_safetensors_into(memfd, "the state of layer " + def_.name, w.entries, saved_metadata(), w.fill);
}

ServedLayer::StateWriter ServedLayer::state_writer() {
  // On the CPU backend the tensors are host memory, written from where they are; a device's are
  // staged a chunk at a time, each under the rank's device lock. The layer's own lock (the
  // caller's) keeps them as they are meanwhile.
  StateWriter w;
  w.saved = saved_tensors();
  const bool host = backend().device().kind == DeviceKind::kCpu;
  for (const SavedTensor& t : w.saved)
    w.entries.push_back({t.name, DType::kF32, *t.shape, host ? t.value->data() : nullptr});
  if (!host)
    w.fill = [this, saved = w.saved](size_t i, uint64_t offset, void* dst, size_t bytes) -> Status {
      auto device_lock = lock_device();
      TUTEL_RETURN_IF_ERROR(rank_.health.check());
      return watch_device(backend().copy(dst, static_cast<const char*>(saved[i].value->data()) + offset, bytes,
                                         CopyKind::kDeviceToHost));
    };
  return w;
}

uint64_t ServedLayer::import_bytes_bound() const {
  // A file of this rank's tensors, or on a group layer of the whole layer's: a file may carry
  // no more than a load could take.
  const LayerSpec& s = def_.spec;
  const uint64_t E = static_cast<uint64_t>(s.experts), M = static_cast<uint64_t>(s.model_dim),
                 H = static_cast<uint64_t>(s.hidden), O = static_cast<uint64_t>(s.out_dim());
  // Both optimizer states whatever this layer keeps: a load ignores the ones it does not (an
  // AdamW layer's state imported into an SGD one).
  uint64_t here = 0;
  for (const Tensor& t : tensors_) here += static_cast<uint64_t>(t.shape.numel()) * 4 * 3;
  const uint64_t whole = 4 * 3 * (E * M + E * H * M + E * H + E * H * O + E * O);
  // And an export's rounding to whole pages.
  return (group_ ? std::max(here, whole) : here) + import_header_bound() + 4096;
}

uint64_t ServedLayer::import_header_bound() const {
  // save_bytes_bound()'s header bound (a tuner record whatever the layer: another layer's file
  // may carry one), and room for another layer's metadata and names (a longer spec or tenant).
  // Bounded before it is parsed: a JSON tree takes many times its text (a 100 MiB header of
  // empty objects took 4 GiB).
  return 6 * (spec_text_.size() + tenant_.size()) + 2 * kMaxTuningRecordBytes + 4096 + 256 * 3 * tensors_.size() +
         (1u << 20);
}

Status ServedLayer::import_state(int fd) {
  // A memfd only: a file on a network or FUSE mount the client controls could block this pool
  // thread in pread for good (the client library copies any other file into a memfd).
  TUTEL_RETURN_IF_ERROR(check_memory_file(fd, "the file to import into " + def_.name));
  // Sealed against shrinking and writing, and without holes, it is mapped as a file on disk is
  // (no copy); else read into the daemon's memory, since a mapping of it could be truncated
  // under the daemon, or allocate a page at a hole at the daemon's charge (pread reads a hole as
  // zeros).
  const std::string what = "the state imported into " + def_.name;
  struct stat st {};
  const bool sized = ::fstat(fd, &st) == 0;
  const uint64_t bound = import_bytes_bound(), header_bound = import_header_bound();
  // Before anything reads it (the hole scan below reads its whole map); the reader would refuse
  // it too, without saying why a file load takes is too large here.
  if (sized && static_cast<uint64_t>(st.st_size) > bound)
    return Status::InvalidArgument(what + " is " + std::to_string(st.st_size) + " bytes, more than the " +
                                   std::to_string(bound) +
                                   " an import into this layer takes (its parameters and optimizer state in f32): "
                                   "a file of f64 values or of a whole model goes among the tenant's checkpoints "
                                   "(save it there), where load takes it");
  const int seals = ::fcntl(fd, F_GET_SEALS);
  const bool sealed = seals >= 0 && (seals & F_SEAL_SHRINK) != 0 && (seals & F_SEAL_WRITE) != 0;
  const Result<uint64_t> hole = sealed ? first_hole(fd) : Result<uint64_t>(uint64_t{0});
  const bool mappable = sealed && sized && hole.ok() && *hole >= static_cast<uint64_t>(st.st_size);
  TUTEL_ASSIGN_OR_RETURN(SafetensorsFile file, mappable ? SafetensorsFile::map_sealed(fd, what, bound, header_bound)
                                                        : SafetensorsFile::read(fd, what, bound, header_bound));
  return load_file(file);
}

Status ServedLayer::load(const std::string& path) {
  // Read before the layer is locked: its requests wait for the copy only.
  TUTEL_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(path));
  return load_file(file);
}

Status ServedLayer::load_file(const SafetensorsFile& file) {
  LayerLock lock(*this);
  TUTEL_RETURN_IF_ERROR(rank_.health.check());
  Status loaded = load_file_locked(file);
  if (loaded.ok()) return loaded;
  auto device_lock = lock_device();
  return watch_device(std::move(loaded));
}

Status ServedLayer::load_locked(const std::string& path) {
  TUTEL_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(path));
  return load_file_locked(file);
}

Status ServedLayer::load_file_locked(const SafetensorsFile& file) {
  const std::string& path = file.path();
  // The layer's tensors as they are named (tuteld's own files, a moe_layer's state dict) or under
  // the one prefix of a whole model's state dict ("layers.3.moe."); values of any floating
  // dtype, as f32 (a bf16 model's weights exactly).
  TUTEL_ASSIGN_OR_RETURN(const std::string file_prefix, find_layer_prefix(file));
  // Another optimizer's state is no state of this one's (SGD's momentum taken for AdamW's first
  // moment, with no second moment, moved a weight 5000 times as far as a fresh start): it is
  // left, and this optimizer starts afresh at step 0, as from a file without optimizer state.
  const std::optional<std::string> written_by = optimizer_of(file);
  const bool foreign_state = written_by && *written_by != optimizer_kind_name(def_.optimizer.kind);
  if (foreign_state)
    TUTEL_LOG(WARN) << "layer " << tenant_ << "/" << def_.name << ": " << path << " holds the state of a "
                    << escape_text(*written_by) << " optimizer; this layer's "
                    << optimizer_kind_name(def_.optimizer.kind) << " takes its weights and starts afresh";
  auto step_of_file = [&]() -> Result<int64_t> { return foreign_state ? Result<int64_t>(int64_t{0}) : step_of(file); };
  if (group_) {
    // A whole-layer file (all E experts, e.g. a Tutel checkpoint): this rank takes its slice, of
    // the optimizer state too where the file has it; where it has none, the state starts afresh.
    // The whole layer is staged on the host, as values and states (up to three times the whole
    // layer's parameters, transiently, within import_bytes_bound of the file's own size).
    const LayerSpec& s = def_.spec;
    const SafetensorsTensor* fc1 = file.find(file_prefix + kFc1WeightName);
    const Shape whole_fc1{s.experts, s.hidden, s.model_dim};
    if (fc1 && fc1->shape == whole_fc1 && !(whole_fc1 == shape_of(kFc1WeightName))) {
      const int64_t E = s.experts, M = s.model_dim, H = s.hidden, O = s.out_dim();
      // The whole layer's tensors named `prefix` + each parameter's name. `optional`: one the
      // file lacks is zeros and counted (optimizer state is then all zeros, below); a tensor
      // present must be whole.
      int missing_state = 0;  // optimizer state tensors the file lacks
      auto read_whole = [&](const std::string& state_prefix, bool optional, graphs::HostLayerParams& whole) -> Status {
        auto read = [&](const char* name, Shape shape, bool present, std::vector<float>& out) -> Status {
          if (!present) return Status::OK();
          const std::string full = file_prefix + state_prefix + name;
          out.assign(static_cast<size_t>(shape.numel()), 0.f);
          // Optimizer state (optional) of another optimizer's is none.
          const SafetensorsTensor* t = optional && foreign_state ? nullptr : file.find(full);
          if (!t && optional) {
            ++missing_state;
            return Status::OK();
          }
          if (!t || !is_floating(t->dtype) || !(t->shape == shape))
            return Status::InvalidArgument(path + ": tensor " + quote_text(full) + " must be " + shape.to_string() +
                                           " (of f32, f64, bf16 or f16 values) in a whole-layer file");
          return read_as_f32(*t, out.data()).with_context(path);
        };
        TUTEL_RETURN_IF_ERROR(read(kGateWeightName, {E, M}, true, whole.gate));
        TUTEL_RETURN_IF_ERROR(read(kFc1WeightName, {E, H, M}, true, whole.fc1));
        TUTEL_RETURN_IF_ERROR(read(kFc1BiasName, {E, H}, s.has_fc1_bias, whole.fc1_bias));
        TUTEL_RETURN_IF_ERROR(read(kFc2WeightName, {E, H, O}, true, whole.fc2));
        TUTEL_RETURN_IF_ERROR(read(kFc2BiasName, {E, O}, s.has_fc2_bias, whole.fc2_bias));
        return Status::OK();
      };
      const bool has_state[2] = {tensors_.front().state0.data() != nullptr, tensors_.front().state1.data() != nullptr};
      graphs::HostLayerParams values, states[2];
      TUTEL_RETURN_IF_ERROR(read_whole("", /*optional=*/false, values));
      for (int i = 0; i < 2; ++i)
        if (has_state[i])
          TUTEL_RETURN_IF_ERROR(read_whole(i == 0 ? kState0Prefix : kState1Prefix, true, states[i]));
      TUTEL_ASSIGN_OR_RETURN(int64_t step, step_of_file());
      // The optimizer state is taken whole or not at all (see below, for a layer without [group]).
      if (missing_state > 0) {
        for (graphs::HostLayerParams& state : states)
          for (std::vector<float>* v : {&state.gate, &state.fc1, &state.fc1_bias, &state.fc2, &state.fc2_bias})
            std::fill(v->begin(), v->end(), 0.f);
        step = 0;
      }
      const graphs::ExpertShard& shard = group_->layer->shard();
      ++params_version_;  // from the first write on (a failure after it leaves some replaced)
      TUTEL_RETURN_IF_ERROR(copy_in(graphs::slice_for_rank(s, shard, values)));
      for (int i = 0; i < 2; ++i)
        if (has_state[i]) TUTEL_RETURN_IF_ERROR(copy_in(graphs::slice_for_rank(s, shard, states[i]), 1 + i));
      step_ = step;
      return Status::OK();
    }
  }
  Backend& b = backend();
  // Check every tensor before copying any, so a bad file leaves the layer as it was.
  struct Copy {
    const SafetensorsTensor* src;
    DeviceBuffer* dst;
    bool state;                  // optimizer state, not a parameter
    std::vector<float> staged;  // src's values as f32 where the file holds another dtype
  };
  std::vector<Copy> copies;
  // Optimizer state is taken whole or not at all: where the file lacks any of it, all of it
  // starts afresh (zeros), as its step does (0). A load never leaves the state of the weights it
  // replaced beside the new ones, nor pairs one moment from the file with a zeroed other at the
  // file's step (AdamW's second moment zeroed under a step of 200 made the next update 6.4 times
  // too large), nor keeps a step count whose state is gone.
  std::vector<TensorView> states;
  bool state_missing = false;
  auto take = [&](const std::string& name, const Tensor& t, DeviceBuffer* dst, bool required) -> Status {
    if (!required) states.emplace_back(dst->data(), DType::kF32, t.shape, b.device());
    const SafetensorsTensor* src = required || !foreign_state ? file.find(file_prefix + name) : nullptr;
    if (!src) {
      if (required) {
        // A file of a layer without that bias: the spec says so, not the file.
        const std::string hint = name.find("fc1_bias") != std::string::npos   ? "; a layer without fc1 biases says has_fc1_bias = false"
                                 : name.find("fc2_bias") != std::string::npos ? "; a layer without fc2 biases says has_fc2_bias = false"
                                                                              : "";
        return Status::NotFound(path + ": tensor " + quote_text(file_prefix + name) + " is missing (expected " +
                                t.shape.to_string() + ")" + hint);
      }
      state_missing |= !required;
      return Status::OK();
    }
    if (!is_floating(src->dtype) || !(src->shape == t.shape))
      return Status::InvalidArgument(path + ": tensor " + quote_text(src->name) + " is " + std::string(dtype_name(src->dtype)) +
                                     " " + src->shape.to_string() + ", this layer needs " + t.shape.to_string() +
                                     " of f32, f64, bf16 or f16 values");
    Copy c{src, dst, !required, {}};
    if (src->dtype != DType::kF32) {
      c.staged.resize(static_cast<size_t>(t.shape.numel()));
      TUTEL_RETURN_IF_ERROR(read_as_f32(*src, c.staged.data()).with_context(path));
    }
    copies.push_back(std::move(c));
    return Status::OK();
  };
  for (Tensor& t : tensors_) {
    TUTEL_RETURN_IF_ERROR(take(t.name, t, &t.value, true));
    if (t.state0.data()) TUTEL_RETURN_IF_ERROR(take(kState0Prefix + t.name, t, &t.state0, false));
    if (t.state1.data()) TUTEL_RETURN_IF_ERROR(take(kState1Prefix + t.name, t, &t.state1, false));
  }
  TUTEL_ASSIGN_OR_RETURN(int64_t step, step_of_file());
  std::vector<TensorView> fresh;
  if (state_missing) {
    std::erase_if(copies, [](const Copy& c) { return c.state; });
    fresh = std::move(states);
    step = 0;
  }
  auto device_lock = lock_device();
  ++params_version_;  // from the first write on (a failure after it leaves some replaced)
  for (const Copy& c : copies)
    TUTEL_RETURN_IF_ERROR(c.staged.empty() ? b.copy(c.dst->data(), c.src->data, c.src->nbytes, CopyKind::kHostToDevice)
                                           : b.copy(c.dst->data(), c.staged.data(), c.staged.size() * sizeof(float),
                                                    CopyKind::kHostToDevice));
  for (const TensorView& state : fresh) TUTEL_RETURN_IF_ERROR(b.fill_zero(state));
  step_ = step;
  return refresh_bf16_copies();
}

}  // namespace tutel::daemon
