// The cuda-graph plan: the recorded ops of each phase captured as a CUDA graph on the backend's
// stream (cudaStreamCaptureModeThreadLocal, so other executors' threads may keep allocating),
// instantiated once and launched per step.
//
// What a graph bakes in: the plan's buffer addresses (fixed: the step's x, y, dy, dx live in
// the plan's own buffers, copied in and out when the caller's tensors are elsewhere), the
// parameters' and gradients' addresses (fixed for the plan's life), the backend's scratch
// address, and the step's scalars: S, C and dl_aux (a phase's "shape"). The first time a shape
// is seen its phase runs op by op (which also grows the backend's scratch to what the shape
// needs, so nothing allocates during a capture); the next time it is captured and either
// instantiated or, once the phase holds its few executables, applied to the least recently
// used one with cudaGraphExecUpdate (a new executable where the topology changed); from then on
// it is launched. An executable whose baked scratch address has moved (Backend::scratch_epoch)
// is captured again. Gate noise, whose counter changes every step, runs outside the graphs.
//
// With dynamic capacity (f <= 0) a forward is two graphs around the one small read of the
// expert counts: route (gate, locations, counts and l_aux → pinned host) and experts (slot map,
// encode, expert FFNs, decode). With f > 0 the capacity follows from S and the forward is one
// graph, which reads l_aux last: the backend runs the gate loss beside the rest of the step.
//
// Never links the driver library: runtime API only.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_graph_handles.hpp"
#include "src/plan_base.hpp"

namespace tutel::graphs::detail {
namespace {

Status cuda_failure(cudaError_t err, const char* expr, int line) {
  // The launchers of later ops return cudaGetLastError(): leave no stale error for them.
  (void)cudaGetLastError();
  std::string msg = std::string(expr) +
                    " failed at graphs/cuda/cuda_graph_plan.cpp:" + std::to_string(line) + ": " +
                    cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(std::move(msg));
  return Status::Internal(std::move(msg));
}

#define GRAPHS_CUDA_CHECK(expr)                                                                  \
  do {                                                                                           \
    const cudaError_t _graphs_cuda_err = (expr);                                                 \
    if (_graphs_cuda_err != cudaSuccess) return cuda_failure(_graphs_cuda_err, #expr, __LINE__); \
  } while (0)

struct PinnedDeleter {
  void operator()(void* p) const { (void)cudaFreeHost(p); }
};
using PinnedPtr = std::unique_ptr<void, PinnedDeleter>;

// The scalars a captured phase baked in beyond the plan's fixed addresses.
struct PhaseShape {
  int64_t tokens = -1;
  int64_t capacity = -1;
  uint32_t dl_aux_bits = 0;
  bool operator==(const PhaseShape&) const = default;
};

// A phase keeps a few executables, so that shapes that alternate (dynamic capacity moves C
// between neighbouring values) each keep theirs, and remembers the shapes it ran op by op.
constexpr size_t kExecsPerPhase = 4;
constexpr size_t kSeenPerPhase = 8;

struct Executable {
  ExecPtr exec;
  PhaseShape shape;
  uint64_t scratch_epoch = 0;  // the backend scratch address it baked in
  uint64_t last_use = 0;
};

// A ring of the last few shapes.
struct ShapeRing {
  std::array<PhaseShape, kSeenPerPhase> shapes{};
  size_t count = 0;

  bool contains(const PhaseShape& s) const {
    for (size_t i = 0; i < std::min(count, kSeenPerPhase); ++i)
      if (shapes[i] == s) return true;
    return false;
  }
  void add(const PhaseShape& s) { shapes[count++ % kSeenPerPhase] = s; }
};

struct PhaseGraphs {
  std::vector<Executable> execs;  // at most kExecsPerPhase
  ShapeRing seen;                 // shapes that ran op by op: captured the next time
  ShapeRing failed;               // shapes whose capture failed: op by op from then on

  bool has_seen(const PhaseShape& s) const { return seen.contains(s); }
  void remember(const PhaseShape& s) { seen.add(s); }
};

enum GraphIndex : size_t { kRouteGraph, kExpertsGraph, kForwardGraph, kBackwardGraph, kGraphCount };

class CudaGraphPlan final : public PlanBase {
 public:
  CudaGraphPlan(Backend& backend, const PlanTarget& target, const PlanKey& key)
      : PlanBase(backend, target, key, /*io_buffers=*/true),
        stream_(static_cast<cudaStream_t>(backend.native_stream())) {}

  ~CudaGraphPlan() override {
    // Launches in flight read the plan's buffers and write the pinned counts.
    if (stream_) (void)cudaStreamSynchronize(stream_);
  }

  Status init() {
    TUTEL_RETURN_IF_ERROR(activate());
    const size_t E = static_cast<size_t>(target_.spec.experts);
    void* p = nullptr;
    GRAPHS_CUDA_CHECK(cudaMallocHost(&p, E * sizeof(int32_t) + sizeof(float)));
    pinned_.reset(p);
    auto* counts = static_cast<int32_t*>(p);
    return PlanBase::init(counts, reinterpret_cast<float*>(counts + E));
  }

  PlanKind kind() const override { return PlanKind::kCudaGraph; }

 protected:
  Status run(std::initializer_list<Phase> phases, const StepState& st) override {
    TUTEL_RETURN_IF_ERROR(activate());
    if (phases.size() == 1 && *phases.begin() == Phase::kNoise) return run_ops(Phase::kNoise, st);
    size_t index = kRouteGraph;
    PhaseShape shape{st.tokens, 0, 0};
    if (phases.size() == 2) {
      index = kForwardGraph;
      shape.capacity = st.capacity;
    } else if (*phases.begin() == Phase::kExperts) {
      index = kExpertsGraph;
      shape.capacity = st.capacity;
    } else if (*phases.begin() == Phase::kBackward) {
      index = kBackwardGraph;
      shape.capacity = st.capacity;
      std::memcpy(&shape.dl_aux_bits, &st.dl_aux, sizeof(float));
    }
    PhaseGraphs& g = graphs_[index];
    const uint64_t epoch = backend_.scratch_epoch();
    ++use_clock_;

    Executable* same_shape = nullptr;
    for (Executable& e : g.execs)
      if (e.exec && e.shape == shape) same_shape = &e;
    if (same_shape && same_shape->scratch_epoch == epoch) {
      same_shape->last_use = use_clock_;
      return launch(*same_shape);
    }
    // First sight: op by op, which also grows the backend's scratch to what this shape needs
    // (scratch never shrinks), so the capture on a later sight allocates nothing.
    // A shape whose capture failed runs op by op from then on: an op that cannot be captured
    // costs one failed capture, not one per step.
    if (!g.has_seen(shape) || g.failed.contains(shape)) return run_eagerly(g, phases, st, shape);

    // Should the capture fail (an op that cannot be captured, scratch that had to move), the
    // stream leaves capture mode and the phase runs op by op instead, so the step still
    // completes or reports the op's own error. Scratch that moved is captured again next time.
    GraphPtr graph;
    const bool captured = capture(phases, st, graph).ok();
    if (!captured || backend_.scratch_epoch() != epoch) {
      (void)cudaGetLastError();
      if (!captured) {
        g.failed.add(shape);
        ++stats_.capture_failures;
      }
      return run_eagerly(g, phases, st, shape);
    }
    ++stats_.captures;
    // The executable to reuse: this shape's stale one (scratch moved), else the least recently
    // used one once the phase holds its share; cudaGraphExecUpdate applies the new parameters
    // when the topology is unchanged, and a new executable is instantiated otherwise.
    Executable* target = same_shape;
    if (!target && g.execs.size() >= kExecsPerPhase) {
      target = &g.execs.front();
      for (Executable& e : g.execs)
        if (e.last_use < target->last_use) target = &e;
    }
    if (target && target->exec) {
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(target->exec.get(), graph.get(), &info) == cudaSuccess) {
        ++stats_.graph_updates;
      } else {
        (void)cudaGetLastError();  // a changed topology (e.g. cuBLAS picked another kernel)
        target->exec.reset();
      }
    } else if (!target) {
      g.execs.emplace_back();
      target = &g.execs.back();
    }
    if (!target->exec) {
      cudaGraphExec_t exec = nullptr;
      if (cudaGraphInstantiate(&exec, graph.get(), 0) != cudaSuccess) {
        // No executable (out of device memory for it, say). Nothing of the phase has run (a
        // capture runs nothing): run it op by op, now and for this shape from then on, as a
        // failed capture does. The emptied slot is the first one reused.
        (void)cudaGetLastError();
        target->last_use = 0;
        g.failed.add(shape);
        ++stats_.capture_failures;
        return run_eagerly(g, phases, st, shape);
      }
      target->exec.reset(exec);
      ++stats_.instantiations;
    }
    target->shape = shape;
    target->scratch_epoch = epoch;
    target->last_use = use_clock_;
    return launch(*target);
  }

  Status read_to_host(void* host, const void* device, size_t bytes, bool after_forked_work) override {
    // Into pinned memory, so the copy is a node of the graph; data is there after a sync.
    if (after_forked_work) TUTEL_RETURN_IF_ERROR(backend_.join_forked_work());
    GRAPHS_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_));
    return Status::OK();
  }

  Status bind_forward(TensorView x, TensorView y, StepState& st) override {
    TUTEL_RETURN_IF_ERROR(activate());
    const int64_t S = st.tokens;
    st.x = input(S);
    st.y = output(S);
    return copy_in(st.x, x);
  }

  Status finish_forward(TensorView y, const StepState& st) override { return copy_out(y, st.y); }

  Status bind_backward(TensorView x, TensorView dy, TensorView dx, StepState& st) override {
    TUTEL_RETURN_IF_ERROR(activate());
    const int64_t S = st.tokens, M = target_.spec.model_dim, O = target_.spec.out_dim();
    st.x = input(S);
    st.dy = view(Slot::kDy, DType::kF32, {S, O});
    st.dx = view(Slot::kDx, DType::kF32, {S, M});
    TUTEL_RETURN_IF_ERROR(copy_in(st.x, x));
    return copy_in(st.dy, dy);
  }

  Status finish_backward(TensorView dx, const StepState& st) override {
    return copy_out(dx, st.dx);
  }

 private:
  Status activate() {
    int current = -1;
    GRAPHS_CUDA_CHECK(cudaGetDevice(&current));
    if (current != backend_.device().index)
      GRAPHS_CUDA_CHECK(cudaSetDevice(backend_.device().index));
    return Status::OK();
  }

  Status launch(Executable& e) {
    GRAPHS_CUDA_CHECK(cudaGraphLaunch(e.exec.get(), stream_));
    ++stats_.graph_launches;
    return Status::OK();
  }

  Status run_eagerly(PhaseGraphs& g, std::initializer_list<Phase> phases, const StepState& st,
                     const PhaseShape& shape) {
    for (Phase p : phases) TUTEL_RETURN_IF_ERROR(run_ops(p, st));
    ++stats_.eager_phases;
    if (!g.has_seen(shape)) g.remember(shape);
    return Status::OK();
  }

  Status capture(std::initializer_list<Phase> phases, const StepState& st, GraphPtr& out) {
    GRAPHS_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    Status recorded = Status::OK();
    for (Phase p : phases) {
      recorded = run_ops(p, st);
      if (!recorded.ok()) break;
    }
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    out.reset(graph);
    TUTEL_RETURN_IF_ERROR(recorded);
    GRAPHS_CUDA_CHECK(ended);
    if (!graph) return Status::Internal("stream capture returned no graph");
    return Status::OK();
  }

  // Caller memory anywhere (device, pinned or pageable host): the runtime tells which.
  Status copy_in(const TensorView& plan_buffer, const TensorView& src) {
    if (src.data() == plan_buffer.data()) return Status::OK();
    GRAPHS_CUDA_CHECK(cudaMemcpyAsync(plan_buffer.data(), src.data(), plan_buffer.nbytes(),
                                      cudaMemcpyDefault, stream_));
    return Status::OK();
  }

  Status copy_out(const TensorView& dst, const TensorView& plan_buffer) {
    if (dst.data() == plan_buffer.data()) return Status::OK();
    GRAPHS_CUDA_CHECK(cudaMemcpyAsync(dst.data(), plan_buffer.data(), plan_buffer.nbytes(),
                                      cudaMemcpyDefault, stream_));
    cudaPointerAttributes attr{};
    GRAPHS_CUDA_CHECK(cudaPointerGetAttributes(&attr, dst.data()));
    // Host memory is the caller's as soon as we return: wait for the copy.
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      GRAPHS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return Status::OK();
  }

  cudaStream_t stream_;
  PinnedPtr pinned_;  // E expert counts (i32), then l_aux (f32): the route phase's host read
  std::array<PhaseGraphs, kGraphCount> graphs_;
  uint64_t use_clock_ = 0;
};

}  // namespace

Result<std::unique_ptr<Plan>> make_cuda_graph_plan(Backend& backend, const PlanTarget& target,
                                                   const PlanKey& key) {
  if (backend.native_stream() == nullptr)
    return Status::Unavailable("backend '" + std::string(backend.name()) +
                               "' has no stream to capture a graph on");
  auto plan = std::make_unique<CudaGraphPlan>(backend, target, key);
  TUTEL_RETURN_IF_ERROR(plan->init());
  return std::unique_ptr<Plan>(std::move(plan));
}

}  // namespace tutel::graphs::detail
