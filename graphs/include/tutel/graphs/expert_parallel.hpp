// The MoE layer across an expert-parallel group (DESIGN §2 steps 4, 7, 9; any r, d,
// a = linear or 2DH, or (r, a, d) chosen per capacity bucket by the tuner): each of W ranks
// holds E/W experts (E ≥ W) or one shard of one expert along H (E < W, s = W/E shards per
// expert), the gate is replicated, and with r >= 1 all-to-alls move the dispatched tokens to their
// experts and the results back (with r < s, groups of an expert's ranks first put their
// H-slices together and split its slots); with r = 0 the ranks gather every expert's weights
// instead.
// With d > 1 the expert phase runs in d chunks of the capacity (adaptive pipelining;
// ExpertParallelOptions, docs/decisions.md).
//
// Every rank's output and gradients equal those of one process holding all E experts run on
// that rank's tokens with the group's capacity (tests/graphs/expert_parallel_test.cpp).
// Capacity is agreed over the group: S and the largest expert count are all-reduced (MAX), so
// ranks with different token counts work (Tutel's inequivalent_tokens).
//
// Several training forwards may wait for their backwards at once (pipelined micro-batches):
// everything one forward leaves for its backward lives in a Saved owned by the caller, and the
// backwards may come in any order. The layer itself keeps only scratch that no call outlives.
//
// Ordering: forward, backward, all_reduce_gate_grad and grad_sum_squares are collectives. Every
// rank of the group must make the same sequence of calls, and the n-th call on one rank must be
// the same micro-batch's forward (or backward) as the n-th call on every other rank. The group
// checks both at each call's first agreement: calls of different kinds (a forward meeting a
// step), and backwards of different forwards (the group numbers its forwards in the order it
// ran them), are refused on every rank, and the group stays in step. Which order that is (e.g.
// the backwards in reverse) is the caller's choice, as long as every rank makes it.
//
// Backends: any. Every access to the backend's memory goes through the Backend (copies of the
// right kind, and its ops), so the layer runs on the CPU backend with a host communicator (UCX)
// and on the CUDA backend with an NCCL communicator alike, with the same results on the CPU
// as ever. The communicator must take the backend's memory (the NCCL communicator takes device
// memory only); the few scalars the group agrees on (the capacity's inputs) make a round trip
// through a small buffer of the backend's memory for that reason. Each collective starts after
// Backend::synchronize(), so a communicator on a queue of its own still reads what the
// backend's ops wrote; it must be done when it returns (NcclOptions::synchronize).
//
// Graphs: a step runs as phases through a PhaseRunner (phase_runner.hpp): route (gate,
// locations), experts (slot map, encode, the dispatch all-to-all, the expert FFNs, the combine
// all-to-all, decode) and backward (all of it, both all-to-alls included). Between route and
// experts the host reads the expert counts and the group agrees on the capacity, so a forward is
// two graphs around one small collective; a backward is one graph. With a capturing runner (CUDA
// graphs) the communicator must enqueue on the backend's queue and return (NCCL on the backend's
// stream, NcclOptions::synchronize = false, ExpertParallelOptions::comm_on_backend_queue): the
// NCCL calls are then captured inside the graphs, and the layer waits for them with
// Communicator::wait_enqueued (bounded by the collective timeout) where the host needs results.
// Each phase's key holds its sizes, scalars and every address it touches, with epochs that move
// whenever a buffer of the layer, of a Saved, of the backend's or of the communicator's scratch
// is reallocated, so no graph runs with stale addresses. The phases with collectives (experts,
// backward) run the same way on every rank, as NCCL requires: before each, one more 88-byte
// all-reduce (the tagged agreement, agree) settles the least ready rank's way (op by op,
// capture, or launch of the graphs captured together); a failed collective drops every graph.
//
// Thread-safety: one thread at a time per object, and per Saved (a Saved is only touched inside
// the forward or backward it is passed to). A pipelined phase also runs on the layer's own
// worker thread, which uses the communicator, Backend::copy and Backend::add while the calling
// thread runs the GEMMs; both are done when the call returns. tuner()->entries() may be read
// from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "tutel/comm/communicator.hpp"
#include "tutel/graphs/exchange_tuner.hpp"
#include "tutel/graphs/phase_runner.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::graphs {

// Where this rank's parameters sit in the global layer.
struct ExpertShard {
  int world = 1, rank = 0;
  int64_t local_experts = 1;  // E_l
  int64_t first_expert = 0;   // global index of local expert 0
  int64_t shards = 1;         // s: ranks per expert (E < W), else 1
  int64_t shard_index = 0;    // which H-slice of the expert this rank holds
  int64_t hidden_shard = 0;   // H_s = H / s
  int64_t out_shard = 0;      // O_s = ceil(O / s): Tutel's fc2 bias slice
};

// E ≥ W needs W | E; E < W needs E | W and s | H. The message says which rule failed.
Result<ExpertShard> expert_shard(const LayerSpec& spec, int world, int rank);

// Shapes of this rank's parameters: fc1 [E_l, H_s, M], b1 [E_l, H_s], fc2 [E_l, H_s, O],
// b2 [E_l, O_s]; the gate [E, M] is whole on every rank.
Shape local_fc1_shape(const LayerSpec& spec, const ExpertShard& shard);
Shape local_fc2_shape(const LayerSpec& spec, const ExpertShard& shard);
Shape local_fc1_bias_shape(const LayerSpec& spec, const ExpertShard& shard);
Shape local_fc2_bias_shape(const LayerSpec& spec, const ExpertShard& shard);

// Copies this rank's slice of a whole-layer (single-process, Tutel-layout) parameter set,
// host memory to host memory: what the daemon does with a checkpoint that holds all E experts.
struct HostLayerParams {
  std::vector<float> gate, fc1, fc1_bias, fc2, fc2_bias;  // empty bias = absent
};
HostLayerParams slice_for_rank(const LayerSpec& spec, const ExpertShard& shard,
                               const HostLayerParams& whole);

struct ExpertParallelOptions {
  // Runs every all-to-all of the layer (forward dispatch and combine, and their backward); k2DH
  // needs comm.local_size() to divide comm.size().
  comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear;
  // d (DESIGN §1, adaptive pipelining), 1..64: the expert phase runs in d chunks of the capacity
  // (fewer when the capacity is smaller), each exchanged and computed on its own. Where the
  // backend's ops are synchronous on the host (CPU) and the communicator is not on the backend's
  // queue, a worker thread of the layer exchanges chunks while the calling thread runs the
  // expert GEMMs of another; elsewhere (CUDA, whose one stream orders everything) the chunks run
  // one after another: same results, no overlap yet. The capacity itself does not depend on d.
  int pipeline = 1;
  // r (DESIGN §1, adaptive parallelism). 0, data parallel: every rank gathers every expert's
  // weights (all-gather), runs all E experts on its own tokens, and its weight gradients are
  // summed into the ranks' slices (reduce-scatter). r >= 1, expert parallel: the tokens travel to
  // their experts and back. Where E < W, s = W / E ranks hold an H-slice each of one expert and r
  // (a divisor of s) says how many of them split its H: r = s (expert + model parallel), each
  // computes its slice over all of the expert's slots and the s partial sums are added on the way
  // back; r < s, the s / r ranks of each group (consecutive ranks) all-gather their slices into
  // an H / r part and split the expert's slots among them, so each token travels to r ranks
  // instead of s, and the weight gradients are reduce-scattered back into the slices; r = 1
  // (expert + data parallel, Tutel's default) gathers the whole expert. With E >= W, r is 0 or 1.
  // Each rank keeps its slice of the parameters under every r, so switching moves none; r = 0
  // pays off where the weights are smaller than the tokens that would travel. With bf16 matmuls
  // and the weights' bf16 copies given, the gathers take the copies (half the bytes) and not the
  // f32 weights, and the matmuls read them as they are.
  int r = 1;
  // Tuning (exchange_tuner.hpp): with two or more candidates, each capacity bucket measures them
  // and keeps the fastest; with one, that one runs. `r`, `algo` and `pipeline` are then ignored.
  // Every candidate must be valid on its own (a 2DH candidate needs local_size to divide the group
  // size). Every rank of the group must pass the same candidates. Decisions restored
  // (tune.decided) are kept only where every rank restored the same ones (restored_tuning()).
  TunerOptions tune;
  // Runs the step's phases, e.g. as CUDA graphs (make_phase_runner). Not owned: it must outlive
  // the layer and be used by no other. Null: op by op. Its graphs hold the communicator's
  // collectives, so it must go before the communicator does (NCCL waits for those graphs); the
  // layer has the communicator drop them before it aborts (Communicator::add_graph_release).
  PhaseRunner* runner = nullptr;
  // The communicator enqueues its collectives on the backend's queue and returns without waiting
  // (NCCL on the backend's stream, NcclOptions::synchronize = false): queue order replaces the
  // wait for the backend before each collective, and the layer calls comm.wait_enqueued() where
  // the host needs a result. Required by a runner that captures.
  bool comm_on_backend_queue = false;
};

class ExchangeWorker;

class ExpertParallelLayer {
 public:
  // The width of the agreement that opens each call (agree): what it is (twice, as max and
  // -min) and up to kAgreementValues of its own (a forward: three, then the experts' counts
  // below), so that ranks out of step (one in a forward, another in a step) meet in a collective
  // of one size and see it, rather than reduce buffers of different sizes or hang. Its width
  // (agreement_width) is part of the group's fingerprint at creation.
  static constexpr size_t kAgreementValues = 9, kAgreementWidth = kAgreementValues + 2;
  // A layer of at most this many experts agrees at each forward on which experts some rank routed
  // a token to (their counts, after the forward's three values), so that an inference computes
  // only those (ExpertForwardArgs::expert_count); every agreement of the layer is then E values
  // wider (4 KiB more at 512: about 2 us on an all-reduce of two ranks here, docs/decisions.md).
  static constexpr int64_t kMaxAgreedCounts = 512;
  // The width of every agreement of a layer of `spec` (kAgreementWidth, plus E where E is at most
  // kMaxAgreedCounts).
  static size_t agreement_width(const LayerSpec& spec) {
    return kAgreementWidth + (spec.experts <= kMaxAgreedCounts ? static_cast<size_t>(spec.experts) : 0);
  }

  // Collective: every rank of the group creates its layer at once, and the ranks compare what
  // they were given (one all-gather of three fingerprints: the spec; r / all_to_all / pipeline /
  // tuning; the group protocol of the build). Ranks that differ would pair their collectives with other sizes or in another
  // order, so every rank refuses the layer with InvalidArgument, naming the ranks that differ
  // from rank 0 and in what.
  // The spec is the global layer; the group is `comm` (its rank and size define the shard),
  // whose buffers are `backend`'s memory: a host communicator for the CPU backend, an NCCL
  // communicator on the CUDA backend's device (ideally on its stream, as the daemon's).
  // `algo` runs every all-to-all of the layer (forward dispatch and combine, and their
  // backward); k2DH needs comm.local_size() to divide comm.size() and is refused otherwise.
  // Every r with 1 <= r < s among the ways it may run splits `comm` once (Communicator::split)
  // into its groups of s / r ranks, which the layer keeps.
  // Gate noise is refused (not supported across a group yet).
  static Result<ExpertParallelLayer> create(Backend& backend, comm::Communicator& comm,
                                            const LayerSpec& spec,
                                            comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear);
  static Result<ExpertParallelLayer> create(Backend& backend, comm::Communicator& comm,
                                            const LayerSpec& spec,
                                            const ExpertParallelOptions& options);

  ExpertParallelLayer(ExpertParallelLayer&&) noexcept;
  ExpertParallelLayer& operator=(ExpertParallelLayer&&) noexcept;
  ~ExpertParallelLayer();

  const ExpertShard& shard() const { return shard_; }
  const LayerSpec& spec() const { return spec_; }
  // The fixed configuration (when not tuning).
  comm::AllToAllAlgo all_to_all_algo() const { return fixed_.algo; }
  int pipeline() const { return fixed_.pipeline; }
  int parallelism() const { return fixed_.r; }
  // The tuner's dictionary; null when not tuning. Its entries() and decisions() may be read from
  // any thread.
  const ExchangeTuner* tuner() const { return tuner_.get(); }
  // OK, or why the tuner decisions this rank restored (ExpertParallelOptions::tune.decided) were
  // forgotten: the ranks had not restored the same ones.
  const Status& restored_tuning() const { return restored_tuning_; }
  // Whether d > 1 overlaps exchanges with the expert GEMMs on `backend` with `options` (see
  // ExpertParallelOptions::pipeline): what the tuner's candidates depend on (auto_candidates).
  static bool chunks_overlap(const Backend& backend, const ExpertParallelOptions& options);
  // The same for this layer.
  bool overlaps_chunks() const;

  // What one training forward keeps for its backward: its input, its routing (scores, expert
  // index, gate values, locations, slot map), its capacity and token count, and the
  // expert-side activations (the tokens received by this rank's experts, their pre-activation
  // and hidden values, the combined expert outputs back at the tokens' rank). Owned by the
  // caller, one per training forward in flight. Its buffers come from the layer's backend (it
  // must not outlive it) and only grow: a Saved reused across steps allocates nothing once it
  // has held the largest micro-batch. Move-only.
  class Saved {
   public:
    Saved() = default;
    Saved(Saved&&) noexcept = default;
    Saved& operator=(Saved&&) noexcept = default;

    // A training forward's state waits here for its backward.
    bool holds_forward() const { return holds_forward_; }
    int64_t tokens() const { return tokens_; }      // S of that forward
    int64_t capacity() const { return capacity_; }  // the C the group agreed on
    // Device memory held.
    size_t bytes() const;

   private:
    friend class ExpertParallelLayer;
    bool holds_forward_ = false;
    int64_t tokens_ = 0, capacity_ = 0;
    // Which of the group's forwards this is (forwards_ when it ran): a backward must name the
    // same one on every rank.
    int64_t forward_number_ = 0;
    // How the forward ran its expert phase; the expert-side buffers hold its chunks one after
    // another ([chunk][E_l, W·C_j/q, ·], q = the ranks that split an expert's slots under its r),
    // and the backward runs the same way.
    ExchangeConfig config_;
    DeviceBuffer x_, scores_, expert_index_, gates_, location_;  // [S, ·]
    DeviceBuffer slots_;                                         // [E, C]
    // [E_l, W·C/q, ·], sized for q = 1 (pre_ and hidden_ hold q·H_s columns, so the same bytes);
    // expert_in_ in the dispatch dtype.
    DeviceBuffer expert_in_, pre_, hidden_;
    DeviceBuffer combined_;                                      // [E, C, O]
  };

  // x [S, M] → y [S, O] on this rank's tokens; collective over the group. S may be 0 (a rank
  // with an empty batch runs its part of the collectives for its peers' tokens; its l_aux is 0,
  // and its backward adds nothing to the gate's gradient). x, y and every
  // tensor of `local` are the backend's memory. `local` holds this rank's parameters (shapes
  // above), its expert weights optionally with bf16 copies of the same local shapes
  // (ExpertWeights; the caller slices them as the weights, e.g. Backend::convert of each local
  // slice), read when the spec's matmul dtype is bf16. A training forward passes `saved`: what
  // backward needs is copied into it (x included, so the caller may reuse x's memory),
  // replacing whatever it held. Without `saved` (inference) nothing is kept.
  Status forward(const LayerWeights& local, TensorView x, TensorView y, RoutingStats* stats,
                 Saved* saved = nullptr);
  // Backward of the training forward held by `saved`; collective. dy is [saved.tokens(), O];
  // dx is overwritten; `local_grads` accumulate (so several micro-batches add up; the gate's
  // locally: call all_reduce_gate_grad before the optimizer step). Arguments that do not fit
  // (shapes, a `saved` holding no forward) are refused before anything runs, and `saved` is
  // kept; otherwise `saved` is consumed, also when a collective fails, and may be passed to
  // another forward.
  // `dx_only`: the caller puts `local_grads` back as they were after this backward (a backward
  // for dx alone, a frozen module); the layer accumulates into them all the same. Every rank
  // must say the same: an expert's gradient sums every rank's tokens routed to it, so a group
  // where some ranks keep their gradients and some do not would keep only part of a step's. The
  // group checks it in the backward's first agreement (no collective more) and refuses the step
  // on every rank (InvalidArgument) when the ranks differ; `saved` is consumed then too. The
  // same agreement checks that every rank backwards the same forward (the group numbers its
  // forwards): a backward of another forward than its peers' is refused likewise.
  Status backward(const LayerWeights& local, TensorView dy, float dl_aux, TensorView dx,
                  const LayerWeights& local_grads, Saved& saved, bool dx_only = false);
  // This rank's step was refused before the layer could run it (its owner could not stage the
  // request's input or output, say): it joins the step's first agreement as a rank that cannot
  // run it, so every rank refuses the same step rather than waiting for this one until the
  // collective timeout. Returns `why`. refuse_backward consumes `saved`, as a backward would.
  Status refuse_forward(Status why);
  Status refuse_backward(Saved& saved, Status why);
  // A value of a step that every rank must pass alike (a caller's setting, say the learning
  // rate), named for the error that says which differs. Non-negative.
  struct Alike {
    const char* what;
    int64_t value;
  };
  static constexpr size_t kMaxAlike = kAgreementValues / 2;
  // Opens a step: checks that every rank passed the same `alike` values (at most kMaxAlike;
  // where one differs, every rank refuses the step with InvalidArgument naming it, before
  // anything is summed), then, where `sum`, sums the replicated gate's gradient over the group
  // in place. Collective: every rank calls it, in the same order as grad_sum_squares (each
  // opens with the tagged agreement, so a rank that calls another one at this point fails both
  // with InvalidArgument naming them, instead of pairing all-reduces of different lengths).
  // Every rank passes the same `sum` where `alike` carries it.
  Status all_reduce_gate_grad(TensorView gate_grad, std::span<const Alike> alike = {}, bool sum = true);
  // The squared L2 norm of the whole layer's gradients, the same on every rank (collective, in
  // the group's order like the others): the experts' slices (disjoint over the group) and the
  // gate's gradient summed over the group, as all_reduce_gate_grad will leave it. Leaves
  // `local_grads` as they are. In f32 (each tensor summed in double, then added in f32): an
  // overflow or a NaN anywhere gives inf or NaN, as torch's norm does.
  Result<double> grad_sum_squares(const LayerWeights& local_grads);

 private:
  ExpertParallelLayer(Backend& b, comm::Communicator& c, LayerSpec spec, ExpertShard shard,
                      const ExpertParallelOptions& options);
  // What an agreement opens: every call of the group (forward, backward, the control
  // collectives) starts with one, and the expert phase has its own.
  enum class Agreement : int64_t { kForward = 1, kExpertPhase, kBackward, kGateGradSum, kGradNorm };
  // values[0..count) = their MAX over the group, where every rank agrees on `what`; where one
  // does not, every rank refuses the call it is in (InvalidArgument, naming both calls).
  Status agree(Agreement what, int64_t* values, size_t count);
  // Grows `buf` to `bytes` (contents not kept); a reallocation moves the epoch.
  Status grow(DeviceBuffer& buf, size_t bytes);
  enum Phase : int { kRoutePhase = 1, kExpertsPhase, kBackwardPhase };
  // The key of a phase: its sizes and scalars (`words`), the buffers' epoch and the backend's
  // scratch, the Saved it works on, and every address the caller passed.
  PhaseKey phase_key(Phase phase, const Saved& st, std::initializer_list<uint64_t> words,
                     std::initializer_list<const void*> io,
                     std::initializer_list<const LayerWeights*> weights) const;
  // Runs a phase's ops through the runner (directly without one); the key is built only then.
  // A phase without collectives is decided by this rank alone; one with collectives the way the
  // group agrees on (a small all-reduce when the runner captures).
  // `prepared`: whether this rank could allocate the phase's buffers; the group refuses the step
  // together when a rank could not. `unprepared`: which ways a failure of `prepared` rules out,
  // those needing the buffers that failed (another parallelism r might fit).
  // *refused (when given) is what the group refused: the widest of the refusing ranks' scopes,
  // kPrepared when it did not refuse. The tuner may drop the ways it names, identically on
  // every rank.
  enum class Unprepared : int64_t {
    kPrepared = 0,
    kThisParallelism = 1,  // r's own buffers: r = 0's gathered weights, an r < s's gathered part
    kExpertParallel = 2,   // what every r >= 1 needs: the exchange's buffers
    kEveryWay = 3,         // what the step needs whichever way it runs
  };
  Status run_local_phase(const std::function<PhaseKey()>& key, const std::function<Status()>& ops);
  // `must_match`: values every rank must pass alike (a caller's choice the group has to share,
  // the forward a backward is for); where the ranks differ the group refuses the step, each
  // rank with the first differing value's `refusal` (of its value and another rank's), after
  // the checks above (a rank that could not prepare names the cause).
  struct MustMatch {
    int64_t value;  // (no initializer: the default argument below value-initializes it to 0)
    std::function<std::string(int64_t mine, int64_t other)> refusal;  // an InvalidArgument's message
  };
  // `what`: the call the phase's agreement opens (agree).
  Status run_group_phase(Agreement what, const Status& prepared, const std::function<PhaseKey()>& key,
                         const std::function<Status()>& ops,
                         Unprepared unprepared = Unprepared::kEveryWay,
                         Unprepared* refused = nullptr, std::array<MustMatch, 2> must_match = {});
  // The forward's agreed token count and fullest expert are in range, and the buffers sized
  // from them fit in int64 (InvalidArgument, the same on every rank, otherwise).
  Status check_agreed_routing(int64_t tokens, int64_t fullest_expert) const;
  Status refused_by_a_peer() const;
  // A phase's ops that failed part way leave the group out of step: gives up the communicator
  // (Communicator::give_up) and returns `st`; OK passes through.
  Status gave_up(Status st);
  // Gives back the scratch a refused step may have grown, and returns `why`.
  Status refuse(Status why);
  // Waits for collectives that return once enqueued (comm_on_backend_queue).
  Status wait_collectives();
  TensorView f32(const DeviceBuffer& buf, Shape shape) const;
  TensorView f32_at(const DeviceBuffer& buf, int64_t offset_floats, Shape shape) const;
  TensorView i32(const DeviceBuffer& buf, Shape shape) const;
  // The dispatched tokens (dispatched_, Saved::expert_in_) in the spec's dispatch dtype, from
  // element `offset`.
  TensorView disp_at(const DeviceBuffer& buf, int64_t offset, Shape shape) const;
  TensorView workspace() const;  // workspace_, all of it, as u8
  // How a parallelism r >= 1 lays out the expert side: `split` ranks (q = s / r; 1 with E >= W
  // or r = s) put their H-slices of an expert together into `hidden` = q·H_s columns and split
  // its slots, each taking W·C/q rows per local expert; `gather` is their communicator (a split
  // of the group; null when q = 1).
  struct ExpertSide {
    int64_t split = 1;
    int64_t hidden = 0;
    comm::Communicator* gather = nullptr;
  };
  ExpertSide expert_side(int r) const;
  // The two directions of the all-to-all (forward dispatch and backward of combine; forward
  // combine and backward of dispatch) for capacity C. One chunk of the capacity at a time:
  // slots [c0, c0 + Cj) of every expert; the expert side holds that chunk alone
  // ([E_l, W·Cj/q, row], this rank's share of the slots). to_experts moves rows of `row_bytes`
  // (the dispatched tokens may be bf16); to_tokens rows of `row` floats, as it adds the partial
  // sums of an expert's r H-parts. Whole experts (s = 1) travel straight between the token side
  // and the expert side (block all-to-all: a piece per local expert), sharded ones through
  // send_ and recv_.
  struct Chunk {
    int64_t C, c0, Cj;
  };
  Status to_experts(const void* token_side, void* expert_side, Chunk chunk, int64_t row_bytes,
                    const ExpertSide& side, comm::AllToAllAlgo algo);
  Status to_tokens(const float* expert_side, float* token_side, Chunk chunk, int64_t row,
                   const ExpertSide& side, comm::AllToAllAlgo algo);
  // The expert phase's chunks for capacity C and d, cut at multiples of q (each chunk's slots are
  // split among q ranks): the in/compute/out of each (chunk_pipeline).
  int chunk_count(int64_t C, int d, int64_t q) const;
  Chunk chunk(int64_t C, int count, int j, int64_t q) const;
  Status run_chunks(int count, const std::function<Status(int)>& in,
                    const std::function<Status(int)>& compute,
                    const std::function<Status(int)>& out);
  // The tuner's part of a forward: the configuration for C, and the time of its run.
  ExchangeConfig config_for(int64_t C);
  Status record_run(int64_t C, int64_t nanoseconds);
  // r = 0. The whole layer's expert tensors, [E, H, M], [E, H, O], [E, H], [E, O], at these
  // offsets (floats) of gathered_ (weights) and full_grads_ (gradients); the fc2 bias slices of
  // sharded experts pass through a [W, O_s] staging area after them. Without f32 weights
  // (gathered bf16 copies instead, gathers_copies) only the biases are laid out.
  struct WholeExperts {
    int64_t fc1 = 0, fc2 = 0, fc1_bias = 0, fc2_bias = 0, fc2_bias_slices = 0, floats = 0;
  };
  WholeExperts whole_experts(bool f32_weights = true) const;
  // The whole layer's experts in `buf` (laid out by whole_experts(!copies)). With `copies` the
  // weights are the bf16 copies in gathered_bf16_ (fc1's, then fc2's), and the f32 weights are
  // shapes without data: the bf16 matmuls read only the copies.
  ExpertWeights whole_view(const DeviceBuffer& buf, bool copies = false) const;
  // r = 0 gathers the bf16 copies instead of the f32 weights: bf16 matmuls and both copies given.
  bool gathers_copies(const LayerWeights& local) const;
  // Sizes gathered_ (and gathered_bf16_) for the whole layer's weights.
  Status grow_gathered(bool copies);
  // Every rank's slices of the expert weights (or of their bf16 copies), gathered into
  // gathered_ (and gathered_bf16_) (collective).
  Status gather_experts(const LayerWeights& local);
  // full_grads_ summed over the group, each rank's slices added to its local_grads (collective).
  Status scatter_expert_grads(const LayerWeights& local_grads);
  // r < s. The H-part of this rank's expert that its gather group puts together, [1, q·H_s, ·],
  // at these offsets (floats) of gathered_ (weights) and full_grads_ (gradients), and the
  // group's q slices of the fc2 bias ([q·O_s] columns from its first shard's). Without f32
  // weights (gathered bf16 copies instead, gathers_copies) only the biases are laid out.
  struct PartExperts {
    int64_t fc1 = 0, fc2 = 0, fc1_bias = 0, fc2_bias = 0, floats = 0;
  };
  PartExperts part_experts(const ExpertSide& side, bool f32_weights = true) const;
  // The part in `buf` as the weights the expert ops take (laid out by part_experts(!copies); with
  // `copies` the weights are the bf16 copies in gathered_bf16_). No fc2 bias: each rank adds its
  // group's columns (fc2_bias_columns), as a shard adds its own.
  ExpertWeights part_view(const DeviceBuffer& buf, const ExpertSide& side, bool copies = false) const;
  TensorView part_fc2_bias(const DeviceBuffer& buf, const ExpertSide& side, bool copies = false) const;
  Status grow_part(const ExpertSide& side, bool copies);
  // The group's slices (or their bf16 copies) gathered into gathered_ (collective over the gather
  // group), and full_grads_ summed over it back into each rank's slices of local_grads.
  Status gather_part(const LayerWeights& local, const ExpertSide& side);
  Status scatter_part_grads(const LayerWeights& local_grads, const ExpertSide& side);
  // mine += block `group.rank()` of the sum over `group` of each rank's `full` (collective).
  Status reduce_scatter_add(comm::Communicator& group, const float* full, const TensorView& mine);
  // Waits for the backend's queued ops before a collective reads what they wrote.
  Status collective_ready();
  // values[0..count) = their MAX over the group, through agreed_ (host in, host out). Untagged:
  // for the layer's creation and for what follows an agreement within one call (agree).
  Status agree_on_max(int64_t* values, size_t count);
  ExpertWeights local_experts(const ExpertWeights& w) const;  // drops fc2 bias when sharded
  // A sharded expert's fc2 bias: the output columns of `count` consecutive shards' slices from
  // this rank's group's first (count 1: this shard's own; q: its gather group's) and, from those
  // slices ([count·O_s]: a bias or its gradient), the values that fall within O.
  struct BiasColumns {
    int64_t column;     // first output column
    TensorView values;  // [n] f32
  };
  BiasColumns fc2_bias_columns(const TensorView& bias_slices, int64_t count) const;

  Backend* backend_;
  comm::Communicator* comm_;
  LayerSpec spec_;
  ExpertShard shard_;
  ExchangeConfig fixed_;                    // when not tuning
  std::unique_ptr<ExchangeTuner> tuner_;    // when tuning
  Status restored_tuning_;
  std::unique_ptr<ExchangeWorker> worker_;  // made at the first overlapped phase
  PhaseRunner* runner_;
  // The runner's graphs hold the communicator's collectives: dropped before it aborts.
  comm::GraphRelease graph_release_;
  bool comm_on_backend_queue_;
  uint64_t epoch_ = 0;  // moves whenever grow() reallocates a buffer (the layer's or a Saved's)
  uint64_t capture_rounds_ = 0;  // the last capture round the group agreed on
  // The group's forwards so far (refused ones too: every rank counts each forward the group
  // agreed to be in): the same count on every rank, so it names a forward across the group.
  int64_t forwards_ = 0;

  // Scratch: no call leaves anything in these that a later call reads.
  Saved inference_;  // an inference forward's routing and activations
  DeviceBuffer l_aux_, expert_count_;
  DeviceBuffer agreed_;               // i64: the scalars agree_on_max reduces (the widest agreement)
  DeviceBuffer grad_norm_;            // [E·M + 1] f32: grad_sum_squares's all-reduce
  std::vector<int32_t> host_counts_;  // [E]: expert_count_ copied to the host
  // [E_l]: 1 for each local expert some rank routed a token to in this forward, 0 for the others
  // (from the forward's agreement); a CPU inference skips those at 0 (ExpertForwardArgs).
  std::vector<int32_t> local_in_use_;
  DeviceBuffer dispatched_;           // [E, C, M] local dispatch, in the dispatch dtype
  DeviceBuffer send_, recv_;          // all-to-all staging
  DeviceBuffer expert_out_, workspace_;
  DeviceBuffer d_gates_, d_logits_, d_combined_, d_expert_out_, d_hidden_, d_expert_in_,
      d_dispatched_;
  DeviceBuffer gathered_, gathered_bf16_, full_grads_, grad_slice_;  // r = 0, and r < s
  // The gather groups of every r < s the layer may run, made at creation. The runner's graphs,
  // which may hold their collectives, are dropped before they go (expert_parallel.cpp).
  class GatherGroups;
  std::unique_ptr<GatherGroups> gather_groups_;
};

}  // namespace tutel::graphs
