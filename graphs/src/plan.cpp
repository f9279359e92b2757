// The step algorithm every plan kind shares, the recorded op program, and the registry of kinds.
#include <algorithm>
#include <string>

#include "plan_base.hpp"

namespace tutel::graphs {

std::string_view plan_kind_name(PlanKind kind) {
  switch (kind) {
    case PlanKind::kAuto:
      return "auto";
    case PlanKind::kHost:
      return "host";
    case PlanKind::kCudaGraph:
      return "cuda-graph";
  }
  return "?";
}

PlanKind resolve_plan_kind(const Backend& backend, PlanKind kind) {
  if (kind != PlanKind::kAuto) return kind;
#if defined(TUTEL_HAVE_CUDA)
  if (backend.native_stream() != nullptr) return PlanKind::kCudaGraph;
#endif
  return PlanKind::kHost;
}

size_t plan_bytes(const Backend& backend, const LayerSpec& spec, const PlanKey& key, PlanKind kind,
                  bool weights_bf16) {
  const bool io_buffers = resolve_plan_kind(backend, kind) == PlanKind::kCudaGraph;
  return detail::PlanLayout(backend, spec, key, io_buffers, weights_bf16).total();
}

Result<std::unique_ptr<Plan>> build_plan(Backend& backend, const PlanTarget& target,
                                         const PlanKey& key, PlanKind kind) {
  TUTEL_RETURN_IF_ERROR(target.spec.validate());
  TUTEL_RETURN_IF_ERROR(check_buildable(key, target.spec));
  TUTEL_RETURN_IF_ERROR(target.weights.validate(target.spec, "weights"));
  if (key.training) {
    if (target.grads.gate_weight.empty())
      return Status::InvalidArgument(
          "plan key '" + key.to_string() +
          "' is a training key, but the target has no gradient buffers; give "
          "PlanTarget::grads or build an inference key");
    TUTEL_RETURN_IF_ERROR(target.grads.validate(target.spec, "gradients"));
  }
  switch (resolve_plan_kind(backend, kind)) {
    case PlanKind::kHost:
      return detail::make_host_plan(backend, target, key);
    case PlanKind::kCudaGraph:
#if defined(TUTEL_HAVE_CUDA)
      if (backend.native_stream() != nullptr)
        return detail::make_cuda_graph_plan(backend, target, key);
#endif
      return Status::Unavailable(
          "a cuda-graph plan needs the cuda backend in a build with CUDA; backend '" +
          std::string(backend.name()) + "' runs host plans");
    case PlanKind::kAuto:
      break;
  }
  return Status::Internal("plan kind did not resolve");
}

namespace detail {

PlanBase::PlanBase(Backend& backend, const PlanTarget& target, const PlanKey& key, bool io_buffers)
    : backend_(backend),
      target_(target),
      key_(key),
      io_buffers_(io_buffers),
      layout_(backend, target.spec, key, io_buffers, target.weights.experts.has_bf16_copies()),
      static_capacity_(target.spec.capacity_factor > 0) {}

Status PlanBase::init(int32_t* counts_host, float* l_aux_host) {
  counts_host_ = counts_host;
  l_aux_host_ = l_aux_host;
  TUTEL_ASSIGN_OR_RETURN(arena_, backend_.allocate(layout_.total()));
  // Every op overwrites what it later reads; zeroing once keeps a stray read defined anyway.
  TUTEL_RETURN_IF_ERROR(backend_.fill_zero(TensorView(
      arena_.data(), DType::kU8, {static_cast<int64_t>(layout_.total())}, backend_.device())));
  record();
  return Status::OK();
}

void* PlanBase::slot_data(Slot slot) const {
  if (layout_.bytes(slot) == 0) return nullptr;
  return static_cast<char*>(arena_.data()) + layout_.offset(slot);
}

TensorView PlanBase::view(Slot slot, DType dtype, Shape shape) const {
  return TensorView(slot_data(slot), dtype, shape, backend_.device());
}

TensorView PlanBase::expert_index() const {
  return view(Slot::kExpertIndex, DType::kI32, {tokens_, target_.spec.k});
}
TensorView PlanBase::location() const {
  return view(Slot::kLocation, DType::kI32, {tokens_, target_.spec.k});
}
TensorView PlanBase::gates() const {
  return view(Slot::kGates, DType::kF32, {tokens_, target_.spec.k});
}

TensorView PlanBase::input(int64_t tokens) const {
  if (!io_buffers_ || tokens < 1 || tokens > key_.token_bucket) return {};
  return view(Slot::kX, DType::kF32, {tokens, target_.spec.model_dim});
}

TensorView PlanBase::output(int64_t tokens) const {
  if (!io_buffers_ || tokens < 1 || tokens > key_.token_bucket) return {};
  return view(Slot::kY, DType::kF32, {tokens, target_.spec.out_dim()});
}

Status PlanBase::run_ops(Phase phase, const StepState& st) const {
  for (const Op& op : program_[static_cast<size_t>(phase)]) TUTEL_RETURN_IF_ERROR(op(st));
  return Status::OK();
}

// The op sequence of layer_forward/layer_backward (kernels/src/moe_layer.cpp), decided once:
// which ops run and on which buffers. Views take the step's real S and C, laid out from the
// start of each buffer exactly as the eager workspace lays them out.
void PlanBase::record() {
  const LayerSpec& spec = target_.spec;
  const int64_t E = spec.experts, k = spec.k, M = spec.model_dim, H = spec.hidden,
                O = spec.out_dim();
  const bool training = key_.training;
  const bool noisy = training && spec.gate_noise > 0;
  const bool keep_pre = training && spec.activation != Activation::kRelu;
  auto& noise = program_[static_cast<size_t>(Phase::kNoise)];
  auto& route = program_[static_cast<size_t>(Phase::kRoute)];
  auto& experts = program_[static_cast<size_t>(Phase::kExperts)];
  auto& backward = program_[static_cast<size_t>(Phase::kBackward)];
  const DType f32 = DType::kF32, i32 = DType::kI32, disp_dtype = spec.dispatch_dtype();
  const TensorView workspace(slot_data(Slot::kWorkspace), DType::kU8,
                             {static_cast<int64_t>(layout_.bytes(Slot::kWorkspace))},
                             backend_.device());

  if (noisy) {
    const float scale = static_cast<float>(spec.gate_noise / E);
    noise.push_back([this, E, scale](const StepState& st) {
      return backend_.gate_noise(target_.spec.noise_seed, st.noise_counter, scale,
                                 view(Slot::kNoise, DType::kF32, {st.tokens, E}));
    });
  }

  route.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens;
    const TensorView noise_view = noisy ? view(Slot::kNoise, f32, {S, E}) : TensorView();
    return backend_.gate_forward({st.x, target_.weights.gate_weight, noise_view, target_.spec.k,
                                  target_.spec.normalize_gate, view(Slot::kScores, f32, {S, E}),
                                  view(Slot::kExpertIndex, i32, {S, k}),
                                  view(Slot::kGates, f32, {S, k}), view(Slot::kLAux, f32, {1})});
  });
  route.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens;
    return backend_.locations({view(Slot::kScores, f32, {S, E}),
                               view(Slot::kExpertIndex, i32, {S, k}),
                               target_.spec.batch_prioritized, view(Slot::kLocation, i32, {S, k}),
                               view(Slot::kExpertCount, i32, {E})});
  });
  route.push_back([=, this](const StepState&) {
    return read_to_host(counts_host_, slot_data(Slot::kExpertCount), static_cast<size_t>(E) * 4,
                        /*after_forked_work=*/false);
  });
  // l_aux is written by the gate loss, which a CUDA graph runs beside the rest of the step: read
  // last, so that nothing else waits for it. With f <= 0 the host waits for the route phase's
  // end anyway (for the counts); with f > 0 route and experts are one graph.
  auto read_l_aux = [this](const StepState&) {
    return read_to_host(l_aux_host_, slot_data(Slot::kLAux), 4, /*after_forked_work=*/true);
  };
  if (!static_capacity_) route.push_back(read_l_aux);

  experts.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens, C = st.capacity;
    return backend_.slot_map({view(Slot::kExpertIndex, i32, {S, k}),
                              view(Slot::kLocation, i32, {S, k}), C,
                              view(Slot::kSlotAssignment, i32, {E, C})});
  });
  experts.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens, C = st.capacity;
    return backend_.encode({st.x, view(Slot::kGates, f32, {S, k}),
                            view(Slot::kSlotAssignment, i32, {E, C}), target_.spec.is_postscore,
                            view(Slot::kDispatched, disp_dtype, {E, C, M})});
  });
  experts.push_back([=, this](const StepState& st) {
    const int64_t C = st.capacity;
    const TensorView pre = keep_pre ? view(Slot::kPreActivation, f32, {E, C, H}) : TensorView();
    return backend_.expert_forward(
        {view(Slot::kDispatched, disp_dtype, {E, C, M}), target_.weights.experts, target_.spec.activation,
         target_.spec.matmul_dtype, pre, view(Slot::kHidden, f32, {E, C, H}),
         view(Slot::kExpertOut, f32, {E, C, O}), workspace, /*keep_hidden=*/training,
         view(Slot::kExpertCount, i32, {E})});
  });
  experts.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens, C = st.capacity;
    return backend_.decode({view(Slot::kExpertOut, f32, {E, C, O}), view(Slot::kGates, f32, {S, k}),
                            view(Slot::kExpertIndex, i32, {S, k}),
                            view(Slot::kLocation, i32, {S, k}), C, target_.spec.is_postscore,
                            st.y});
  });
  if (static_capacity_) experts.push_back(read_l_aux);

  if (!training) return;
  backward.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens, C = st.capacity;
    return backend_.decode_backward(
        {st.dy, view(Slot::kExpertOut, f32, {E, C, O}), view(Slot::kGates, f32, {S, k}),
         view(Slot::kExpertIndex, i32, {S, k}), view(Slot::kLocation, i32, {S, k}),
         view(Slot::kSlotAssignment, i32, {E, C}), target_.spec.is_postscore,
         view(Slot::kDExpertOut, f32, {E, C, O}), view(Slot::kDGates, f32, {S, k})});
  });
  backward.push_back([=, this](const StepState& st) {
    const int64_t C = st.capacity;
    const TensorView pre = keep_pre ? view(Slot::kPreActivation, f32, {E, C, H}) : TensorView();
    return backend_.expert_backward(
        {view(Slot::kDispatched, disp_dtype, {E, C, M}), pre, view(Slot::kHidden, f32, {E, C, H}),
         target_.weights.experts, target_.spec.activation, target_.spec.matmul_dtype,
         view(Slot::kDExpertOut, f32, {E, C, O}), view(Slot::kDHidden, f32, {E, C, H}),
         view(Slot::kDDispatched, f32, {E, C, M}), target_.grads.experts, workspace});
  });
  backward.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens, C = st.capacity;
    return backend_.encode_backward(
        {view(Slot::kDDispatched, f32, {E, C, M}), st.x, view(Slot::kGates, f32, {S, k}),
         view(Slot::kExpertIndex, i32, {S, k}), view(Slot::kLocation, i32, {S, k}), C,
         target_.spec.is_postscore, st.dx, view(Slot::kDGates, f32, {S, k})});
  });
  backward.push_back([=, this](const StepState& st) {
    const int64_t S = st.tokens;
    return backend_.gate_backward(
        {st.x, target_.weights.gate_weight, view(Slot::kScores, f32, {S, E}),
         view(Slot::kExpertIndex, i32, {S, k}), view(Slot::kDGates, f32, {S, k}), st.dl_aux,
         target_.spec.normalize_gate, view(Slot::kDLogits, f32, {S, E}), st.dx,
         target_.grads.gate_weight});
  });
}

Result<RoutingStats> PlanBase::forward(TensorView x, uint64_t noise_counter, TensorView y) {
  has_forward_ = false;
  required_capacity_ = 0;
  const LayerSpec& spec = target_.spec;
  if (x.rank() != 2 || x.dim(1) != spec.model_dim || x.dim(0) < 1 || x.dim(0) > key_.token_bucket)
    return Status::InvalidArgument("x has shape " + x.shape().to_string() + ", expected [1.." +
                                   std::to_string(key_.token_bucket) + ", " +
                                   std::to_string(spec.model_dim) + "] for plan '" +
                                   key_.to_string() + "'");
  const int64_t S = x.dim(0), E = spec.experts;
  TUTEL_RETURN_IF_ERROR(x.expect("x", DType::kF32, {S, spec.model_dim}));
  TUTEL_RETURN_IF_ERROR(y.expect("y", DType::kF32, {S, spec.out_dim()}));

  StepState st;
  st.tokens = S;
  st.noise_counter = noise_counter;
  TUTEL_RETURN_IF_ERROR(bind_forward(x, y, st));
  TUTEL_RETURN_IF_ERROR(run({Phase::kNoise}, st));
  int64_t C = 0;
  if (static_capacity_) {
    // f > 0: C is known from S alone, so the whole step runs without waiting for the counts.
    C = layer_capacity(spec, S, 0);
    required_capacity_ = C;
    st.capacity = C;
    TUTEL_RETURN_IF_ERROR(run({Phase::kRoute, Phase::kExperts}, st));
    TUTEL_RETURN_IF_ERROR(backend_.synchronize());
  } else {
    // f <= 0: C is the largest expert count (capped for f < 0), read back between two phases.
    TUTEL_RETURN_IF_ERROR(run({Phase::kRoute}, st));
    TUTEL_RETURN_IF_ERROR(backend_.synchronize());
    const int64_t max_count = *std::max_element(counts_host_, counts_host_ + E);
    C = layer_capacity(spec, S, max_count);
    required_capacity_ = C;
    if (C > key_.capacity_bucket) {
      ++stats_.capacity_misses;
      return Status::OutOfRange("the routing of " + std::to_string(S) + " tokens needs capacity " +
                                std::to_string(C) + ", above the capacity bucket of plan '" +
                                key_.to_string() +
                                "'; run it on a plan with capacity_bucket >= " + std::to_string(C));
    }
    st.capacity = C;
    TUTEL_RETURN_IF_ERROR(run({Phase::kExperts}, st));
  }
  int64_t dropped = 0;
  for (int64_t e = 0; e < E; ++e) dropped += std::max<int64_t>(0, counts_host_[e] - C);
  TUTEL_RETURN_IF_ERROR(finish_forward(y, st));
  tokens_ = S;
  capacity_ = C;
  has_forward_ = true;
  ++stats_.forwards;
  return RoutingStats{C, dropped, *l_aux_host_};
}

Status PlanBase::backward(TensorView x, TensorView dy, float dl_aux, TensorView dx) {
  if (!key_.training)
    return Status::InvalidArgument(
        "plan '" + key_.to_string() +
        "' is an inference plan; run the forward on a training key for backward");
  if (!has_forward_)
    return Status::InvalidArgument("backward needs a training forward on this plan first");
  const LayerSpec& spec = target_.spec;
  const int64_t S = tokens_;
  TUTEL_RETURN_IF_ERROR(x.expect("x", DType::kF32, {S, spec.model_dim}));
  TUTEL_RETURN_IF_ERROR(dy.expect("dy", DType::kF32, {S, spec.out_dim()}));
  TUTEL_RETURN_IF_ERROR(dx.expect("dx", DType::kF32, {S, spec.model_dim}));
  StepState st;
  st.tokens = S;
  st.capacity = capacity_;
  st.dl_aux = dl_aux;
  TUTEL_RETURN_IF_ERROR(bind_backward(x, dy, dx, st));
  TUTEL_RETURN_IF_ERROR(run({Phase::kBackward}, st));
  TUTEL_RETURN_IF_ERROR(finish_backward(dx, st));
  ++stats_.backwards;
  return Status::OK();
}

}  // namespace detail
}  // namespace tutel::graphs
