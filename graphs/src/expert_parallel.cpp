#include "tutel/graphs/expert_parallel.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "chunk_pipeline.hpp"
#include "tutel/core/fingerprint.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::graphs {
namespace {

// A buffer's address, for the communicator and Backend::copy: device memory, which the host
// never reads or writes here.
float* fp(const DeviceBuffer& b) { return static_cast<float*>(b.data()); }
std::byte* bytes_of(const DeviceBuffer& b) { return static_cast<std::byte*>(b.data()); }

}  // namespace

Result<ExpertShard> expert_shard(const LayerSpec& spec, int world, int rank) {
  TUTEL_RETURN_IF_ERROR(spec.validate());
  if (world < 1 || rank < 0 || rank >= world)
    return Status::InvalidArgument("rank " + std::to_string(rank) + " of a group of " +
                                   std::to_string(world));
  ExpertShard s;
  s.world = world;
  s.rank = rank;
  const int64_t E = spec.experts, W = world;
  if (E >= W) {
    if (E % W != 0)
      return Status::InvalidArgument(std::to_string(E) + " experts do not split evenly over " +
                                     std::to_string(W) +
                                     " ranks; use a group size that divides the expert count");
    s.local_experts = E / W;
    s.first_expert = rank * s.local_experts;
    s.shards = 1;
    s.hidden_shard = spec.hidden;
  } else {
    if (W % E != 0)
      return Status::InvalidArgument("a group of " + std::to_string(W) + " ranks cannot shard " +
                                     std::to_string(E) +
                                     " experts evenly; use a multiple of the expert count");
    s.shards = W / E;
    if (spec.hidden % s.shards != 0)
      return Status::InvalidArgument("hidden = " + std::to_string(spec.hidden) +
                                     " does not split into " + std::to_string(s.shards) +
                                     " shards per expert");
    s.local_experts = 1;
    s.first_expert = rank / s.shards;
    s.shard_index = rank % s.shards;
    s.hidden_shard = spec.hidden / s.shards;
  }
  s.out_shard = (spec.out_dim() + s.shards - 1) / s.shards;
  return s;
}

Shape local_fc1_shape(const LayerSpec& spec, const ExpertShard& s) {
  return {s.local_experts, s.hidden_shard, spec.model_dim};
}
Shape local_fc2_shape(const LayerSpec& spec, const ExpertShard& s) {
  return {s.local_experts, s.hidden_shard, spec.out_dim()};
}
Shape local_fc1_bias_shape(const LayerSpec&, const ExpertShard& s) {
  return {s.local_experts, s.hidden_shard};
}
Shape local_fc2_bias_shape(const LayerSpec&, const ExpertShard& s) {
  return {s.local_experts, s.out_shard};
}

HostLayerParams slice_for_rank(const LayerSpec& spec, const ExpertShard& s,
                               const HostLayerParams& whole) {
  const int64_t M = spec.model_dim, H = spec.hidden, O = spec.out_dim(), Hs = s.hidden_shard;
  HostLayerParams out;
  out.gate = whole.gate;
  for (int64_t l = 0; l < s.local_experts; ++l) {
    const int64_t e = s.first_expert + l, h0 = s.shard_index * Hs;
    out.fc1.insert(out.fc1.end(), whole.fc1.begin() + (e * H + h0) * M,
                   whole.fc1.begin() + (e * H + h0 + Hs) * M);
    out.fc2.insert(out.fc2.end(), whole.fc2.begin() + (e * H + h0) * O,
                   whole.fc2.begin() + (e * H + h0 + Hs) * O);
    if (!whole.fc1_bias.empty())
      out.fc1_bias.insert(out.fc1_bias.end(), whole.fc1_bias.begin() + e * H + h0,
                          whole.fc1_bias.begin() + e * H + h0 + Hs);
    if (!whole.fc2_bias.empty()) {
      // Tutel's layout: shard j holds columns [j·O_s, (j+1)·O_s) of the bias, zero-padded.
      for (int64_t c = 0; c < s.out_shard; ++c) {
        const int64_t o = s.shard_index * s.out_shard + c;
        out.fc2_bias.push_back(o < O ? whole.fc2_bias[e * O + o] : 0.f);
      }
    }
  }
  return out;
}

Result<ExpertParallelLayer> ExpertParallelLayer::create(Backend& backend, comm::Communicator& comm,
                                                        const LayerSpec& spec,
                                                        comm::AllToAllAlgo algo) {
  ExpertParallelOptions options;
  options.algo = algo;
  return create(backend, comm, spec, options);
}

namespace {

// The configurations a layer may run: the tuner's candidates, or the one it was given.
std::vector<ExchangeConfig> configurations(const ExpertParallelOptions& options) {
  return !options.tune.candidates.empty()
             ? options.tune.candidates
             : std::vector<ExchangeConfig>{{options.algo, options.pipeline, options.r}};
}

// Everything a rank may refuse at creation, alone.
Status check_options(const comm::Communicator& comm, const LayerSpec& spec,
                     const ExpertParallelOptions& options) {
  if (options.runner != nullptr && options.runner->captures() && !options.comm_on_backend_queue)
    return Status::InvalidArgument(
        "a runner that captures graphs needs a communicator that enqueues on the backend's queue "
        "and returns (NCCL on the backend's stream with synchronize = false, and "
        "comm_on_backend_queue = true): a collective that waits cannot be captured");
  if (spec.gate_noise > 0)
    return Status::Unimplemented(
        "gate noise is not supported across an expert-parallel group yet; set gate_noise = 0");
  TUTEL_ASSIGN_OR_RETURN(const ExpertShard shard, expert_shard(spec, comm.size(), comm.rank()));
  const int64_t s = shard.shards;
  for (const ExchangeConfig& c : configurations(options)) {
    if (c.r < 0 || (c.r > 0 && s % c.r != 0))
      return Status::InvalidArgument(
          "parallelism r = " + std::to_string(c.r) + " does not fit this group: r is 0 (data "
          "parallel) or a divisor of the " + std::to_string(s) + " rank(s) that share each expert (" +
          (s == 1 ? "E >= W: each rank holds whole experts, so r is 0 or 1)"
                  : "W / E; r = " + std::to_string(s) + " splits its H over all of them)"));
    if (c.r == 0) continue;  // no all-to-all, no chunks
    // Each chunk of the capacity is split among the s / r ranks of a gather group, so the
    // capacity must be a multiple of it: the alignment s is, unless s > 256 rounds it to 128s.
    if (c.r < s && s > 256 && s % 128 != 0)
      return Status::InvalidArgument(
          "parallelism r = " + std::to_string(c.r) + " < s = " + std::to_string(s) +
          " needs the capacity to be a multiple of s / r, which the capacity alignment gives only "
          "for s <= 256 or a multiple of 128; use r = " + std::to_string(s) + " or r = 0");
    if (c.algo == comm::AllToAllAlgo::k2DH && comm.size() % comm.local_size() != 0)
      return Status::InvalidArgument(
          "the 2dh all-to-all needs the group's local_size (" + std::to_string(comm.local_size()) +
          ") to divide its size (" + std::to_string(comm.size()) +
          "): it exchanges within each node, then across nodes; use the linear all-to-all, or a "
          "local_size that divides the group size");
    if (c.pipeline < 1 || c.pipeline > kMaxPipeline)
      return Status::InvalidArgument("pipeline degree " + std::to_string(c.pipeline) +
                                     " is outside [1, " + std::to_string(kMaxPipeline) + "]");
  }
  return Status::OK();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string out;
  for (int r : ranks) out += (out.empty() ? "" : ", ") + std::to_string(r);
  return out;
}

// The version of what a group's ranks exchange at each call (the agreements and what follows
// them, and the creation's own words below): moves whenever that changes. 2: stop 25's tagged
// agreements and numbered forwards. 3: the restored tuner decisions' word at creation. 4: a
// step's agreement carries values every rank must pass alike (all_reduce_gate_grad), and the
// creation's words are padded to a fixed width. 5: a layer of at most kMaxAgreedCounts experts
// agrees on the experts' counts at each forward (every agreement is E values wider). 6: that
// limit went from 64 experts to 512.
constexpr int64_t kGroupProtocolVersion = 6;

// The tuner decisions a rank restored, as one word the ranks compare: 0 for none.
uint64_t restored_fingerprint(const std::vector<TunerDecision>& decided) {
  if (decided.empty()) return 0;
  Fingerprint f;
  f.add(decided.size());
  for (const TunerDecision& d : decided) {
    f.add(d.capacity_bucket).add(d.chosen);
    for (int64_t t : d.total_ns) f.add(t);
    for (bool x : d.excluded) f.add(x);
  }
  return f.value() == 0 ? 1 : f.value();
}

// Every rank must run the same layer the same way: a rank that differs would pair its
// collectives with other sizes or in another order (wrong results where the sizes agree, a
// timeout elsewhere). So the ranks all-gather three fingerprints (the spec; how it runs; the
// group protocol of their build) and whether each could create the layer at all, and all refuse
// together, each saying why: a rank that refused alone would leave its peers waiting in their
// first collective. A fifth word, the tuner decisions each rank restored, refuses nothing:
// where they differ, `restored_differ` lists the ranks (compared with rank 0), and every rank
// measures afresh. The words are padded to kWords, so that a later build's words fit in the same
// all-gather and its protocol word tells the ranks apart: builds that gathered fewer bytes
// (group protocol 3 and before) fail in this all-gather itself, as differently sized
// collectives (UCX refuses the size; NCCL, which checks nothing, waits until its timeout).
Status compare_with_group(Backend& backend, comm::Communicator& comm, const LayerSpec& sp,
                          const ExpertParallelOptions& options, const Status& valid_here,
                          std::vector<int>& restored_differ) {
  const int W = comm.size();
  restored_differ.clear();
  if (W == 1) return valid_here;
  Fingerprint spec;
  spec.add(sp.experts).add(sp.model_dim).add(sp.hidden).add(sp.out_dim()).add(sp.k);
  spec.add(sp.capacity_factor).add(sp.activation).add(sp.normalize_gate).add(sp.batch_prioritized);
  spec.add(sp.is_postscore).add(sp.has_fc1_bias).add(sp.has_fc2_bias).add(sp.matmul_dtype);
  spec.add(sp.gate_noise);
  Fingerprint how;
  for (const ExchangeConfig& c : configurations(options)) {
    how.add(c.r);
    if (c.r != 0) how.add(c.algo).add(c.pipeline);  // r = 0 runs no all-to-all, no chunks
  }
  const bool tuning = options.tune.candidates.size() >= 2;
  how.add(tuning);
  if (tuning) how.add(options.tune.warmups).add(options.tune.trials);
  // A rank that captures graphs agrees on how to run each phase: one more collective.
  how.add(options.runner != nullptr && options.runner->captures());
  // What the ranks' agreements look like: a daemon whose calls open with other agreements
  // would pair them with all-reduces of another size or meaning.
  Fingerprint wire;
  wire.add(kGroupProtocolVersion).add(static_cast<int64_t>(ExpertParallelLayer::agreement_width(sp)));
  constexpr size_t kWords = 8;  // 5 in use, 3 kept for later builds (zero)
  const uint64_t mine[kWords] = {spec.value(), how.value(), wire.value(), valid_here.ok() ? 1u : 0u,
                                 restored_fingerprint(options.tune.decided)};
  std::vector<uint64_t> all(kWords * static_cast<size_t>(W));
  // Through the backend's memory, as every collective here (NCCL takes device memory only).
  // A rank that cannot even stage its words cannot join the all-gather its peers wait in: it
  // gives the communicator up, so they fail now rather than at the collective timeout.
  DeviceBuffer buf;
  const Status staged = [&]() -> Status {
    TUTEL_ASSIGN_OR_RETURN(buf, backend.allocate((all.size() + kWords) * sizeof(uint64_t)));
    TUTEL_RETURN_IF_ERROR(backend.copy(static_cast<uint64_t*>(buf.data()) + all.size(), mine, sizeof mine,
                                       CopyKind::kHostToDevice));
    return options.comm_on_backend_queue ? Status::OK() : backend.synchronize();
  }();
  if (!staged.ok()) {
    comm.give_up(staged);
    return staged.with_context("staging this rank's layer fingerprint for the group");
  }
  uint64_t* gathered = static_cast<uint64_t*>(buf.data());
  TUTEL_RETURN_IF_ERROR(comm.all_gather(gathered + all.size(), gathered, sizeof mine));
  if (options.comm_on_backend_queue) TUTEL_RETURN_IF_ERROR(comm.wait_enqueued());
  TUTEL_RETURN_IF_ERROR(
      backend.copy(all.data(), gathered, all.size() * sizeof(uint64_t), CopyKind::kDeviceToHost));
  if (!valid_here.ok()) return valid_here;
  std::vector<int> refused, spec_differs, how_differs, wire_differs;
  for (int r = 0; r < W; ++r) {
    const uint64_t* theirs = all.data() + kWords * r;
    if (theirs[3] == 0) refused.push_back(r);
    if (r > 0 && theirs[0] != all[0]) spec_differs.push_back(r);
    if (r > 0 && theirs[1] != all[1]) how_differs.push_back(r);
    if (r > 0 && theirs[2] != all[2]) wire_differs.push_back(r);
    if (r > 0 && theirs[4] != all[4]) restored_differ.push_back(r);
  }
  std::vector<std::string> why;
  if (!refused.empty())
    why.push_back("rank(s) " + rank_list(refused) +
                  " could not create it (their own errors say why)");
  if (!wire_differs.empty()) {
    // Another build may fingerprint the spec and the options otherwise: only this is sure.
    why.push_back("compared with rank 0, rank(s) " + rank_list(wire_differs) +
                  " run a tuteld whose group protocol differs (upgrade every daemon of the group alike)");
  } else {
    if (!spec_differs.empty())
      why.push_back("compared with rank 0, rank(s) " + rank_list(spec_differs) +
                    " differ in the layer spec");
    if (!how_differs.empty())
      why.push_back("compared with rank 0, rank(s) " + rank_list(how_differs) +
                    " differ in how it runs (r, all_to_all, pipeline or tuning)");
  }
  if (why.empty()) return Status::OK();
  std::string message = "no rank of this expert-parallel group creates the layer: ";
  for (size_t i = 0; i < why.size(); ++i) message += (i ? "; " : "") + why[i];
  return Status::InvalidArgument(message + ". Every rank must be given the same layer");
}

}  // namespace

// The communicators of the gather groups, one per q = s / r > 1 the layer may run (groups of q
// consecutive ranks, as Tutel's). The runner's graphs may hold their collectives, and NCCL waits
// for every such graph to die before it destroys a communicator, forever while the runner keeps
// it: so the graphs are dropped before the communicators go, and (each group's release) before
// one of them aborts.
class ExpertParallelLayer::GatherGroups {
 public:
  explicit GatherGroups(PhaseRunner* runner)
      : runner_(runner != nullptr && runner->captures() ? runner : nullptr) {}
  GatherGroups(const GatherGroups&) = delete;
  GatherGroups& operator=(const GatherGroups&) = delete;
  ~GatherGroups() {
    if (runner_ != nullptr && !groups_.empty()) runner_->clear();
  }

  // Collective over `comm`: every rank adds the same splits in the same order.
  Status add(comm::Communicator& comm, int64_t split) {
    if (find(split) != nullptr) return Status::OK();
    const int rank = comm.rank();
    TUTEL_ASSIGN_OR_RETURN(
        std::unique_ptr<comm::Communicator> made,
        comm.split(static_cast<int>(rank / split), static_cast<int>(rank % split)));
    if (made == nullptr || made->size() != split)
      return Status::Internal("splitting the group into its gather groups of " +
                              std::to_string(split) + " ranks gave another group");
    Group& g = groups_.emplace_back();
    g.split = split;
    g.comm = std::move(made);
    if (runner_ != nullptr)
      g.release = comm::GraphRelease(*g.comm, [runner = runner_] { runner->clear(); });
    comms_.push_back(g.comm.get());
    return Status::OK();
  }
  comm::Communicator* find(int64_t split) const {
    for (const Group& g : groups_)
      if (g.split == split) return g.comm.get();
    return nullptr;
  }
  const std::vector<comm::Communicator*>& all() const { return comms_; }

 private:
  struct Group {
    int64_t split = 0;
    std::unique_ptr<comm::Communicator> comm;
    comm::GraphRelease release;  // after comm: unregisters while comm is alive
  };
  PhaseRunner* runner_;  // only one that captures
  std::vector<Group> groups_;
  std::vector<comm::Communicator*> comms_;  // groups_' communicators, in order
};

// A pipelined phase's exchanges run on the layer's worker thread beside the GEMMs only here. The
// worker calls Backend::copy and Backend::add (summing shards): on the CPU backend both are
// stateless (a memcpy, an elementwise loop on the calling thread's own OpenMP team), safe beside
// its other ops. A queue-ordered backend (CUDA) would need a second stream and events instead;
// not built.
bool ExpertParallelLayer::chunks_overlap(const Backend& backend,
                                         const ExpertParallelOptions& options) {
  return backend.device().kind == DeviceKind::kCpu && !options.comm_on_backend_queue;
}

bool ExpertParallelLayer::overlaps_chunks() const {
  return backend_->device().kind == DeviceKind::kCpu && !comm_on_backend_queue_;
}

Result<ExpertParallelLayer> ExpertParallelLayer::create(Backend& backend, comm::Communicator& comm,
                                                        const LayerSpec& spec,
                                                        const ExpertParallelOptions& options) {
  Status valid = check_options(comm, spec, options);
  std::unique_ptr<ExchangeTuner> tuner;
  if (valid.ok() && options.tune.candidates.size() >= 2) {
    Result<ExchangeTuner> made = ExchangeTuner::create(options.tune);
    if (made.ok())
      tuner = std::make_unique<ExchangeTuner>(std::move(made).value());
    else
      valid = made.status();
  }
  // The worker thread starts here, before the group compares, so that a rank that cannot start
  // it refuses together with its peers rather than in the middle of a phase.
  std::unique_ptr<ExchangeWorker> worker;
  const std::vector<ExchangeConfig> configs = configurations(options);
  const bool chunked = std::any_of(configs.begin(), configs.end(), [](const ExchangeConfig& c) {
    return c.r >= 1 && c.pipeline > 1;
  });
  if (valid.ok() && chunked && ExpertParallelLayer::chunks_overlap(backend, options)) {
    try {
      worker = std::make_unique<ExchangeWorker>();
    } catch (const std::exception& e) {
      valid = Status::ResourceExhausted(
          std::string("could not start the layer's exchange thread: ") + e.what());
    }
  }
  // The agreements' buffer, allocated up front: an agreement must never fail for memory, or a
  // rank refused there would leave its peers waiting in the collective; and before the group
  // compares, so a rank that cannot allocate it refuses with its peers. The widest of the
  // tagged agreements (agree) and the tuner's (one value per candidate).
  // The gradient norm's all-reduce buffer likewise ([E·M] gate gradient, one sum of squares).
  DeviceBuffer agreed, grad_norm;
  for (auto [buffer, bytes] : {std::pair{&agreed, std::max<size_t>(agreement_width(spec), TunerOptions::kMaxCandidates) * sizeof(int64_t)},
                               std::pair{&grad_norm, static_cast<size_t>(spec.experts * spec.model_dim + 1) * 4}}) {
    if (!valid.ok()) break;
    Result<DeviceBuffer> made = backend.allocate(bytes);
    if (made.ok())
      *buffer = std::move(made).value();
    else
      valid = made.status();
  }
  std::vector<int> restored_differ;
  TUTEL_RETURN_IF_ERROR(compare_with_group(backend, comm, spec, options, valid, restored_differ));

  TUTEL_ASSIGN_OR_RETURN(ExpertShard shard, expert_shard(spec, comm.size(), comm.rank()));
  LayerSpec s = spec;
  // Tutel aligns the capacity to s·d. Here d may change from step to step (the tuner), and the
  // capacity must not (it decides which tokens drop): the chunks are cut from whatever capacity
  // the group agrees on instead, so the alignment stays s.
  s.alignment = shard.shards;
  ExpertParallelLayer layer(backend, comm, s, shard, options);
  layer.fixed_ = configs[0];  // a single candidate is what runs
  layer.local_in_use_.assign(static_cast<size_t>(shard.local_experts), 1);
  layer.worker_ = std::move(worker);
  layer.tuner_ = std::move(tuner);
  if (!restored_differ.empty()) {
    // Decisions one rank holds and another does not would pair different ways of running the
    // same bucket: all ranks forget theirs alike (measuring again costs a few steps).
    if (layer.tuner_) layer.tuner_->forget_restored();
    layer.restored_tuning_ = Status::Aborted(
        "compared with rank 0, rank(s) " + rank_list(restored_differ) +
        " restored other tuner decisions (another checkpoint, or none): every rank measures again");
  }
  if (options.runner != nullptr && options.runner->captures())
    layer.graph_release_ = comm::GraphRelease(comm, [runner = options.runner] { runner->clear(); });
  layer.agreed_ = std::move(agreed);
  layer.grad_norm_ = std::move(grad_norm);
  // The gather groups. Each split is a collective: a rank whose split failed here alone (its
  // new communicator could not start) still joins every later one, then the group agrees on
  // whether every rank has its groups, and all refuse the layer together if one does not.
  Status groups_made;
  bool splits = false;
  for (const ExchangeConfig& c : configs)
    if (c.r >= 1 && shard.shards / c.r > 1) {
      splits = true;
      Status made = layer.gather_groups_->add(comm, shard.shards / c.r);
      if (groups_made.ok() && !made.ok())
        groups_made = made.with_context("creating the layer's gather groups (r = " +
                                        std::to_string(c.r) + ")");
    }
  if (!splits) return layer;
  int64_t failed[1] = {groups_made.ok() ? 0 : 1};
  TUTEL_RETURN_IF_ERROR(layer.agree_on_max(failed, 1));
  if (!groups_made.ok()) return groups_made;
  if (failed[0] != 0)
    return Status::Unavailable(
        "another rank of the expert-parallel group could not make its gather groups (its own "
        "error says why), so every rank refuses the layer");
  return layer;
}

ExpertParallelLayer::ExpertParallelLayer(Backend& b, comm::Communicator& c, LayerSpec spec,
                                         ExpertShard shard, const ExpertParallelOptions& options)
    : backend_(&b),
      comm_(&c),
      spec_(spec),
      shard_(shard),
      runner_(options.runner),
      comm_on_backend_queue_(options.comm_on_backend_queue),
      gather_groups_(std::make_unique<GatherGroups>(options.runner)) {}

ExpertParallelLayer::ExpertParallelLayer(ExpertParallelLayer&&) noexcept = default;
ExpertParallelLayer& ExpertParallelLayer::operator=(ExpertParallelLayer&&) noexcept = default;
ExpertParallelLayer::~ExpertParallelLayer() = default;

ExpertParallelLayer::ExpertSide ExpertParallelLayer::expert_side(int r) const {
  ExpertSide side;
  side.split = r >= 1 ? shard_.shards / r : 1;  // r divides s (checked at creation)
  side.hidden = shard_.hidden_shard * side.split;
  if (side.split > 1) side.gather = gather_groups_->find(side.split);
  TUTEL_CHECK(side.split == 1 || side.gather != nullptr)
      << "r = " << r << " has no gather group: it was not among the ways the layer was created for";
  return side;
}

int ExpertParallelLayer::chunk_count(int64_t C, int d, int64_t q) const {
  return static_cast<int>(std::clamp<int64_t>(C / q, 1, d));
}

ExpertParallelLayer::Chunk ExpertParallelLayer::chunk(int64_t C, int count, int j,
                                                      int64_t q) const {
  // Chunk j holds units [j·U/count, (j+1)·U/count) of U = C/q units of q slots (C is a multiple
  // of q, the alignment s is): sizes differ by at most one unit, none empty.
  const int64_t units = C / q, c0 = q * (j * units / count), c1 = q * ((j + 1) * units / count);
  return {C, c0, c1 - c0};
}

Status ExpertParallelLayer::run_chunks(int count, const std::function<Status(int)>& in,
                                       const std::function<Status(int)>& compute,
                                       const std::function<Status(int)>& out) {
  // The worker was started at creation for any configuration that chunks; in order, the
  // exchanges run the same way (only later).
  if (count == 1 || !worker_) return run_chunks_in_order(count, in, compute, out);
  return worker_->run(count, in, compute, out);
}

ExchangeConfig ExpertParallelLayer::config_for(int64_t C) {
  return tuner_ ? tuner_->next(ExchangeTuner::bucket_for(C)) : fixed_;
}

Status ExpertParallelLayer::record_run(int64_t C, int64_t nanoseconds) {
  const int64_t bucket = ExchangeTuner::bucket_for(C);
  if (!tuner_->record(bucket, nanoseconds)) return Status::OK();
  // The bucket's last trial, on every rank at this same forward: the group's totals decide.
  std::vector<int64_t> totals = tuner_->totals(bucket);
  TUTEL_RETURN_IF_ERROR(agree_on_max(totals.data(), totals.size()));
  return tuner_->decide(bucket, totals);
}

// Chunk [c0, c0 + Cj) of [E, C, row] on the tokens' rank → every rank's experts:
// [E_l, W·Cj, row] (E ≥ W); with E < W, for this rank's share of one expert, [W·Cj/q, row]: the
// slots [c0 + t·Cj/q, c0 + (t+1)·Cj/q) of every rank, t = this rank's place in its gather group
// (q = side.split; with q = 1 each shard needs all of its expert's slots).
Status ExpertParallelLayer::to_experts(const void* token_side, void* expert_side, Chunk ch,
                                       int64_t row_bytes, const ExpertSide& side,
                                       comm::AllToAllAlgo algo) {
  const int64_t W = shard_.world, El = shard_.local_experts, s = shard_.shards;
  // Expert e's part of the chunk, on the tokens' side.
  auto token_part = [&](int64_t e) {
    return static_cast<const std::byte*>(token_side) + (e * ch.C + ch.c0) * row_bytes;
  };
  if (s == 1) {
    // Rank w's block is its E_l experts' slots of the chunk, a piece per expert, straight from
    // [E][C] here and straight into [E_l][W·Cj] there: no packing, no reordering pass.
    const size_t piece = static_cast<size_t>(ch.Cj * row_bytes);
    const comm::BlockLayout send{piece, size_t(El), size_t(ch.C * row_bytes),
                                 size_t(El * ch.C * row_bytes)};
    const comm::BlockLayout recv{piece, size_t(El), size_t(W) * piece, piece};
    TUTEL_RETURN_IF_ERROR(collective_ready());
    return comm_->all_to_all(token_part(0), send, expert_side, recv, algo);
  }
  // Part w for rank w = e·s + j is expert e's share t = j mod q of the chunk's slots.
  const int64_t q = side.split;
  const size_t part = static_cast<size_t>(ch.Cj / q * row_bytes);
  const void* send = token_side;
  // With q = s over the whole capacity, part w is at w·part: the token side is the send buffer.
  if (q != s || ch.Cj != ch.C) {
    for (int64_t w = 0; w < W; ++w)
      TUTEL_RETURN_IF_ERROR(backend_->copy(bytes_of(send_) + w * part,
                                           token_part(w / s) + (w % q) * part, part,
                                           CopyKind::kDeviceToDevice));
    send = send_.data();
  }
  TUTEL_RETURN_IF_ERROR(collective_ready());
  return comm_->all_to_all(send, expert_side, part, algo);
}

// The inverse of to_experts: a chunk's expert-side rows back to [E, C, row] on the tokens' rank.
// Where r > 1 ranks split an expert's H, each holds a partial sum of the same slots; they are
// added in the order of their H-parts, so every rank gets the same bits.
Status ExpertParallelLayer::to_tokens(const float* expert_side, float* token_side, Chunk ch,
                                      int64_t row, const ExpertSide& side,
                                      comm::AllToAllAlgo algo) {
  const int64_t W = shard_.world, El = shard_.local_experts, s = shard_.shards, E = spec_.experts;
  auto token_part = [&](int64_t e) { return token_side + (e * ch.C + ch.c0) * row; };
  if (s == 1) {
    // The inverse of to_experts' layouts: from [E_l][W·Cj] straight into [E][C].
    const size_t piece = static_cast<size_t>(ch.Cj * row * 4);
    const comm::BlockLayout send{piece, size_t(El), size_t(W) * piece, piece};
    const comm::BlockLayout recv{piece, size_t(El), size_t(ch.C * row * 4),
                                 size_t(El * ch.C * row * 4)};
    TUTEL_RETURN_IF_ERROR(collective_ready());
    return comm_->all_to_all(expert_side, send, token_part(0), recv, algo);
  }
  const int64_t q = side.split, parts = s / q;  // parts: r, the H-parts of each expert
  const size_t part = static_cast<size_t>(ch.Cj / q * row);
  TUTEL_RETURN_IF_ERROR(collective_ready());
  // One rank per slot share (r = 1) over the whole capacity: block w lands where it belongs.
  if (parts == 1 && ch.Cj == ch.C)
    return comm_->all_to_all(expert_side, token_side, part * 4, algo);
  float* recv = fp(recv_);
  TUTEL_RETURN_IF_ERROR(comm_->all_to_all(expert_side, recv, part * 4, algo));
  const Shape part_shape{static_cast<int64_t>(part)};
  // Rank e·s + g·q + t sent H-part g's sum over share t of expert e's slots.
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < q; ++t) {
      float* dst = token_part(e) + t * part;
      auto from = [&](int64_t g) { return recv + (e * s + g * q + t) * part; };
      TUTEL_RETURN_IF_ERROR(backend_->copy(dst, from(0), part * 4, CopyKind::kDeviceToDevice));
      const TensorView sum(dst, DType::kF32, part_shape, backend_->device());
      for (int64_t g = 1; g < parts; ++g)
        TUTEL_RETURN_IF_ERROR(
            backend_->add(sum, TensorView(from(g), DType::kF32, part_shape, backend_->device())));
    }
  return Status::OK();
}

Status ExpertParallelLayer::collective_ready() {
  // A communicator may run on its own queue (an NCCL communicator with a stream of its own):
  // what the backend queued into a send buffer must be done first. Free where the backend's ops
  // are synchronous (CPU); skipped where the communicator enqueues on the backend's queue, whose
  // order suffices, and where a wait could not be captured into a graph.
  return comm_on_backend_queue_ ? Status::OK() : backend_->synchronize();
}

Status ExpertParallelLayer::wait_collectives() {
  if (!comm_on_backend_queue_) return Status::OK();
  Status st = comm_->wait_enqueued();
  // The gather groups' collectives share the queue, and each communicator watches (and on a
  // timeout aborts) only its own: a group whose peer died stalls the queue until that group
  // gives up. So every one is waited for, also after another failed, and the first error kept.
  for (comm::Communicator* group : gather_groups_->all()) {
    Status waited = group->wait_enqueued();
    if (st.ok()) st = std::move(waited);
  }
  // The communicator is aborted: graphs holding its collectives must never launch again.
  if (!st.ok() && runner_ != nullptr) runner_->clear();
  return st;
}

PhaseKey ExpertParallelLayer::phase_key(Phase phase, const Saved& st,
                                        std::initializer_list<uint64_t> words,
                                        std::initializer_list<const void*> io,
                                        std::initializer_list<const LayerWeights*> weights) const {
  PhaseKey key;
  key.phase = phase;
  key.add(epoch_).add(backend_->scratch_epoch()).add(comm_->scratch_epoch());
  for (const comm::Communicator* group : gather_groups_->all()) key.add(group->scratch_epoch());
  // The saved state by its buffers, not by the object's address: a Saved moved or swapped into
  // the same object without growing would otherwise replay a graph onto the old buffers.
  for (const DeviceBuffer* b : {&st.x_, &st.scores_, &st.expert_index_, &st.gates_, &st.location_,
                                &st.slots_, &st.expert_in_, &st.pre_, &st.hidden_, &st.combined_})
    key.add(b->data());
  for (uint64_t w : words) key.add(w);
  for (const void* p : io) key.add(p);
  for (const LayerWeights* w : weights) {
    const ExpertWeights& e = w->experts;
    for (const TensorView* t : {&w->gate_weight, &e.fc1_weight, &e.fc1_bias, &e.fc2_weight,
                                &e.fc2_bias, &e.fc1_weight_bf16, &e.fc2_weight_bf16})
      key.add(t->data());
  }
  return key;
}

Status ExpertParallelLayer::run_local_phase(const std::function<PhaseKey()>& key,
                                            const std::function<Status()>& ops) {
  return runner_ == nullptr ? ops() : runner_->run(key(), ops);
}

Status ExpertParallelLayer::check_agreed_routing(int64_t tokens, int64_t fullest_expert) const {
  // A request carries at most 2^30 / k tokens (the daemon's bound on its clients), and an
  // expert is chosen at most once per token.
  const int64_t max_tokens = (int64_t{1} << 30) / spec_.k;
  if (tokens < 0 || tokens > max_tokens || fullest_expert < 0 || fullest_expert > tokens)
    return Status::InvalidArgument(
        "the ranks of the expert-parallel group agreed on " + std::to_string(tokens) + " tokens and " +
        std::to_string(fullest_expert) + " in the fullest expert, out of range (0 to " + std::to_string(max_tokens) +
        " tokens): a rank runs another tuteld build, or is not a tuteld; every rank refused this step");
  // And the largest buffer sized from them, [E, C, max(M, O, H)] of 8-byte values, fits in the
  // sizes' arithmetic (the CPU layer's own check, here for the group's capacity).
  const int64_t C = layer_capacity(spec_, tokens, fullest_expert);
  const int64_t widest = std::max({spec_.model_dim, spec_.out_dim(), spec_.hidden});
  int64_t bytes = 0;
  if (C < 0 || __builtin_mul_overflow(spec_.experts, C, &bytes) || __builtin_mul_overflow(bytes, widest, &bytes) ||
      __builtin_mul_overflow(bytes, int64_t{8}, &bytes))
    return Status::InvalidArgument("the expert-parallel step's capacity " + std::to_string(C) + " for " +
                                   std::to_string(tokens) + " tokens makes buffers past 2^63 bytes; every rank "
                                   "refused this step (send fewer tokens per request)");
  return Status::OK();
}

Status ExpertParallelLayer::refused_by_a_peer() const {
  return Status::ResourceExhausted(
      "another rank of the expert-parallel group could not allocate this step (max_memory_bytes, "
      "device memory) or refused its request before running it (max_inflight, a malformed "
      "request, a backward whose parameters changed there since its forward), so every rank refused it; see that "
      "rank's error");
}

Status ExpertParallelLayer::run_group_phase(Agreement what, const Status& prepared,
                                            const std::function<PhaseKey()>& key,
                                            const std::function<Status()>& ops,
                                            Unprepared unprepared_scope, Unprepared* refused,
                                            std::array<MustMatch, 2> must_match) {
  const bool graphs = runner_ != nullptr && runner_->captures();
  if (refused) *refused = Unprepared::kPrepared;
  const int64_t unprepared = static_cast<int64_t>(prepared.ok() ? Unprepared::kPrepared : unprepared_scope);
  if (!graphs && shard_.world == 1) {  // nobody to agree with
    if (!prepared.ok()) {
      if (refused) *refused = unprepared_scope;
      return refuse(prepared);
    }
    return runner_ == nullptr ? ops() : runner_->run(key(), ops);
  }
  // The group agrees on whether every rank could allocate the phase's buffers (else all refuse
  // the step) and, with graphs, on how to run it: the same way on every rank, as NCCL requires
  // of captured collectives. The least ready rank decides: op by op, capture under a new round,
  // or launch where every rank holds a graph of the same capture round. The agreement is also a
  // collective: with a failed communicator it fails here, before any graph launches.
  PhaseKey k;
  PhaseProposal mine;
  if (graphs && prepared.ok()) {
    k = key();
    mine = runner_->propose(k);
  }
  const int64_t launch_round = mine.mode == PhaseMode::kLaunch ? int64_t(mine.round) : -1;
  int64_t agreed[9] = {unprepared,
                       2 - static_cast<int64_t>(mine.mode),      // how far from launching
                       launch_round, -launch_round,              // the same round everywhere?
                       int64_t(capture_rounds_) + 1,             // a new round, above all so far
                       must_match[0].value, -must_match[0].value,  // the same values everywhere?
                       must_match[1].value, -must_match[1].value};
  TUTEL_RETURN_IF_ERROR(agree(what, agreed, 9));
  if (refused) *refused = static_cast<Unprepared>(agreed[0]);
  if (!prepared.ok()) return refuse(prepared);
  if (agreed[0] != 0) return refuse(refused_by_a_peer());
  for (size_t i = 0; i < must_match.size(); ++i) {
    const int64_t highest = agreed[5 + 2 * i], lowest = -agreed[6 + 2 * i], mine = must_match[i].value;
    if (highest == lowest) continue;
    return refuse(Status::InvalidArgument(
        must_match[i].refusal ? must_match[i].refusal(mine, highest != mine ? highest : lowest)
                              : "the ranks of the expert-parallel group passed different values to a step that "
                                "needs the same on every rank: their trainers' steps are out of order"));
  }
  if (!graphs) return gave_up(runner_ == nullptr ? ops() : runner_->run(key(), ops));
  PhaseMode mode = PhaseMode::kEager;
  uint64_t round = 0;
  if (agreed[1] == 0 && agreed[2] == -agreed[3]) {
    mode = PhaseMode::kLaunch;
    round = static_cast<uint64_t>(agreed[2]);
  } else if (agreed[1] <= 1) {
    // Every rank records its graph (nothing runs yet), then the group agrees on whether every
    // capture worked: all launch, or all drop theirs and run op by op (a rank whose capture
    // failed runs this key op by op from then on, and so proposes it, and so the group).
    round = capture_rounds_ = static_cast<uint64_t>(agreed[4]);
    const Status captured =
        runner_->capture(k, round, ops, [this] { return comm_->captured_traffic(); });
    int64_t failed[1] = {captured.ok() ? 0 : 1};
    TUTEL_RETURN_IF_ERROR(agree_on_max(failed, 1));
    if (failed[0] == 0) {
      mode = PhaseMode::kLaunch;
    } else {
      runner_->drop(k);
      round = 0;
    }
  }
  // A failure from here is a kernel's or a collective's: the graphs may hold a communicator
  // that is now aborted, and must never launch again.
  Status st = runner_->run_as(k, mode, round, ops);
  if (!st.ok()) {
    runner_->clear();
    return gave_up(std::move(st));
  }
  // The collectives a launch replays are counted as traffic here: no host call issued them.
  if (mode == PhaseMode::kLaunch) comm_->count_replayed(runner_->propose(k).traffic);
  return st;
}

Status ExpertParallelLayer::gave_up(Status st) {
  // The phase's ops failed part way on this rank (a kernel, its own collective): its peers may
  // still wait in a collective this rank will not issue, and its next one would pair with
  // theirs. The group's communicators stop here and tell them (a no-op where a collective
  // failed already): the gather groups too, whose peers may wait in a gather. Alone, a rank
  // has nobody to fall out of step with.
  if (st.ok() || shard_.world == 1) return st;
  comm_->give_up(st);
  if (gather_groups_)
    for (comm::Communicator* group : gather_groups_->all()) group->give_up(st);
  return st;
}

Status ExpertParallelLayer::refuse_forward(Status why) {
  if (why.ok()) why = Status::Internal("refuse_forward without a reason");
  // The forward's first agreement: {tokens, fullest expert, refused}.
  int64_t agreed[3] = {0, 0, 1};
  TUTEL_RETURN_IF_ERROR(agree(Agreement::kForward, agreed, 3));
  ++forwards_;  // one of the group's forwards, refused on every rank
  return refuse(std::move(why));
}

Status ExpertParallelLayer::refuse_backward(Saved& saved, Status why) {
  if (why.ok()) why = Status::Internal("refuse_backward without a reason");
  saved.holds_forward_ = false;
  // The backward's first agreement is its phase's: refused, it runs nothing.
  return run_group_phase(
      Agreement::kBackward, why, [] { return PhaseKey(); }, [] { return Status::OK(); });
}

Status ExpertParallelLayer::refuse(Status why) {
  // The step's scratch may have grown part way before the refusal; what it holds is no later
  // call's, so it goes back (to the tenant's quota too) and grows again when a step needs it.
  for (DeviceBuffer* b : {&dispatched_, &send_, &recv_, &expert_out_, &workspace_, &d_gates_,
                          &d_logits_, &d_combined_, &d_expert_out_, &d_hidden_, &d_expert_in_,
                          &d_dispatched_, &gathered_, &gathered_bf16_, &full_grads_, &grad_slice_})
    if (b->data()) {
      b->reset();
      ++epoch_;
    }
  return why;
}

// The values make a round trip through a few bytes of the backend's memory, the only memory
// every communicator takes (NCCL's collectives read and write device memory only); next to the
// expert counts just copied down, it costs one more small copy each way.
Status ExpertParallelLayer::agree_on_max(int64_t* values, size_t count) {
  const size_t bytes = count * sizeof(int64_t);
  // agreed_ was allocated at creation for the widest agreement; a rank whose staging fails (a
  // device error) cannot join the all-reduce its peers wait in, and gives the group up.
  const Status staged = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(grow(agreed_, bytes));
    TUTEL_RETURN_IF_ERROR(backend_->copy(agreed_.data(), values, bytes, CopyKind::kHostToDevice));
    return collective_ready();
  }();
  if (!staged.ok()) return gave_up(staged);
  TUTEL_RETURN_IF_ERROR(
      comm_->all_reduce(static_cast<int64_t*>(agreed_.data()), count, comm::ReduceOp::kMax));
  TUTEL_RETURN_IF_ERROR(wait_collectives());
  // A rank that made the all-reduce but cannot read its result would go on out of step with
  // peers that did (they count a forward it does not): it gives the group up.
  return gave_up(backend_->copy(values, agreed_.data(), bytes, CopyKind::kDeviceToHost));
}

Status ExpertParallelLayer::agree(Agreement what, int64_t* values, size_t count) {
  // Every agreement of the layer is as wide, whatever it carries (see kAgreementWidth).
  const size_t width = agreement_width(spec_);
  TUTEL_CHECK(count + 2 <= width);
  // Sized for the widest layer, filled only to this one's width (the rest is never read: no
  // 4 KiB of zeros per call for a layer of 8 experts).
  int64_t all[kAgreementWidth + kMaxAgreedCounts];
  all[0] = static_cast<int64_t>(what);
  all[1] = -static_cast<int64_t>(what);
  std::copy(values, values + count, all + 2);
  std::fill(all + 2 + count, all + width, int64_t{0});
  TUTEL_RETURN_IF_ERROR(agree_on_max(all, width));
  const int64_t highest = all[0], lowest = -all[1];
  if (highest == lowest) {
    std::copy(all + 2, all + 2 + count, values);
    return Status::OK();
  }
  // Out of step: the peers' values belong to another call. Each rank refuses the one it is in,
  // which leaves the group in step again (every rank has made this one collective).
  auto call = [](int64_t a) -> const char* {
    switch (static_cast<Agreement>(a)) {
      case Agreement::kForward: return "forward";
      case Agreement::kExpertPhase: return "forward (its expert phase)";
      case Agreement::kBackward: return "backward";
      case Agreement::kGateGradSum: return "step";
      case Agreement::kGradNorm: return "grad_norm";
    }
    return "an unknown call";
  };
  const int64_t other = highest != static_cast<int64_t>(what) ? highest : lowest;
  return refuse(Status::InvalidArgument(
      std::string("the ranks of the expert-parallel group called different requests at this point: this rank ") +
      call(static_cast<int64_t>(what)) + ", another " + call(other) +
      ". Every rank's trainer must call forward, backward, step and grad_norm (clip_grad_norm_) alike and "
      "in the same order (the same micro-batches on every rank, an empty batch too); neither ran, and the "
      "group goes on"));
}

Status ExpertParallelLayer::grow(DeviceBuffer& buf, size_t bytes) {
  if (buf.data() && buf.bytes() >= bytes) return Status::OK();
  ++epoch_;
  buf.reset();
  TUTEL_ASSIGN_OR_RETURN(buf, backend_->allocate(std::max<size_t>(bytes, 64)));
  return Status::OK();
}

TensorView ExpertParallelLayer::f32(const DeviceBuffer& buf, Shape shape) const {
  return TensorView(buf.data(), DType::kF32, shape, backend_->device());
}
TensorView ExpertParallelLayer::f32_at(const DeviceBuffer& buf, int64_t offset, Shape shape) const {
  return TensorView(fp(buf) + offset, DType::kF32, shape, backend_->device());
}
TensorView ExpertParallelLayer::disp_at(const DeviceBuffer& buf, int64_t offset, Shape shape) const {
  const DType d = spec_.dispatch_dtype();
  return TensorView(bytes_of(buf) + offset * dtype_size(d), d, shape, backend_->device());
}
TensorView ExpertParallelLayer::i32(const DeviceBuffer& buf, Shape shape) const {
  return TensorView(buf.data(), DType::kI32, shape, backend_->device());
}
TensorView ExpertParallelLayer::workspace() const {
  return TensorView(workspace_.data(), DType::kU8, {int64_t(workspace_.bytes())},
                    backend_->device());
}

ExpertWeights ExpertParallelLayer::local_experts(const ExpertWeights& w) const {
  ExpertWeights out = w;  // the bf16 weight copies, already this rank's slices, pass as they are
  // A shard adds only its slice of the fc2 bias, to its own columns (forward's add_row_bias),
  // so the sum over shards carries the whole bias exactly once.
  if (shard_.shards > 1) out.fc2_bias = TensorView();
  return out;
}

ExpertParallelLayer::BiasColumns ExpertParallelLayer::fc2_bias_columns(
    const TensorView& bias_slices, int64_t count) const {
  // Columns [o0, o0 + n) of O; with O not divisible by s, the last shards' slices reach past O
  // (Tutel's zero padding) or lie wholly beyond it (n = 0, an empty range at O).
  const int64_t O = spec_.out_dim(), first = shard_.shard_index / count * count;
  const int64_t o0 = std::min(O, first * shard_.out_shard);
  const int64_t n = std::min(count * shard_.out_shard, O - o0);
  return {o0, TensorView(bias_slices.data(), DType::kF32, {n}, bias_slices.device())};
}

ExpertParallelLayer::WholeExperts ExpertParallelLayer::whole_experts(bool f32_weights) const {
  const int64_t E = spec_.experts, M = spec_.model_dim, H = spec_.hidden, O = spec_.out_dim();
  WholeExperts w;
  int64_t at = 0;
  if (f32_weights) {
    w.fc1 = std::exchange(at, at + E * H * M);
    w.fc2 = std::exchange(at, at + E * H * O);
  }
  if (spec_.has_fc1_bias) w.fc1_bias = std::exchange(at, at + E * H);
  if (spec_.has_fc2_bias) {
    w.fc2_bias = std::exchange(at, at + E * O);
    if (shard_.shards > 1)
      w.fc2_bias_slices = std::exchange(at, at + shard_.world * shard_.out_shard);
  }
  w.floats = at;
  return w;
}

ExpertWeights ExpertParallelLayer::whole_view(const DeviceBuffer& buf, bool copies) const {
  const int64_t E = spec_.experts, M = spec_.model_dim, H = spec_.hidden, O = spec_.out_dim();
  const WholeExperts w = whole_experts(!copies);
  ExpertWeights out;
  if (copies) {
    const Device dev = backend_->device();
    auto* bf16 = static_cast<uint16_t*>(gathered_bf16_.data());
    out.fc1_weight = TensorView(nullptr, DType::kF32, {E, H, M}, dev);
    out.fc2_weight = TensorView(nullptr, DType::kF32, {E, H, O}, dev);
    out.fc1_weight_bf16 = TensorView(bf16, DType::kBF16, {E, H, M}, dev);
    out.fc2_weight_bf16 = TensorView(bf16 + E * H * M, DType::kBF16, {E, H, O}, dev);
  } else {
    out.fc1_weight = f32_at(buf, w.fc1, {E, H, M});
    out.fc2_weight = f32_at(buf, w.fc2, {E, H, O});
  }
  if (spec_.has_fc1_bias) out.fc1_bias = f32_at(buf, w.fc1_bias, {E, H});
  if (spec_.has_fc2_bias) out.fc2_bias = f32_at(buf, w.fc2_bias, {E, O});
  return out;
}

// Rank w's slice of a weight is block w of the whole: with E ≥ W its E_l experts, [E_l, H, ·];
// with E < W (w = e·s + j) the j-th H-slice of expert e, [1, H_s, ·]. So the ranks' slices in
// rank order are the whole tensor, [E, H, ·], and one all-gather rebuilds it. The sharded fc2
// bias is the exception: its slices are column ranges of O (Tutel's layout, zero-padded), put
// back together expert by expert.
bool ExpertParallelLayer::gathers_copies(const LayerWeights& local) const {
  return spec_.matmul_dtype == DType::kBF16 && local.experts.has_bf16_copies();
}

Status ExpertParallelLayer::grow_gathered(bool copies) {
  TUTEL_RETURN_IF_ERROR(grow(gathered_, whole_experts(!copies).floats * 4));
  if (!copies) return Status::OK();
  const int64_t E = spec_.experts, M = spec_.model_dim, H = spec_.hidden, O = spec_.out_dim();
  return grow(gathered_bf16_, (E * H * M + E * H * O) * 2);
}

Status ExpertParallelLayer::gather_experts(const LayerWeights& local) {
  const bool copies = gathers_copies(local);
  const WholeExperts w = whole_experts(!copies);
  float* whole = fp(gathered_);
  auto gather_to = [&](const TensorView& mine, void* to) -> Status {
    TUTEL_RETURN_IF_ERROR(collective_ready());
    return comm_->all_gather(mine.data(), to, mine.nbytes());
  };
  auto gather = [&](const TensorView& mine, int64_t offset) { return gather_to(mine, whole + offset); };
  if (copies) {
    // The slices of the copies in rank order are the whole copies, as for the weights.
    const ExpertWeights view = whole_view(gathered_, /*copies=*/true);
    TUTEL_RETURN_IF_ERROR(gather_to(local.experts.fc1_weight_bf16, view.fc1_weight_bf16.data()));
    TUTEL_RETURN_IF_ERROR(gather_to(local.experts.fc2_weight_bf16, view.fc2_weight_bf16.data()));
  } else {
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc1_weight, w.fc1));
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc2_weight, w.fc2));
  }
  if (spec_.has_fc1_bias) TUTEL_RETURN_IF_ERROR(gather(local.experts.fc1_bias, w.fc1_bias));
  if (!spec_.has_fc2_bias) return Status::OK();
  if (shard_.shards == 1) return gather(local.experts.fc2_bias, w.fc2_bias);
  TUTEL_RETURN_IF_ERROR(gather(local.experts.fc2_bias, w.fc2_bias_slices));
  // [E][s·O_s] → [E][O]: the first O columns of each expert's slices.
  const int64_t O = spec_.out_dim(), row = shard_.shards * shard_.out_shard;
  for (int64_t e = 0; e < spec_.experts; ++e)
    TUTEL_RETURN_IF_ERROR(backend_->copy(whole + w.fc2_bias + e * O,
                                         whole + w.fc2_bias_slices + e * row, O * sizeof(float),
                                         CopyKind::kDeviceToDevice));
  return Status::OK();
}

// The inverse of gather_experts for gradients: full_grads_ holds this rank's gradient of the
// whole layer's experts; block w of the sum over ranks belongs to rank w (reduce-scatter).
Status ExpertParallelLayer::scatter_expert_grads(const LayerWeights& local_grads) {
  const WholeExperts w = whole_experts();
  float* whole = fp(full_grads_);
  auto scatter = [&](const TensorView& mine, const float* full) {
    return reduce_scatter_add(*comm_, full, mine);
  };
  const ExpertWeights& g = local_grads.experts;
  TUTEL_RETURN_IF_ERROR(scatter(g.fc1_weight, whole + w.fc1));
  TUTEL_RETURN_IF_ERROR(scatter(g.fc2_weight, whole + w.fc2));
  if (spec_.has_fc1_bias) TUTEL_RETURN_IF_ERROR(scatter(g.fc1_bias, whole + w.fc1_bias));
  if (!spec_.has_fc2_bias) return Status::OK();
  if (shard_.shards == 1) return scatter(g.fc2_bias, whole + w.fc2_bias);
  // [E][O] → [E][s·O_s], zero in the padding columns (which have no gradient).
  const int64_t O = spec_.out_dim(), row = shard_.shards * shard_.out_shard;
  TUTEL_RETURN_IF_ERROR(backend_->fill_zero(
      f32_at(full_grads_, w.fc2_bias_slices, {shard_.world * shard_.out_shard})));
  for (int64_t e = 0; e < spec_.experts; ++e)
    TUTEL_RETURN_IF_ERROR(backend_->copy(whole + w.fc2_bias_slices + e * row,
                                         whole + w.fc2_bias + e * O, O * sizeof(float),
                                         CopyKind::kDeviceToDevice));
  return scatter(g.fc2_bias, whole + w.fc2_bias_slices);
}

Status ExpertParallelLayer::reduce_scatter_add(comm::Communicator& group, const float* full,
                                               const TensorView& mine) {
  TUTEL_RETURN_IF_ERROR(collective_ready());
  TUTEL_RETURN_IF_ERROR(group.reduce_scatter(full, fp(grad_slice_),
                                             static_cast<size_t>(mine.numel()),
                                             comm::ReduceOp::kSum));
  return backend_->add(mine, f32(grad_slice_, mine.shape()));
}

// A gather group's q ranks hold the consecutive H-slices of one expert, so their slices in rank
// order are its H-part [q·H_s, ·], and one all-gather over the group puts each weight together.
// Their fc2 bias slices in rank order are the part's q·O_s columns, as they are.
ExpertParallelLayer::PartExperts ExpertParallelLayer::part_experts(const ExpertSide& side,
                                                                   bool f32_weights) const {
  const int64_t M = spec_.model_dim, O = spec_.out_dim(), Hq = side.hidden;
  PartExperts p;
  int64_t at = 0;
  if (f32_weights) {
    p.fc1 = std::exchange(at, at + Hq * M);
    p.fc2 = std::exchange(at, at + Hq * O);
  }
  if (spec_.has_fc1_bias) p.fc1_bias = std::exchange(at, at + Hq);
  if (spec_.has_fc2_bias) p.fc2_bias = std::exchange(at, at + side.split * shard_.out_shard);
  p.floats = at;
  return p;
}

ExpertWeights ExpertParallelLayer::part_view(const DeviceBuffer& buf, const ExpertSide& side,
                                             bool copies) const {
  const int64_t M = spec_.model_dim, O = spec_.out_dim(), Hq = side.hidden;
  const PartExperts p = part_experts(side, !copies);
  ExpertWeights out;
  if (copies) {
    const Device dev = backend_->device();
    auto* bf16 = static_cast<uint16_t*>(gathered_bf16_.data());
    out.fc1_weight = TensorView(nullptr, DType::kF32, {1, Hq, M}, dev);
    out.fc2_weight = TensorView(nullptr, DType::kF32, {1, Hq, O}, dev);
    out.fc1_weight_bf16 = TensorView(bf16, DType::kBF16, {1, Hq, M}, dev);
    out.fc2_weight_bf16 = TensorView(bf16 + Hq * M, DType::kBF16, {1, Hq, O}, dev);
  } else {
    out.fc1_weight = f32_at(buf, p.fc1, {1, Hq, M});
    out.fc2_weight = f32_at(buf, p.fc2, {1, Hq, O});
  }
  if (spec_.has_fc1_bias) out.fc1_bias = f32_at(buf, p.fc1_bias, {1, Hq});
  return out;
}

TensorView ExpertParallelLayer::part_fc2_bias(const DeviceBuffer& buf, const ExpertSide& side,
                                              bool copies) const {
  return f32_at(buf, part_experts(side, !copies).fc2_bias, {side.split * shard_.out_shard});
}

Status ExpertParallelLayer::grow_part(const ExpertSide& side, bool copies) {
  TUTEL_RETURN_IF_ERROR(grow(gathered_, part_experts(side, !copies).floats * 4));
  if (!copies) return Status::OK();
  return grow(gathered_bf16_, side.hidden * (spec_.model_dim + spec_.out_dim()) * 2);
}

Status ExpertParallelLayer::gather_part(const LayerWeights& local, const ExpertSide& side) {
  const bool copies = gathers_copies(local);
  const PartExperts p = part_experts(side, !copies);
  auto gather = [&](const TensorView& mine, void* to) -> Status {
    TUTEL_RETURN_IF_ERROR(collective_ready());
    return side.gather->all_gather(mine.data(), to, mine.nbytes());
  };
  if (copies) {
    const ExpertWeights view = part_view(gathered_, side, /*copies=*/true);
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc1_weight_bf16, view.fc1_weight_bf16.data()));
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc2_weight_bf16, view.fc2_weight_bf16.data()));
  } else {
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc1_weight, fp(gathered_) + p.fc1));
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc2_weight, fp(gathered_) + p.fc2));
  }
  if (spec_.has_fc1_bias)
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc1_bias, fp(gathered_) + p.fc1_bias));
  if (spec_.has_fc2_bias)
    TUTEL_RETURN_IF_ERROR(gather(local.experts.fc2_bias, fp(gathered_) + p.fc2_bias));
  return Status::OK();
}

// The part's gradient of this rank's share of the slots, summed over the gather group: block t
// of the sum is rank t's slice.
Status ExpertParallelLayer::scatter_part_grads(const LayerWeights& local_grads,
                                               const ExpertSide& side) {
  const PartExperts p = part_experts(side);
  const float* part = fp(full_grads_);
  const ExpertWeights& g = local_grads.experts;
  TUTEL_RETURN_IF_ERROR(reduce_scatter_add(*side.gather, part + p.fc1, g.fc1_weight));
  TUTEL_RETURN_IF_ERROR(reduce_scatter_add(*side.gather, part + p.fc2, g.fc2_weight));
  if (spec_.has_fc1_bias)
    TUTEL_RETURN_IF_ERROR(reduce_scatter_add(*side.gather, part + p.fc1_bias, g.fc1_bias));
  if (spec_.has_fc2_bias)
    TUTEL_RETURN_IF_ERROR(reduce_scatter_add(*side.gather, part + p.fc2_bias, g.fc2_bias));
  return Status::OK();
}

namespace {

Status check_local(const LayerWeights& w, const LayerSpec& spec, const ExpertShard& s,
                   std::string_view what) {
  const std::string p = std::string(what) + " ";
  TUTEL_RETURN_IF_ERROR(
      w.gate_weight.expect(p + kGateWeightName, DType::kF32, {spec.experts, spec.model_dim}));
  TUTEL_RETURN_IF_ERROR(
      w.experts.fc1_weight.expect(p + kFc1WeightName, DType::kF32, local_fc1_shape(spec, s)));
  TUTEL_RETURN_IF_ERROR(
      w.experts.fc2_weight.expect(p + kFc2WeightName, DType::kF32, local_fc2_shape(spec, s)));
  if (spec.has_fc1_bias)
    TUTEL_RETURN_IF_ERROR(
        w.experts.fc1_bias.expect(p + kFc1BiasName, DType::kF32, local_fc1_bias_shape(spec, s)));
  if (spec.has_fc2_bias)
    TUTEL_RETURN_IF_ERROR(
        w.experts.fc2_bias.expect(p + kFc2BiasName, DType::kF32, local_fc2_bias_shape(spec, s)));
  // bf16 weight copies are the caller's, sliced like their weights (this rank's experts, or its
  // H-slice): each must have its local weight's shape.
  return w.experts.check_bf16_copies(what);
}

}  // namespace

size_t ExpertParallelLayer::Saved::bytes() const {
  size_t n = 0;
  for (const DeviceBuffer* b : {&x_, &scores_, &expert_index_, &gates_, &location_, &slots_,
                                &expert_in_, &pre_, &hidden_, &combined_})
    n += b->bytes();
  return n;
}

Status ExpertParallelLayer::forward(const LayerWeights& local, TensorView x, TensorView y,
                                    RoutingStats* stats, Saved* saved) {
  TUTEL_RETURN_IF_ERROR(check_local(local, spec_, shard_, "weights"));
  const int64_t S = x.rank() == 2 ? x.dim(0) : -1, E = spec_.experts, k = spec_.k,
                M = spec_.model_dim, O = spec_.out_dim(), W = shard_.world,
                El = shard_.local_experts, s = shard_.shards, Hs = shard_.hidden_shard;
  // S = 0 is a step too: a rank whose batch is empty still runs its part of the group's
  // collectives (its experts serve the peers' tokens), with nothing of its own routed.
  if (S < 0)
    return Status::InvalidArgument("x has shape " + x.shape().to_string() +
                                   ", expected [tokens, M]");
  TUTEL_RETURN_IF_ERROR(x.expect("x", DType::kF32, {S, M}));
  TUTEL_RETURN_IF_ERROR(y.expect("y", DType::kF32, {S, O}));
  Backend& b = *backend_;
  const bool training = saved != nullptr;
  Saved& st = training ? *saved : inference_;
  st.holds_forward_ = false;

  // A rank that cannot allocate what the step needs (its tenant's quota, device memory) still
  // joins the group's agreements below, so the whole group refuses the step together instead of
  // leaving its peers waiting in a collective until the timeout.
  Status ready = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(grow(st.scores_, S * E * 4));
    TUTEL_RETURN_IF_ERROR(grow(st.expert_index_, S * k * 4));
    TUTEL_RETURN_IF_ERROR(grow(st.gates_, S * k * 4));
    TUTEL_RETURN_IF_ERROR(grow(st.location_, S * k * 4));
    TUTEL_RETURN_IF_ERROR(grow(l_aux_, 4));
    TUTEL_RETURN_IF_ERROR(grow(expert_count_, E * 4));
    // Backward reads x again, after the caller has moved on to other micro-batches.
    if (training) TUTEL_RETURN_IF_ERROR(grow(st.x_, S * M * 4));
    return Status::OK();
  }();
  const TensorView xv = training ? f32(st.x_, {S, M}) : x;
  const TensorView scores = f32(st.scores_, {S, E}), idx = i32(st.expert_index_, {S, k}),
                   gates = f32(st.gates_, {S, k}), loc = i32(st.location_, {S, k}),
                   counts = i32(expert_count_, {E});
  if (ready.ok())
    ready = run_local_phase(
        [&] {
          return phase_key(kRoutePhase, st, {uint64_t(S), uint64_t(training)}, {x.data()},
                           {&local});
        },
        [&]() -> Status {
          // No tokens: no expert gets one from this rank, and l_aux (a mean over the rank's
          // tokens) is 0. The backends' routing kernels are not asked to take S = 0.
          if (S == 0) {
            TUTEL_RETURN_IF_ERROR(b.fill_zero(counts));
            return b.fill_zero(f32(l_aux_, {1}));
          }
          if (training)
            TUTEL_RETURN_IF_ERROR(
                b.copy(st.x_.data(), x.data(), S * M * 4, CopyKind::kDeviceToDevice));
          TUTEL_RETURN_IF_ERROR(b.gate_forward({xv,
                                                local.gate_weight,
                                                {},
                                                spec_.k,
                                                spec_.normalize_gate,
                                                scores,
                                                idx,
                                                gates,
                                                f32(l_aux_, {1})}));
          return b.locations({scores, idx, spec_.batch_prioritized, loc, counts});
        });

  // One capacity for the whole group: from its most tokens and its fullest expert.
  host_counts_.assign(E, 0);
  if (ready.ok())
    ready =
        b.copy(host_counts_.data(), counts.data(), E * sizeof(int32_t), CopyKind::kDeviceToHost);
  // With E <= kMaxAgreedCounts, each expert's count follows: after the MAX, an expert at 0 got no
  // token from any rank, and an inference leaves it out (below).
  const int64_t agreed_counts = static_cast<int64_t>(agreement_width(spec_) - kAgreementWidth);
  int64_t agreed[3 + kMaxAgreedCounts];  // the first 3 + agreed_counts in use
  agreed[0] = S;
  agreed[1] = *std::max_element(host_counts_.begin(), host_counts_.end());
  agreed[2] = ready.ok() ? 0 : 1;
  std::copy(host_counts_.begin(), host_counts_.begin() + agreed_counts, agreed + 3);
  TUTEL_RETURN_IF_ERROR(agree(Agreement::kForward, agreed, 3 + static_cast<size_t>(agreed_counts)));
  // From here every rank is in this forward: it is the group's next, refused or not.
  const int64_t number = ++forwards_;
  if (!ready.ok()) return refuse(ready);
  if (agreed[2] != 0) return refuse(refused_by_a_peer());
  // The agreed values size this rank's buffers: they are checked first. A peer of another build,
  // or a hostile member, stating 2^62 tokens made the products below wrap, and every rank wrote
  // its tokens past a 64-byte buffer. Every rank sees the same agreed values, so every rank
  // refuses alike, and the group goes on.
  if (const Status sane = check_agreed_routing(agreed[0], agreed[1]); !sane.ok()) return refuse(sane);
  const int64_t C = layer_capacity(spec_, agreed[0], agreed[1]), R = W * C;
  int64_t dropped = 0;
  for (int64_t e = 0; e < E; ++e) dropped += std::max<int64_t>(0, host_counts_[e] - C);
  // An inference computes only the local experts some rank routed a token to (the CPU backend
  // skips the others: ExpertForwardArgs::expert_count), as the agreement says: host memory, which
  // only a CPU backend reads as its own. (A training forward computes every expert.)
  TensorView local_in_use;
  if (!training && agreed_counts > 0 && b.device().kind == DeviceKind::kCpu) {
    for (int64_t l = 0; l < El; ++l) local_in_use_[l] = agreed[3 + shard_.first_expert + l] > 0 ? 1 : 0;
    local_in_use = TensorView(local_in_use_.data(), DType::kI32, {El}, b.device());
  }

  const int64_t widest = std::max(M, O), H = spec_.hidden;
  const int64_t disp_size = static_cast<int64_t>(dtype_size(spec_.dispatch_dtype()));
  const bool keep_pre = training && spec_.activation != Activation::kRelu;
  // A parallelism r that the group refuses together for want of a buffer only its ways need
  // (r = 0's gathered weights, an r < s's gathered part may not fit on some rank; or the
  // exchange's buffers, which every r >= 1 needs) is dropped from the tuner's bucket on every rank
  // alike (every r >= 1 at once for the exchange's), and the phase runs the next way: routing
  // and capacity are agreed already.
  // A buffer every way needs, no other way left, or no tuner: the refusal is the step's, and the
  // tuner keeps what it offers (the memory may be back for the next step).
  ExchangeConfig config;
  // The Saved buffers are the same size whatever the way: E_l·W·C·H_s = E·C·H.
  const Status shared_ready = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(grow(st.slots_, E * C * 4));
    TUTEL_RETURN_IF_ERROR(grow(st.expert_in_, El * R * M * disp_size));
    if (keep_pre) TUTEL_RETURN_IF_ERROR(grow(st.pre_, El * R * Hs * 4));
    TUTEL_RETURN_IF_ERROR(grow(st.hidden_, El * R * Hs * 4));
    return grow(st.combined_, E * C * O * 4);
  }();
  std::shared_ptr<const ExchangeTuner::Snapshot> before_exclusions;
  for (;;) {
    config = config_for(C);
    const bool data_parallel = config.r == 0;
    // With r >= 1: q = side.split ranks share each H-part of an expert and split its slots, each
    // computing Hq columns of H over W·C/q rows per local expert (q·Hq = the Saved's E_l·R·H_s).
    const ExpertSide side = expert_side(config.r);
    const int64_t q = side.split, Hq = side.hidden;
    const bool gathers_part = !data_parallel && q > 1;
    const int chunks = data_parallel ? 1 : chunk_count(C, config.pipeline, q);
    // Which ways a failure here rules out: the stage it failed in.
    Unprepared unprepared = Unprepared::kEveryWay;
    // The workspace's size follows r's H-part, but with whole experts every r needs the same
    // (E_l·W·C rows = E·C): failing it rules r out only where another parallelism the tuner
    // offers needs less.
    auto workspace_bytes = [&](int r) {
      if (r == 0) {
        ExpertShape shape{E, C, M, H, O};
        shape.weights_bf16 = gathers_copies(local);
        return b.expert_workspace_bytes(shape, spec_.matmul_dtype);
      }
      const ExpertSide side_r = expert_side(r);
      ExpertShape shape{El, R / side_r.split, M, side_r.hidden, O};
      shape.weights_bf16 = side_r.split > 1 ? gathers_copies(local) : local.experts.has_bf16_copies();
      return b.expert_workspace_bytes(shape, spec_.matmul_dtype);
    };
    auto workspace_failure = [&](int r) {
      if (!tuner_) return Unprepared::kEveryWay;
      // The candidates still offered in this bucket (a rare path: the entries are built here).
      std::vector<bool> excluded(tuner_->candidates().size(), false);
      for (const TunerEntry& e : tuner_->entries())
        if (e.capacity_bucket == ExchangeTuner::bucket_for(C)) excluded = e.excluded;
      for (size_t i = 0; i < tuner_->candidates().size(); ++i) {
        const int other = tuner_->candidates()[i].r;
        if (!excluded[i] && other != r && workspace_bytes(other) < workspace_bytes(r)) return Unprepared::kThisParallelism;
      }
      return Unprepared::kEveryWay;
    };
    const Status experts_ready = !shared_ready.ok() ? shared_ready : [&]() -> Status {
      if (data_parallel) {
        unprepared = Unprepared::kThisParallelism;
        TUTEL_RETURN_IF_ERROR(grow_gathered(gathers_copies(local)));
        unprepared = workspace_failure(0);
        return grow(workspace_, workspace_bytes(0));
      }
      unprepared = Unprepared::kExpertParallel;
      TUTEL_RETURN_IF_ERROR(grow(dispatched_, E * C * M * disp_size));
      if (s > 1) {  // whole experts exchange straight between the layer's buffers
        TUTEL_RETURN_IF_ERROR(grow(send_, W * C * widest * 4));
        TUTEL_RETURN_IF_ERROR(grow(recv_, W * C * widest * 4));
      }
      TUTEL_RETURN_IF_ERROR(grow(expert_out_, El * R * O * 4));
      // The gathered part (this r's own), and the workspace.
      unprepared = Unprepared::kThisParallelism;
      if (gathers_part) TUTEL_RETURN_IF_ERROR(grow_part(side, gathers_copies(local)));
      unprepared = workspace_failure(config.r);
      return grow(workspace_, workspace_bytes(config.r));
    }();

    // A step where no rank has a token (C = 0) tells the tuner nothing about any capacity.
    const bool timed = tuner_ && C > 0 && tuner_->measuring(ExchangeTuner::bucket_for(C));
    const auto started = std::chrono::steady_clock::now();
    Unprepared refused = Unprepared::kPrepared;
    const Status ran = run_group_phase(
        Agreement::kExpertPhase, experts_ready,
        [&] {
          return phase_key(kExpertsPhase, st,
                           {uint64_t(S), uint64_t(C), uint64_t(training), uint64_t(config.r),
                            uint64_t(config.algo), uint64_t(chunks)},
                           {x.data(), y.data()}, {&local});
        },
        [&]() -> Status {
          // This rank's tokens into their experts' slots, and the experts' results back to
          // them. Without tokens every slot is empty and y has no rows.
          auto dispatch = [&](const TensorView& dispatched) -> Status {
            if (S == 0) return b.fill_zero(dispatched);
            TUTEL_RETURN_IF_ERROR(b.slot_map({idx, loc, C, i32(st.slots_, {E, C})}));
            return b.encode({xv, gates, i32(st.slots_, {E, C}), spec_.is_postscore, dispatched});
          };
          auto combine = [&]() -> Status {
            if (S == 0) return Status::OK();
            return b.decode(
                {f32(st.combined_, {E, C, O}), gates, idx, loc, C, spec_.is_postscore, y});
          };
          if (data_parallel) {
            // Every expert here, on this rank's tokens: nothing travels but the weights (which
            // a rank without tokens gathers all the same: the gather is a collective).
            TUTEL_RETURN_IF_ERROR(gather_experts(local));
            if (S == 0) return Status::OK();
            const TensorView dispatched = disp_at(st.expert_in_, 0, {E, C, M});
            TUTEL_RETURN_IF_ERROR(dispatch(dispatched));
            TUTEL_RETURN_IF_ERROR(b.expert_forward(
                {dispatched, whole_view(gathered_, gathers_copies(local)), spec_.activation,
                 spec_.matmul_dtype,
                 keep_pre ? f32(st.pre_, {E, C, H}) : TensorView(), f32(st.hidden_, {E, C, H}),
                 f32(st.combined_, {E, C, O}), workspace(), /*keep_hidden=*/training,
                 // Every expert on this rank's own tokens: its own counts say which it routed to.
                 training ? TensorView() : counts}));
            return combine();
          }
          TUTEL_RETURN_IF_ERROR(dispatch(disp_at(dispatched_, 0, {E, C, M})));
          if (gathers_part) TUTEL_RETURN_IF_ERROR(gather_part(local, side));
          const bool copies = gathers_copies(local);
          const ExpertWeights weights = gathers_part ? part_view(gathered_, side, copies)
                                                     : local_experts(local.experts);
          // A sharded expert's fc2 bias: each rank adds its own columns, or its group's.
          const TensorView bias_slices =
              gathers_part && spec_.has_fc2_bias ? part_fc2_bias(gathered_, side, copies)
                                                 : local.experts.fc2_bias;
          // Chunk j's expert-side rows start at row E_l·W·c0/q of each expert-side buffer.
          auto rows_before = [&](int j) { return El * W * chunk(C, chunks, j, q).c0 / q; };
          TUTEL_RETURN_IF_ERROR(run_chunks(
              chunks,
              [&](int j) {  // dispatch: expert e's slots go to the rank(s) that hold it
                return to_experts(dispatched_.data(),
                                  bytes_of(st.expert_in_) + rows_before(j) * M * disp_size,
                                  chunk(C, chunks, j, q), M * disp_size, side, config.algo);
              },
              [&](int j) -> Status {
                const int64_t Rj = W * chunk(C, chunks, j, q).Cj / q, first = rows_before(j);
                TUTEL_RETURN_IF_ERROR(b.expert_forward(
                    {disp_at(st.expert_in_, first * M, {El, Rj, M}), weights, spec_.activation,
                     spec_.matmul_dtype,
                     keep_pre ? f32_at(st.pre_, first * Hq, {El, Rj, Hq}) : TensorView(),
                     f32_at(st.hidden_, first * Hq, {El, Rj, Hq}),
                     f32_at(expert_out_, first * O, {El, Rj, O}), workspace(),
                     /*keep_hidden=*/training, local_in_use}));
                if (s > 1 && spec_.has_fc2_bias) {
                  const BiasColumns bias = fc2_bias_columns(bias_slices, q);
                  TUTEL_RETURN_IF_ERROR(b.add_row_bias(f32_at(expert_out_, first * O, {Rj, O}),
                                                       bias.values, bias.column));
                }
                return Status::OK();
              },
              [&](int j) {  // combine: the results travel back to the tokens' ranks
                return to_tokens(fp(expert_out_) + rows_before(j) * O, fp(st.combined_),
                                 chunk(C, chunks, j, q), O, side, config.algo);
              }));
          return combine();
        },
        unprepared, &refused);
    if (!ran.ok()) {
      const int64_t bucket = ExchangeTuner::bucket_for(C);
      if (tuner_ && (refused == Unprepared::kThisParallelism || refused == Unprepared::kExpertParallel) &&
          !before_exclusions)
        before_exclusions = tuner_->snapshot(bucket);
      if (tuner_ && refused == Unprepared::kThisParallelism &&
          tuner_->exclude_parallelism(bucket, config.r))
        continue;
      if (tuner_ && refused == Unprepared::kExpertParallel &&
          tuner_->exclude_parallelism(bucket, 1, std::numeric_limits<int>::max()))
        continue;
      // No way ran: the exclusions this forward made bought nothing, and kept they would leave
      // the bucket to a way that just failed (every rank alike: the refusals were agreed).
      if (before_exclusions) tuner_->restore(before_exclusions);
      return ran;
    }
    TUTEL_RETURN_IF_ERROR(wait_collectives());
    if (timed) {
      // The time of the whole expert phase, device work included. A rank that fails here
      // cannot join the bucket's agreement its peers are about to wait in (record_run): it gives
      // the group up.
      TUTEL_RETURN_IF_ERROR(gave_up(b.synchronize()));
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - started)
                          .count();
      TUTEL_RETURN_IF_ERROR(record_run(C, ns));
    }
    break;
  }

  float l_aux = 0.f;
  TUTEL_RETURN_IF_ERROR(b.copy(&l_aux, l_aux_.data(), 4, CopyKind::kDeviceToHost));
  if (stats) *stats = RoutingStats{C, dropped, l_aux};
  st.tokens_ = S;
  st.capacity_ = C;
  st.forward_number_ = number;
  st.config_ = config;
  st.holds_forward_ = training;
  return Status::OK();
}

Status ExpertParallelLayer::backward(const LayerWeights& local, TensorView dy, float dl_aux,
                                     TensorView dx, const LayerWeights& local_grads, Saved& saved,
                                     bool dx_only) {
  if (!saved.holds_forward_)
    return Status::InvalidArgument(
        "backward needs a training forward first: this saved state holds none (never filled, "
        "already consumed, or its forward failed)");
  TUTEL_RETURN_IF_ERROR(check_local(local, spec_, shard_, "weights"));
  TUTEL_RETURN_IF_ERROR(check_local(local_grads, spec_, shard_, "gradients"));
  const int64_t S = saved.tokens_, C = saved.capacity_, E = spec_.experts, k = spec_.k,
                M = spec_.model_dim, O = spec_.out_dim(), W = shard_.world,
                El = shard_.local_experts, s = shard_.shards, Hs = shard_.hidden_shard, R = W * C;
  TUTEL_RETURN_IF_ERROR(dy.expect("dy", DType::kF32, {S, O}));
  TUTEL_RETURN_IF_ERROR(dx.expect("dx", DType::kF32, {S, M}));
  Backend& b = *backend_;
  // From here the group runs this backward's collectives: a failure leaves the forward's state
  // half-used, so it is consumed either way.
  saved.holds_forward_ = false;

  const ExchangeConfig config = saved.config_;
  const bool data_parallel = config.r == 0;
  const ExpertSide side = expert_side(config.r);  // as the forward ran (see there)
  const int64_t q = side.split, Hq = side.hidden;
  const bool gathers_part = !data_parallel && q > 1;
  const int chunks = data_parallel ? 1 : chunk_count(C, config.pipeline, q);
  const int64_t H = spec_.hidden;
  // As in forward: a rank that cannot allocate joins the agreement, and the group refuses.
  const Status ready = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(grow(d_gates_, S * k * 4));
    TUTEL_RETURN_IF_ERROR(grow(d_logits_, S * E * 4));
    TUTEL_RETURN_IF_ERROR(grow(d_combined_, E * C * O * 4));
    if (data_parallel) {
      TUTEL_RETURN_IF_ERROR(grow(d_hidden_, E * C * H * 4));
      TUTEL_RETURN_IF_ERROR(grow(d_expert_in_, E * C * M * 4));
      TUTEL_RETURN_IF_ERROR(grow_gathered(gathers_copies(local)));
      TUTEL_RETURN_IF_ERROR(grow(full_grads_, whole_experts().floats * 4));
      TUTEL_RETURN_IF_ERROR(grow(grad_slice_, El * Hs * std::max(M, O) * 4));
      ExpertShape shape{E, C, M, H, O};
      shape.weights_bf16 = gathers_copies(local);
      return grow(workspace_, b.expert_workspace_bytes(shape, spec_.matmul_dtype));
    }
    TUTEL_RETURN_IF_ERROR(grow(d_expert_out_, El * R * O * 4));
    TUTEL_RETURN_IF_ERROR(grow(d_hidden_, El * R * Hs * 4));
    TUTEL_RETURN_IF_ERROR(grow(d_expert_in_, El * R * M * 4));
    TUTEL_RETURN_IF_ERROR(grow(d_dispatched_, E * C * M * 4));
    // Other forwards have run since this one sized the staging and the workspace; as scratch
    // only grows they still fit this C, and checking here costs nothing and keeps backward
    // correct without relying on that.
    const int64_t widest = std::max(M, O);
    if (s > 1) {
      TUTEL_RETURN_IF_ERROR(grow(send_, W * C * widest * 4));
      TUTEL_RETURN_IF_ERROR(grow(recv_, W * C * widest * 4));
    }
    if (gathers_part) {
      TUTEL_RETURN_IF_ERROR(grow_part(side, gathers_copies(local)));
      TUTEL_RETURN_IF_ERROR(grow(full_grads_, part_experts(side).floats * 4));
      TUTEL_RETURN_IF_ERROR(grow(grad_slice_, Hs * widest * 4));
    }
    ExpertShape shape{El, R / q, M, Hq, O};
    shape.weights_bf16 = gathers_part ? gathers_copies(local) : local.experts.has_bf16_copies();
    return grow(workspace_, b.expert_workspace_bytes(shape, spec_.matmul_dtype));
  }();
  const TensorView xv = f32(saved.x_, {S, M}), scores = f32(saved.scores_, {S, E}),
                   idx = i32(saved.expert_index_, {S, k}), gates = f32(saved.gates_, {S, k}),
                   loc = i32(saved.location_, {S, k}), d_gates = f32(d_gates_, {S, k});

  uint32_t dl_aux_bits = 0;
  std::memcpy(&dl_aux_bits, &dl_aux, sizeof dl_aux_bits);
  TUTEL_RETURN_IF_ERROR(run_group_phase(
      Agreement::kBackward, ready,
      [&] {
        return phase_key(kBackwardPhase, saved,
                         {uint64_t(S), uint64_t(C), dl_aux_bits, uint64_t(config.r),
                          uint64_t(config.algo), uint64_t(chunks)},
                         {dy.data(), dx.data()}, {&local, &local_grads});
      },
      [&]() -> Status {
        // A rank without tokens (S = 0) sends its experts' slots no gradient, takes none back,
        // and adds nothing to the gate's; it runs the collectives alone.
        if (S == 0) {
          TUTEL_RETURN_IF_ERROR(b.fill_zero(f32(d_combined_, {E, C, O})));
        } else {
          TUTEL_RETURN_IF_ERROR(b.decode_backward({dy, f32(saved.combined_, {E, C, O}), gates, idx,
                                                   loc, i32(saved.slots_, {E, C}), spec_.is_postscore,
                                                   f32(d_combined_, {E, C, O}), d_gates}));
        }
        const bool keep_pre = spec_.activation != Activation::kRelu;
        // The experts' part, by r: it leaves the gradient of the dispatched tokens, [E, C, M],
        // in d_dispatched.
        const DeviceBuffer* d_dispatched = &d_dispatched_;
        if (data_parallel) {
          // The whole layer's expert gradient of this rank's tokens, then each rank's slice of
          // the group's sum.
          TUTEL_RETURN_IF_ERROR(gather_experts(local));
          TUTEL_RETURN_IF_ERROR(b.fill_zero(f32(full_grads_, {whole_experts().floats})));
          if (S == 0) return scatter_expert_grads(local_grads);  // its share of the peers' sum
          TUTEL_RETURN_IF_ERROR(b.expert_backward(
              {disp_at(saved.expert_in_, 0, {E, C, M}),
               keep_pre ? f32(saved.pre_, {E, C, H}) : TensorView(), f32(saved.hidden_, {E, C, H}),
               whole_view(gathered_, gathers_copies(local)), spec_.activation, spec_.matmul_dtype,
               f32(d_combined_, {E, C, O}), f32(d_hidden_, {E, C, H}), f32(d_expert_in_, {E, C, M}),
               whole_view(full_grads_), workspace()}));
          TUTEL_RETURN_IF_ERROR(scatter_expert_grads(local_grads));
          d_dispatched = &d_expert_in_;
        } else {
          // With a gather group, the gradients of its H-part over this rank's share of the slots,
          // summed over the group into the ranks' slices at the end.
          if (gathers_part) {
            TUTEL_RETURN_IF_ERROR(gather_part(local, side));
            TUTEL_RETURN_IF_ERROR(b.fill_zero(f32(full_grads_, {part_experts(side).floats})));
          }
          const ExpertWeights weights = gathers_part
                                            ? part_view(gathered_, side, gathers_copies(local))
                                            : local_experts(local.experts);
          const ExpertWeights grads =
              gathers_part ? part_view(full_grads_, side) : local_experts(local_grads.experts);
          const TensorView bias_grad_slices = gathers_part && spec_.has_fc2_bias
                                                  ? part_fc2_bias(full_grads_, side)
                                                  : local_grads.experts.fc2_bias;
          // The forward's chunks: chunk j's expert-side rows start at row E_l·W·c0/q.
          auto rows_before = [&](int j) { return El * W * chunk(C, chunks, j, q).c0 / q; };
          TUTEL_RETURN_IF_ERROR(run_chunks(
              chunks,
              [&](int j) {
                return to_experts(d_combined_.data(), fp(d_expert_out_) + rows_before(j) * O,
                                  chunk(C, chunks, j, q), O * 4, side, config.algo);
              },
              [&](int j) -> Status {
                const int64_t Rj = W * chunk(C, chunks, j, q).Cj / q, first = rows_before(j);
                // The weight gradients accumulate chunk by chunk.
                TUTEL_RETURN_IF_ERROR(b.expert_backward(
                    {disp_at(saved.expert_in_, first * M, {El, Rj, M}),
                     keep_pre ? f32_at(saved.pre_, first * Hq, {El, Rj, Hq}) : TensorView(),
                     f32_at(saved.hidden_, first * Hq, {El, Rj, Hq}), weights, spec_.activation,
                     spec_.matmul_dtype, f32_at(d_expert_out_, first * O, {El, Rj, O}),
                     f32_at(d_hidden_, first * Hq, {El, Rj, Hq}),
                     f32_at(d_expert_in_, first * M, {El, Rj, M}), grads, workspace()}));
                if (s > 1 && spec_.has_fc2_bias) {
                  // This shard's (or group's) bias columns: the gradient is the column sum of
                  // d_out over the slots.
                  const BiasColumns db = fc2_bias_columns(bias_grad_slices, q);
                  TUTEL_RETURN_IF_ERROR(b.add_column_sums(f32_at(d_expert_out_, first * O, {Rj, O}),
                                                          db.column, db.values));
                }
                return Status::OK();
              },
              [&](int j) {
                // Where r > 1 ranks split an expert's H, each one's d_dispatched is a partial sum
                // over its H-part: to_tokens adds them.
                return to_tokens(fp(d_expert_in_) + rows_before(j) * M, fp(d_dispatched_),
                                 chunk(C, chunks, j, q), M, side, config.algo);
              }));
          if (gathers_part) TUTEL_RETURN_IF_ERROR(scatter_part_grads(local_grads, side));
        }
        if (S == 0) return Status::OK();
        TUTEL_RETURN_IF_ERROR(b.encode_backward({f32(*d_dispatched, {E, C, M}), xv, gates, idx, loc,
                                                 C, spec_.is_postscore, dx, d_gates}));
        return b.gate_backward({xv, local.gate_weight, scores, idx, d_gates, dl_aux,
                                spec_.normalize_gate, f32(d_logits_, {S, E}), dx,
                                local_grads.gate_weight});
      },
      Unprepared::kEveryWay, nullptr,
      {MustMatch{saved.forward_number_,
                 [](int64_t mine, int64_t other) {
                   return "the ranks of the expert-parallel group backward different forwards: this rank "
                          "the group's forward " + std::to_string(mine) + ", another forward " +
                          std::to_string(other) +
                          " (numbered in the order the group ran them). Every rank's trainer must backward "
                          "the same micro-batches in the same order (a backward skipped or discarded on one "
                          "rank alone, or micro-batches in another order); every rank refused this "
                          "backward, and its forward is consumed";
                 }},
       MustMatch{dx_only ? 1 : 0, [](int64_t, int64_t) {
                   return std::string(
                       "the ranks of the expert-parallel group disagree on this backward: some asked for dx "
                       "alone (the parameter gradients left as they were: a frozen module, Layer.backward("
                       "param_grads=False), ParamGrads::kKeep), others for the parameter gradients too. An "
                       "expert's gradient sums every rank's tokens, so every rank's trainer must ask the same; "
                       "every rank refused this backward, and its forward is consumed");
                 }}}));
  return wait_collectives();
}

Result<double> ExpertParallelLayer::grad_sum_squares(const LayerWeights& local_grads) {
  TUTEL_RETURN_IF_ERROR(check_local(local_grads, spec_, shard_, "gradients"));
  TUTEL_RETURN_IF_ERROR(agree(Agreement::kGradNorm, nullptr, 0));
  Backend& b = *backend_;
  const int64_t gate_floats = spec_.experts * spec_.model_dim;
  const TensorView gate = f32(grad_norm_, {spec_.experts, spec_.model_dim}),
                   sum = f32_at(grad_norm_, gate_floats, {1});
  // Staged on this rank alone; a rank whose staging fails cannot join the all-reduce its peers
  // wait in, and gives the group up (as agree_on_max).
  const Status staged = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(b.copy(gate.data(), local_grads.gate_weight.data(), gate_floats * 4,
                                 CopyKind::kDeviceToDevice));
    TUTEL_RETURN_IF_ERROR(b.fill_zero(sum));
    const ExpertWeights& e = local_grads.experts;
    for (const TensorView* t : {&e.fc1_weight, &e.fc1_bias, &e.fc2_weight, &e.fc2_bias})
      if (!t->empty()) TUTEL_RETURN_IF_ERROR(b.add_sum_squares(*t, sum));
    return collective_ready();
  }();
  if (!staged.ok()) return gave_up(staged);
  // One all-reduce: the gate's gradient summed over the group (what the step will apply) and the
  // experts' disjoint slices' sums of squares.
  TUTEL_RETURN_IF_ERROR(comm_->all_reduce(gate.data_as<float>(), gate_floats + 1, comm::ReduceOp::kSum));
  TUTEL_RETURN_IF_ERROR(wait_collectives());
  TUTEL_RETURN_IF_ERROR(b.add_sum_squares(gate, sum));
  float host = 0;
  TUTEL_RETURN_IF_ERROR(b.copy(&host, sum.data(), sizeof host, CopyKind::kDeviceToHost));
  TUTEL_RETURN_IF_ERROR(b.synchronize());
  return double(host);
}

Status ExpertParallelLayer::all_reduce_gate_grad(TensorView gate_grad, std::span<const Alike> alike, bool sum) {
  TUTEL_CHECK(alike.size() <= kMaxAlike);
  // Each value as itself and negated: after the MAX, [2i] is the highest and -[2i + 1] the
  // lowest any rank passed.
  int64_t values[kAgreementValues] = {};
  for (size_t i = 0; i < alike.size(); ++i) {
    TUTEL_CHECK(alike[i].value >= 0);
    values[2 * i] = alike[i].value;
    values[2 * i + 1] = -alike[i].value;
  }
  TUTEL_RETURN_IF_ERROR(agree(Agreement::kGateGradSum, values, 2 * alike.size()));
  for (size_t i = 0; i < alike.size(); ++i)
    if (values[2 * i] != -values[2 * i + 1])
      return Status::InvalidArgument(
          std::string("the ranks of the expert-parallel group stepped with different ") + alike[i].what +
          ": every rank's trainer must step alike (the same settings, after the same backwards); no rank "
          "stepped, and the group goes on");
  if (!sum) return Status::OK();
  TUTEL_RETURN_IF_ERROR(collective_ready());
  TUTEL_RETURN_IF_ERROR(
      comm_->all_reduce(gate_grad.data_as<float>(), gate_grad.numel(), comm::ReduceOp::kSum));
  return wait_collectives();
}

}  // namespace tutel::graphs
