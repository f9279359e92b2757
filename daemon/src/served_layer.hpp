// A layer that lives in the daemon: its parameters, gradients and optimizer state on one
// rank's backend, the forward passes waiting for their backward, and checkpoints.
//
// Thread-safety: every public method takes the layer's mutex; the backend it runs on is shared
// with other layers of the same rank and is serialised by the Rank's mutex (taken inside).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tutel/comm/communicator.hpp"
#include "tutel/comm/local_exchange.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/core/status.hpp"
#include "tutel/graphs/expert_parallel.hpp"
#include "tutel/graphs/plan_cache.hpp"
#include "tutel/daemon/config.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"
#include "fair_lock.hpp"
#include "rank_health.hpp"
#include "rank_thread.hpp"
#include "tenant_memory.hpp"

namespace tutel::daemon {

// With [cluster]: where the groups of this daemon's layers that have no coordinator meet (node 0's
// rendezvous service), and whether node 0 is up now.
struct GroupRendezvous {
  std::string host;
  uint16_t port = 0;
  // OK, or why node 0 (and so the service) is down. Any thread.
  std::function<Status()> node0_status;
};

// One device slot (a GPU, or a CPU virtual device) and the lock that serialises its use.
struct Rank {
  int index = 0;
  BackendOptions options;  // what `backend` was made with (group layers make their own alike)
  // A CPU rank's one thread for its ops (OpenMP's master; rank_thread.hpp); null on a device
  // rank. Before `backend`, which runs its ops there, so that it outlives it.
  std::unique_ptr<RankThread> thread;
  std::unique_ptr<Backend> backend;
  // Serialises the use of `backend`, shared by the tenants' layers by weighted fair share.
  FairLock lock;
  // Out of service once its device is lost, until the daemon restarts (rank_health.hpp).
  RankHealth health;
  // Shared by all ranks of the daemon: group layers here copy to each other directly.
  std::shared_ptr<comm::LocalExchange> local_exchange;
  // Null without [cluster]: a group layer without a coordinator is refused.
  std::shared_ptr<const GroupRendezvous> rendezvous;
  // Raised when the daemon shuts down: a group layer still waiting for its peers gives up then,
  // rather than holding the shutdown for up to its bootstrap_timeout_ms. Null: never raised.
  std::shared_ptr<const std::atomic<bool>> stopping;
  // Raised [server] shutdown_grace_ms after the shutdown began: a group layer's collectives
  // still waiting then give up (comm::BootstrapOptions::abandon). Null: never raised.
  std::shared_ptr<const std::atomic<bool>> abandon_collectives;
  // [server] peer_secret_file's secret, which a group's bootstrap proves; null: none.
  std::shared_ptr<const std::string> peer_secret;
};

// Where a request's buffers live: host memory (the session's arena), or memory of the layer's
// own device (a device region the client maps too), which the layer uses in place.
enum class ClientMemory : uint8_t { kHost, kDevice };

struct ForwardResult {
  RoutingStats stats;
};

class ServedLayer {
 public:
  // The training forwards a layer keeps waiting for their backwards, all sessions together;
  // past it a training forward is refused (ResourceExhausted).
  static constexpr size_t kMaxPendingForwards = 16384;

  // Builds the layer from its definition: weights from the Tutel-named safetensors file, or
  // initialised from init_seed as Tutel initialises them. `spec_text` is kept for checkpoints.
  // Its parameters (memory_bytes()) are charged to `memory` before they are allocated and until
  // the layer is gone; its activation memory (see activation_bytes()) as it is allocated.
  static Result<std::unique_ptr<ServedLayer>> create(const LayerDefinition& def, std::string spec_text,
                                                     std::shared_ptr<TenantMemory> memory, Rank& rank);
  // A layer whose activations are charged to a tenant of its own without a quota (tests).
  static Result<std::unique_ptr<ServedLayer>> create(const LayerDefinition& def, std::string spec_text,
                                                     std::string tenant, Rank& rank) {
    return create(def, std::move(spec_text), std::make_shared<TenantMemory>(std::move(tenant), ~uint64_t{0}), rank);
  }
  // On any thread (the last holder's): frees its buffers under the rank's lock.
  ~ServedLayer();

  const std::string& name() const { return def_.name; }
  const std::string& tenant() const { return tenant_; }
  const LayerDefinition& definition() const { return def_; }
  const std::string& spec_text() const { return spec_text_; }
  int rank_index() const { return rank_.index; }
  // The device its forwards and backwards run on (a group layer's own backend's).
  Device device() const { return group_ ? group_->backend->device() : rank_.backend->device(); }
  // Bytes of parameters, gradients and optimizer state.
  uint64_t memory_bytes() const { return parameter_charge_.bytes(); }
  // The most bytes a file that save() writes takes: the values and optimizer state, and a
  // header bound.
  uint64_t save_bytes_bound() const;
  // Bytes held for forwards: the plans (a layer without [group]; cached and in use), pending
  // and recycled entries (saved state, input), staging buffers, from the buffers' sizes. Any
  // thread, lock-free.
  uint64_t activation_bytes() const;
  // The part of activation_bytes() held by training forwards waiting for their backwards.
  uint64_t pending_bytes() const { return pending_bytes_; }
  int64_t step_count() const;
  int64_t pending_backwards() const;
  RoutingStats last_stats() const;
  // A layer without [group]: its plan cache after its last request (DESIGN §3 "Plans and
  // graphs"). Any thread. kind is "host" or "cuda-graph"; empty for a group layer.
  struct PlanSummary {
    std::string_view kind;
    graphs::PlanCacheStats cache;
  };
  PlanSummary plan_summary() const;
  // Whether the operator pinned the layer (tutelctl pin): its idle plans are then not dropped
  // for the tenant's other requests (trim_idle_plans), only to bring the tenant back under its
  // quota. Any thread. A group layer keeps no plans: pinning one is refused.
  Status set_pinned(bool pinned);
  bool pinned() const { return pinned_.load(std::memory_order_relaxed); }
  // Set when its client destroyed it (a request in flight may still hold it): its metrics series
  // are gone, and such a request must not bring them back.
  void mark_destroyed() { destroyed_.store(true, std::memory_order_release); }
  bool destroyed() const { return destroyed_.load(std::memory_order_acquire); }
  // How long the layer's requests (forward, backward, step) have waited, in all, for the layer
  // (another operation of it in progress: a group layer holds it for a whole collective) or its
  // device (another layer's operation on the same rank) before they could run: the queueing
  // inside the daemon's request latency. Any thread.
  double wait_seconds() const { return static_cast<double>(wait_ns_.load(std::memory_order_relaxed)) * 1e-9; }
  // Drops the plans no forward holds (a layer without [group]); returns the bytes given back.
  // For a training forward of the tenant that was refused for its quota: cached plans must not
  // crowd out a step (the data path drops every layer's of the tenant, then tries once more).
  uint64_t trim_idle_plans();
  // A group layer's last collective failure ("" while its peers answer).
  std::string group_error() const;
  // A group layer's other ranks: address, state, traffic. Empty for other layers. Any thread.
  std::vector<comm::PeerStatus> group_peers() const;
  // A group layer's tuner (r, all_to_all or pipeline "auto"): its candidates, and its dictionary
  // by capacity bucket. Empty for other layers. Any thread.
  std::vector<graphs::ExchangeConfig> group_tuner_candidates() const;
  std::vector<graphs::TunerEntry> group_tuner() const;

  // x [S, M] → y [S, O]. Host pointers (kHost) are staged through the layer's device buffers
  // on a backend whose memory is not host memory; kDevice pointers are on the layer's device
  // and used in place (y is complete on the device when this returns). With `training`, keeps what backward needs under
  // (`owner`, `sequence`); a sequence already pending is an error. Many training forwards may
  // wait for their backwards, which may come in any order, on a group layer too. A group
  // layer's forwards and backwards are collectives: every rank's client must issue them in the
  // same order (as pipelined micro-batches do), each backward at the same place on every rank.
  // A training forward whose new or larger entry would take the tenant over max_memory_bytes
  // (parameters + every layer's activation_bytes()) fails with ResourceExhausted before
  // allocating it, leaving no entry (the memory its entry had taken is given back).
  // `noise_key` (the client's kFlagNoiseKey): the gate noise is drawn from it rather than from
  // (step, sequence), so the trainer's recomputation of a forward draws its noise again; an
  // inference with one is routed as a training forward is (the noise drawn), keeping nothing.
  // A group layer draws no noise (its spec has none), so the key changes nothing there.
  Result<ForwardResult> forward(const float* x, int64_t tokens, float* y, bool training,
                                uint64_t owner, uint64_t sequence, ClientMemory memory = ClientMemory::kHost,
                                std::optional<uint64_t> noise_key = std::nullopt);
  // dy [S, O] → dx [S, M] for the training forward (`owner`, `sequence`), accumulating the
  // parameter gradients, or with `keep_param_grads` leaving them as they were (dx alone; on a
  // group layer every rank must ask alike, or the group refuses the step); the pending forward
  // is consumed.
  Status backward(const float* dy, int64_t tokens, float dl_aux, float* dx, uint64_t owner,
                  uint64_t sequence, ClientMemory memory = ClientMemory::kHost, bool keep_param_grads = false);
  // Drops every pending forward of `owner` (its session ended).
  void drop_pending(uint64_t owner);
  // A forward or backward request the daemon refuses before running it (the tenant's
  // max_inflight, a malformed descriptor): returns `why`. A group layer's steps are
  // collectives, so there this rank first joins the step's agreement as a rank that cannot run
  // it, and every rank refuses the step at once instead of waiting for this one until the
  // collective timeout (should the agreement itself fail, that failure is returned, naming
  // `why`). A refused backward consumes its forward on every rank: here too, when (`owner`,
  // `sequence`) names one. One that names none leaves this rank's forward pending (the peers'
  // is gone): its client is out of step with the group, as a client that skips a step is.
  Status refuse_step(bool backward, uint64_t owner, uint64_t sequence, Status why);
  // Drops the training forward (`owner`, `sequence`) that will never be backwarded, with what it
  // holds (ipc::Op::kDiscard). OK also when it is not pending. On a group layer too it is this
  // rank's alone, no collective: a forward's saved state is each rank's own, so ranks that drop
  // the same forward stay in step whenever each sends its discard (a collective would have to
  // come at the same point of every rank's program, which a finalizer cannot promise).
  Status discard(uint64_t owner, uint64_t sequence);

  // What one step applies in place of the spec's optimizer settings: a trainer's learning-rate
  // (or weight-decay) schedule. Finite, >= 0 and within f32 (0 is a schedule's end); the spec
  // keeps its own, and the next step without an override uses it.
  struct StepOverrides {
    std::optional<double> lr, weight_decay;
  };
  struct StepOutcome {
    int64_t step = 0;        // the step count after it
    bool applied = false;    // false: there were no gradients to apply (below)
    float lr = 0, weight_decay = 0;  // what it applied, or would have
  };
  // Applies the optimizer to the gradients accumulated since zero_grad. As torch's optimizers
  // step only parameters that have a gradient, a layer with none (no backward since its creation
  // or since zero_grad(set_to_none = true), or only backwards for dx alone: a frozen or unused
  // module) is left as it is, step count included: AdamW's weight decay and moments, and SGD's
  // momentum, would move it otherwise. On a group layer a collective, and every rank must pass
  // the same overrides and have gradients alike (InvalidArgument on every rank otherwise).
  Result<StepOutcome> step(const StepOverrides& overrides = {});
  // Zeroes the accumulated gradients. set_to_none (torch's default): they count as absent, so a
  // step before the next backward changes nothing; false: they are zeros that a step applies
  // (weight decay, momentum), as torch's zero_grad(set_to_none=False) leaves them.
  Status zero_grad(bool set_to_none = true);
  // The L2 norm of the accumulated gradients (every parameter of the layer; inf or NaN where one
  // is not finite). On a group layer it is the whole layer's, the same on every rank: a
  // collective, like step (the gate's gradient summed over the group, as step applies it).
  Result<double> grad_norm();
  // Multiplies the accumulated gradients by `factor` (finite): clipping, unscaling a loss scale.
  // This rank's alone; on a group layer every rank must scale by the same factor (the gate's
  // gradient is summed over the group at the step).
  Status scale_grads(double factor);
  // Parameters, optimizer state, step count and spec, written atomically.
  Status save(const std::string& path);
  // A periodic checkpoint ([server] checkpoint_interval_s): save(path) unless the parameters
  // are as this wrote them, or as they were restored from it, and a regular file is still at
  // `path` (an operator may have moved it away). True when it wrote the file.
  Result<bool> checkpoint_if_changed(const std::string& path);
  // The layer was restored from its checkpoint in state_dir: its parameters are that file's.
  void note_checkpointed();
  // Parameters (and optimizer state when present) from a file written by save() or a Tutel
  // state dict; shapes must match this layer.
  Status load(const std::string& path);
  // What save() writes (at most save_bytes_bound() bytes), into the client's `memfd` instead of
  // a file: its memory and its pages are the client's (write_safetensors_into says what it must
  // be). Returns the file's size.
  Result<uint64_t> export_state(int memfd);
  // What load() reads, from the safetensors file the memfd `fd` holds (check_memory_file):
  // mapped where it is sealed against shrinking and writing and has no hole, else read into
  // the daemon's memory first (a mapping could be truncated under the daemon, or allocate at a
  // hole); a file over import_bytes_bound() is refused unread. A file that fails a check leaves
  // the layer as it was.
  Status import_state(int fd);
  // The largest file import_state reads: this rank's tensors or, on a group layer, the whole
  // layer's, each with two optimizer states (a load ignores those the layer does not keep),
  // and a header with room for another layer's metadata and an export's page rounding.
  uint64_t import_bytes_bound() const;
  // The longest header it parses (within import_bytes_bound): this layer's header bound with
  // room for another layer's metadata and names.
  uint64_t import_header_bound() const;

 private:
  ServedLayer(LayerDefinition def, std::string spec_text, std::shared_ptr<TenantMemory> memory, Rank& rank)
      : def_(std::move(def)), spec_text_(std::move(spec_text)), tenant_(memory->tenant()),
        memory_(std::move(memory)), rank_(rank), rank_seat_(rank.lock, tenant_) {}

  struct Tensor {
    std::string name;   // Tutel parameter name
    Shape shape;
    DeviceBuffer value, grad, state0, state1;  // state: momentum, or exp_avg / exp_avg_sq
    // An expert weight's bf16 copy when the matmuls are bf16 (ExpertWeights): written whenever
    // the value is (initialisation, load, every step), so it never lags behind it.
    DeviceBuffer value_bf16;
    TensorView view(const DeviceBuffer& b, Device d) const { return TensorView(b.data(), DType::kF32, shape, d); }
    TensorView bf16_view(Device d) const { return TensorView(value_bf16.data(), DType::kBF16, shape, d); }
  };
  bool keeps_bf16_copy(const Tensor& t) const;
  // create() of a layer without [group]: allocates, builds its plan cache, loads or initialises.
  Status build_local();
  // Converts every value that keeps a bf16 copy into it; under the device lock.
  Status refresh_bf16_copies();
  // step()'s optimizer pass over every tensor (not the step count); under the device lock. A
  // group layer's gate steps with `gate_grad` (its gradient summed over the group).
  Status apply_optimizer(float lr, float weight_decay, TensorView gate_grad = {});
  // One training forward waiting for its backward; recycled, so its buffers only grow.
  struct Pending {
    // A layer without [group]: the plan the forward ran on (held, so no other step takes it
    // until this backward), and the forward's input on the backend's device (the client may
    // reuse its buffer; on a device this is also x's staging copy). A cuda-graph plan keeps x
    // in its own input buffer instead, so `x` stays empty there.
    graphs::PlanStep step;
    DeviceBuffer x;
    // A [group] layer: everything the expert-parallel backward needs, the input included.
    graphs::ExpertParallelLayer::Saved saved;
    uint64_t params_version = 0;  // params_version_ at the forward
    uint64_t bytes() const { return x.bytes() + (step.plan ? step.plan->bytes() : 0) + saved.bytes(); }
  };

  // A [group] layer: its own backend (collectives block, so it must not hold the rank's), its
  // communicators, and the expert-parallel step over them.
  struct Group {
    std::unique_ptr<Backend> backend;
    // Between the backend it wraps and the layer whose buffers it charges (member order is
    // destruction order).
    std::unique_ptr<ActivationBackend> activations;
    // UCX over host memory: the group's membership, and its collectives on a CPU rank.
    std::unique_ptr<comm::Communicator> host_comm;
    // On a GPU rank, NCCL over device memory (made through host_comm); null otherwise.
    std::unique_ptr<comm::Communicator> device_comm;
    // On a GPU rank, the CUDA graphs of the layer's phases (NCCL inside); null otherwise.
    std::unique_ptr<graphs::PhaseRunner> runner;
    std::optional<graphs::ExpertParallelLayer> layer;
    // The communicator the layer's collectives use.
    comm::Communicator& comm() { return device_comm ? *device_comm : *host_comm; }
  };

  Backend& backend() { return group_ ? *group_->backend : *rank_.backend; }
  // `st` of an op on backend(), with the device lock held (a group layer: the layer's): a
  // failure may mean the device is lost, which takes the rank out of service (RankHealth).
  Status watch_device(Status st) { return rank_.health.observe(rank_.index, backend(), std::move(st)); }
  // The backend forwards and backwards run on: backend(), with their allocations charged.
  ActivationBackend& activations() { return group_ ? *group_->activations : *local_activations_; }
  // The client's buffers are host memory: a backend whose memory is elsewhere gets its inputs
  // and outputs staged through device buffers.
  bool stages_host_memory() { return backend().device().kind != DeviceKind::kCpu; }
  // Not where the layer's plans take host memory as it is: a cuda-graph plan copies its inputs
  // and outputs between the client's (registered) buffers and its own, so staging would only
  // add a device-to-device copy each way.
  bool plans_take_host_memory() const { return plans_ && plan_kind_ == graphs::PlanKind::kCudaGraph; }
  bool stages(ClientMemory memory) {
    return memory == ClientMemory::kHost && stages_host_memory() && !plans_take_host_memory();
  }
  // Whether taking a lock adds the time it took to wait_ns_: only for the layer's requests, not
  // for the operator's and the daemon's own operations on it (a checkpoint, a trim of its idle
  // plans for another layer's forward, its teardown).
  enum class Waits : bool { kUncounted, kCounted };
  // The rank's backend is shared by its layers; a group layer's is its own.
  std::unique_lock<FairLock::Seat> lock_device(Waits waits = Waits::kUncounted) {
    return group_ ? std::unique_lock<FairLock::Seat>() : lock_mutex(rank_seat_, waits);
  }
  // Runs f where the rank's ops run, with lock_device() held: on the rank's thread (a CPU rank,
  // rank_thread.hpp), so that a request's ops run there inline rather than each be handed over,
  // or here (a device rank; a group layer, whose ops run on its own backend).
  template <typename F>
  std::invoke_result_t<F&> on_rank(F&& f) {
    return rank_.thread && !group_ ? rank_.thread->run(f) : f();
  }
  Status join_group();
  // The tuner decisions of the record this layer resumed with (LayerDefinition::resumed_tuning)
  // that hold for a rank on `measured_on` with `candidates`; none (and a warning saying why)
  // where they do not.
  // What a tuning record's decisions were measured on: the device, and the group's layout (ranks,
  // ranks per node), which decide what the exchanges cost as much as the device does (a group
  // moved from one node to four reused decisions measured over shared memory).
  std::string tuning_context(const Backend& backend) const;
  std::vector<graphs::TunerDecision> restored_decisions(const std::string& measured_on,
                                                        const std::vector<graphs::ExchangeConfig>& candidates) const;
  // After a group layer's parameters are in place (`ready_here`: this rank allocated and loaded
  // or initialised them): every rank got that far, and holds the same gate and optimizer, which
  // every rank routes and steps with. All-gathered over the group; all refuse together otherwise.
  Status confirm_group(const Status& ready_here);
  void publish_pending() {  // under mutex_
    pending_count_ = static_cast<int64_t>(pending_.size());
  }
  // Counts `p` in (or out of) pending_bytes_ and the tenant's; under mutex_.
  void add_pending_bytes(const Pending& p) {
    pending_bytes_ += p.bytes();
    memory_->add_pending(p.bytes());
  }
  void remove_pending_bytes(uint64_t bytes) {
    pending_bytes_ -= bytes;
    memory_->remove_pending(bytes);
  }
  // Sessions whose drop_pending() found a group layer's mutex_ held: their entries are dropped
  // by whoever holds it, on the way out of its operation (LayerLock).
  std::mutex orphans_mutex_;
  std::vector<uint64_t> orphaned_owners_;  // guarded by orphans_mutex_
  std::atomic<bool> has_orphans_{false};   // orphaned_owners_ is not empty: one load per operation
  void drop_orphans_locked();              // under mutex_
  void drop_pending_locked(uint64_t owner);  // under mutex_
  // mutex_, as every operation takes it; on the way out, still holding it, drops the entries of
  // sessions that closed meanwhile.
  class LayerLock {
   public:
    explicit LayerLock(ServedLayer& layer, Waits waits = Waits::kUncounted)
        : layer_(layer), lock_(layer.lock_mutex(layer.mutex_, waits)) {}
    ~LayerLock() {
      if (layer_.has_orphans_.load(std::memory_order_acquire)) layer_.drop_orphans_locked();
    }
    LayerLock(const LayerLock&) = delete;
    LayerLock& operator=(const LayerLock&) = delete;

   private:
    ServedLayer& layer_;
    std::unique_lock<std::mutex> lock_;
  };
  // `m` locked; with kCounted, the time it took, when it was held, added to wait_ns_ (the clock
  // is read only then: an uncontended lock costs one try_lock).
  template <typename Mutex>
  std::unique_lock<Mutex> lock_mutex(Mutex& m, Waits waits) {
    if (waits == Waits::kUncounted) return std::unique_lock<Mutex>(m);
    std::unique_lock<Mutex> lock(m, std::try_to_lock);
    if (!lock.owns_lock()) {
      const auto begin = std::chrono::steady_clock::now();
      lock.lock();
      const auto waited = std::chrono::steady_clock::now() - begin;
      wait_ns_.fetch_add(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count()),
                         std::memory_order_relaxed);
    }
    return lock;
  }
  std::atomic<uint64_t> wait_ns_{0};
  std::unique_ptr<Pending> take_pending();         // a recycled entry, or a new one; under mutex_
  void recycle(std::unique_ptr<Pending> pending);  // under mutex_
  Shape shape_of(const std::string& name) const;  // this rank's shape of a parameter
  Status allocate();
  Status initialise(uint64_t seed);
  // This rank's values (which = 0) or optimizer state `which` - 1, host → device.
  Status copy_in(const graphs::HostLayerParams& p, int which = 0);
  LayerWeights weights_of(int which) const;  // 0 = values, 1 = gradients
  Status load_locked(const std::string& path);
  Status load_file_locked(const SafetensorsFile& file);
  Status load_file(const SafetensorsFile& file);  // load_file_locked under the layer's lock
  Status save_locked(const std::string& path);  // save() under the layer's lock
  // What save() and export_state() write: each parameter, then its optimizer states.
  struct SavedTensor {
    std::string name;
    const Shape* shape;
    const DeviceBuffer* value;
  };
  std::vector<SavedTensor> saved_tensors() const;
  std::map<std::string, std::string> saved_metadata() const;
  // The saved tensors as a writer takes them, under the layer's lock: host tensors with their
  // data, a device's without and a fill that stages them.
  struct StateWriter {
    std::vector<SavedTensor> saved;
    std::vector<SafetensorsEntry> entries;
    SafetensorsFill fill;
  };
  StateWriter state_writer();
  // A view of the client's `in`, or, when staging, of `buf` (grown to fit) after copying `in`
  // into it. The copy reads the client's arena, which its rank pinned (HostRegistration) and
  // unpins waiting for the rank's stream alone: a request staged on a group layer's own stream
  // must drain that stream before it returns, on success and failure alike (unstage_out, or a
  // synchronize on the way out), or the arena could be unpinned under a copy in flight.
  Result<TensorView> stage_in(const float* in, Shape shape, DeviceBuffer& buf, ClientMemory memory);
  // A view of the client's `out`, or, when staging, of `buf` (grown to fit) for unstage_out to
  // copy back.
  Result<TensorView> stage_out(float* out, Shape shape, DeviceBuffer& buf, ClientMemory memory);
  // Makes the result the client's: copies it back when staged, else waits until it is complete.
  Status unstage_out(float* out, const TensorView& result, ClientMemory memory);

  LayerDefinition def_;
  std::string spec_text_;
  std::string tenant_;
  std::shared_ptr<TenantMemory> memory_;
  // The parameters (memory_bytes()) charged to the tenant. Before the tensors, so it is given back after they are
  // freed.
  ParameterCharge parameter_charge_;
  Rank& rank_;
  // The tenant's way to rank_.lock (lock_device); before teardown_lock_, which holds it.
  FairLock::Seat rank_seat_;
  // Before the tensors: they hold buffers of the group's backend and must be freed first.
  std::unique_ptr<Group> group_;
  // Taken by ~ServedLayer and held while every member below is destroyed: they free buffers of
  // the rank's backend, whose device pool the rank's other layers use under the same lock (a
  // CUDA pool is not thread-safe, and a free may synchronise the stream another layer is
  // capturing on). A group layer's backend is its own: no lock.
  std::unique_lock<FairLock::Seat> teardown_lock_;
  mutable std::mutex mutex_;
  std::vector<Tensor> tensors_;  // gate, fc1_w, fc1_b?, fc2_w, fc2_b?
  // grad_norm()'s sum of squares, one f32, allocated with the parameters (charged with them):
  // a norm is never refused for want of its 4 bytes. A group layer's is its ExpertParallelLayer's.
  DeviceBuffer grad_norm_sum_;
  // A group layer's gate gradient summed over the group for a step (the rank's own stays its
  // share): [E, M] f32, allocated and charged with the parameters.
  DeviceBuffer summed_gate_grad_;
  // Whether the gradients are there for a step to apply (see step()); guarded by mutex_.
  bool grads_present_ = false;
  // Counts the changes of the parameters (a step applied, a load or import): a training forward
  // records it, and its backward is refused once it moved (see backward()); guarded by mutex_.
  uint64_t params_version_ = 0;
  // params_version_ as the last periodic checkpoint wrote it (or the restore read it); guarded
  // by mutex_.
  std::optional<uint64_t> checkpointed_version_;
  // Read by the admin socket on the event loop: never behind mutex_, which a group layer holds
  // while it waits on its peers.
  std::atomic<int64_t> step_{0};
  std::atomic<int64_t> pending_count_{0};
  std::atomic<uint64_t> pending_bytes_{0};
  std::atomic<bool> pinned_{false};
  std::atomic<bool> destroyed_{false};
  mutable std::mutex stats_mutex_;
  RoutingStats last_stats_;  // guarded by stats_mutex_
  std::string group_error_;  // guarded by stats_mutex_
  // Records a failed collective of a group layer (peer gone, timeout) for tutelctl peers.
  Status note_group_status(Status st);
  // refuse_step on a group layer, with mutex_ and the device held.
  Status refuse_group_step(bool backward, uint64_t owner, uint64_t sequence, Status why);
  // A layer without [group]: the rank's backend, charging the buffers below. Before them, as
  // they are freed through it.
  std::unique_ptr<ActivationBackend> local_activations_;
  // After group_: a group layer's entries hold buffers of its backend.
  std::map<std::pair<uint64_t, uint64_t>, std::unique_ptr<Pending>> pending_;
  std::vector<std::unique_ptr<Pending>> recycled_;
  // A layer without [group]: every forward and backward runs on a plan of its token bucket
  // (host plans on the CPU, CUDA graphs on a GPU), built through local_activations_ so their
  // buffers are charged to the tenant. After pending_: destroyed first, its held plans live on
  // in the entries until those go.
  std::unique_ptr<graphs::PlanCache> plans_;
  graphs::PlanCacheStats plan_stats_;  // guarded by stats_mutex_
  // The kind its plans are (host, cuda-graph); set before the layer is published.
  graphs::PlanKind plan_kind_ = graphs::PlanKind::kHost;
  void publish_plan_summary();  // under mutex_
  // Builds the inference and training plans of the definition's token_buckets; at creation.
  Status prebuild_plans();
  // Drops the idle plans while the tenant is over its quota, so what a request let through
  // lasts only that request (as recycle() does for pending entries). Under mutex_.
  void trim_plans_over_quota();
  // Staging on a device backend, under mutex_: an inference x or a backward dy (in), y or dx
  // (out). A training forward's x is staged in its Pending entry instead, since its backward
  // needs it later. Grow-only.
  DeviceBuffer staged_in_, staged_out_;
};

}  // namespace tutel::daemon
