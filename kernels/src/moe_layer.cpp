#include "tutel/kernels/moe_layer.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tutel {

Status LayerSpec::validate() const {
  auto bad = [](std::string m) { return Status::InvalidArgument("layer spec: " + std::move(m)); };
  if (experts < 1) return bad("experts = " + std::to_string(experts) + " must be >= 1");
  if (model_dim < 1) return bad("model_dim = " + std::to_string(model_dim) + " must be >= 1");
  if (hidden < 1) return bad("hidden = " + std::to_string(hidden) + " must be >= 1");
  if (output_dim < 0) return bad("output_dim = " + std::to_string(output_dim) + " must be >= 0 (0 means model_dim)");
  if (k < 1 || k > experts)
    return bad("k = " + std::to_string(k) + " must be between 1 and experts = " + std::to_string(experts));
  // |f| bounds the capacity at k·|f|·ceil(S/E) slots per expert; beyond 1e6 the product
  // overflows long before memory runs out, and no real layer wants it.
  if (!std::isfinite(capacity_factor) || std::abs(capacity_factor) > 1e6)
    return bad("capacity_factor must be a finite number with |f| <= 1e6");
  if (!(gate_noise >= 0.0) || !std::isfinite(gate_noise)) return bad("gate_noise must be finite and >= 0");
  if (matmul_dtype != DType::kF32 && matmul_dtype != DType::kBF16)
    return bad("matmul dtype " + std::string(dtype_name(matmul_dtype)) + " is not supported; use f32 or bf16");
  if (alignment < 1) return bad("alignment must be >= 1");
  return Status::OK();
}

int64_t layer_capacity(const LayerSpec& spec, int64_t tokens, int64_t max_expert_count) {
  const int64_t k = spec.k;
  const int64_t per_expert = (tokens + spec.experts - 1) / spec.experts;
  const double f = spec.capacity_factor;
  int64_t capacity;
  if (f > 0) {
    capacity = k * static_cast<int64_t>(std::floor(f * static_cast<double>(per_expert)));
  } else {
    capacity = max_expert_count;
    if (f < 0)
      capacity = std::min(capacity, k * static_cast<int64_t>(std::floor(-f * static_cast<double>(per_expert))));
  }
  int64_t alignment = spec.alignment;
  if (alignment > 256) alignment = (alignment + 127) / 128 * 128;
  if (const int64_t rem = capacity % alignment; rem > 0) capacity += alignment - rem;
  return capacity;
}

namespace {

Status check_optional(const TensorView& t, bool present, std::string_view what, const Shape& shape) {
  if (!present) {
    if (!t.empty())
      return Status::InvalidArgument(std::string(what) + " is given but the spec says the layer has no such bias");
    return Status::OK();
  }
  return t.expect(what, DType::kF32, shape);
}

}  // namespace

Status LayerWeights::validate(const LayerSpec& spec, std::string_view what) const {
  const std::string p = std::string(what) + " ";
  const int64_t E = spec.experts, M = spec.model_dim, H = spec.hidden, O = spec.out_dim();
  TUTEL_RETURN_IF_ERROR(gate_weight.expect(p + kGateWeightName, DType::kF32, {E, M}));
  TUTEL_RETURN_IF_ERROR(experts.fc1_weight.expect(p + kFc1WeightName, DType::kF32, {E, H, M}));
  TUTEL_RETURN_IF_ERROR(experts.fc2_weight.expect(p + kFc2WeightName, DType::kF32, {E, H, O}));
  TUTEL_RETURN_IF_ERROR(check_optional(experts.fc1_bias, spec.has_fc1_bias, p + kFc1BiasName, {E, H}));
  TUTEL_RETURN_IF_ERROR(check_optional(experts.fc2_bias, spec.has_fc2_bias, p + kFc2BiasName, {E, O}));
  return experts.check_bf16_copies(what);
}

namespace {

// Grows `buf` to hold `bytes`; contents are not preserved.
Status ensure(Backend& b, DeviceBuffer& buf, size_t bytes) {
  if (buf.bytes() >= bytes && buf.data() != nullptr) return Status::OK();
  buf.reset();
  TUTEL_ASSIGN_OR_RETURN(buf, b.allocate(std::max<size_t>(bytes, 64)));
  return Status::OK();
}

TensorView view_of(const DeviceBuffer& buf, DType dtype, Shape shape, Device device) {
  return TensorView(buf.data(), dtype, shape, device);
}

}  // namespace

TensorView LayerWorkspace::expert_index(Device d) const {
  return view_of(expert_index_, DType::kI32, {tokens_, spec_.k}, d);
}
TensorView LayerWorkspace::location(Device d) const {
  return view_of(location_, DType::kI32, {tokens_, spec_.k}, d);
}
TensorView LayerWorkspace::gates(Device d) const {
  return view_of(gates_, DType::kF32, {tokens_, spec_.k}, d);
}

Status LayerWorkspace::reserve_routing(Backend& b, const LayerSpec& spec, int64_t tokens) {
  const size_t S = tokens, E = spec.experts, k = spec.k;
  TUTEL_RETURN_IF_ERROR(ensure(b, scores_, S * E * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, expert_index_, S * k * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, gates_, S * k * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, location_, S * k * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, l_aux_, 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, expert_count_, E * 4));
  if (spec.gate_noise > 0) TUTEL_RETURN_IF_ERROR(ensure(b, noise_, S * E * 4));
  tokens_ = tokens;
  spec_ = spec;
  return Status::OK();
}

Status LayerWorkspace::reserve_expert_workspace(Backend& b, const LayerSpec& spec, int64_t capacity,
                                                const ExpertWeights& weights) {
  ExpertShape shape{spec.experts, capacity, spec.model_dim, spec.hidden, spec.out_dim()};
  shape.weights_bf16 = weights.has_bf16_copies();
  return ensure(b, workspace_, b.expert_workspace_bytes(shape, spec.matmul_dtype));
}

Status LayerWorkspace::reserve_experts(Backend& b, const LayerSpec& spec, int64_t capacity,
                                       bool training, const ExpertWeights& weights) {
  const size_t E = spec.experts, C = capacity, M = spec.model_dim, H = spec.hidden, O = spec.out_dim();
  TUTEL_RETURN_IF_ERROR(ensure(b, slot_assignment_, E * C * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, dispatched_, E * C * M * dtype_size(spec.dispatch_dtype())));
  TUTEL_RETURN_IF_ERROR(ensure(b, hidden_, E * C * H * 4));
  TUTEL_RETURN_IF_ERROR(ensure(b, expert_out_, E * C * O * 4));
  // relu's derivative is read off its output; gelu and silu need the pre-activation.
  if (training && spec.activation != Activation::kRelu)
    TUTEL_RETURN_IF_ERROR(ensure(b, pre_activation_, E * C * H * 4));
  TUTEL_RETURN_IF_ERROR(reserve_expert_workspace(b, spec, capacity, weights));
  capacity_ = capacity;
  return Status::OK();
}

Status layer_forward(Backend& backend, const LayerSpec& spec, const LayerWeights& weights,
                     TensorView x, uint64_t noise_counter, bool training, LayerWorkspace& ws,
                     TensorView y, RoutingStats* stats) {
  TUTEL_RETURN_IF_ERROR(spec.validate());
  TUTEL_RETURN_IF_ERROR(weights.validate(spec, "weights"));
  if (x.rank() != 2 || x.dim(1) != spec.model_dim || x.dim(0) < 1)
    return Status::InvalidArgument("x has shape " + x.shape().to_string() + ", expected [tokens >= 1, " +
                                   std::to_string(spec.model_dim) + "]");
  const int64_t S = x.dim(0), E = spec.experts, k = spec.k, M = spec.model_dim, H = spec.hidden,
                O = spec.out_dim();
  // Routing indices are i32: every (token, choice) and every (expert, slot) must fit.
  if (S * k >= (int64_t{1} << 31))
    return Status::InvalidArgument("tokens·k = " + std::to_string(S * k) + " exceeds 2^31; split the batch");
  TUTEL_RETURN_IF_ERROR(x.expect("x", DType::kF32, {S, M}));
  TUTEL_RETURN_IF_ERROR(y.expect("y", DType::kF32, {S, O}));
  const Device dev = backend.device();
  ws.has_forward_ = false;
  TUTEL_RETURN_IF_ERROR(ws.reserve_routing(backend, spec, S));

  const bool noisy = training && spec.gate_noise > 0;
  TensorView noise;
  if (noisy) {
    noise = view_of(ws.noise_, DType::kF32, {S, E}, dev);
    TUTEL_RETURN_IF_ERROR(backend.gate_noise(spec.noise_seed, noise_counter,
                                             static_cast<float>(spec.gate_noise / E), noise));
  }
  const TensorView scores = view_of(ws.scores_, DType::kF32, {S, E}, dev);
  const TensorView expert_index = view_of(ws.expert_index_, DType::kI32, {S, k}, dev);
  const TensorView gates = view_of(ws.gates_, DType::kF32, {S, k}, dev);
  const TensorView location = view_of(ws.location_, DType::kI32, {S, k}, dev);
  const TensorView l_aux = view_of(ws.l_aux_, DType::kF32, {1}, dev);
  const TensorView expert_count = view_of(ws.expert_count_, DType::kI32, {E}, dev);

  GateForwardArgs gate{x, weights.gate_weight, noise, spec.k, spec.normalize_gate,
                       scores, expert_index, gates, l_aux};
  TUTEL_RETURN_IF_ERROR(backend.gate_forward(gate));
  TUTEL_RETURN_IF_ERROR(backend.locations({scores, expert_index, spec.batch_prioritized, location, expert_count}));

  // Capacity needs the counts on the host only when it is dynamic (f <= 0), and the dropped
  // count always; E integers are a small read.
  std::vector<int32_t> counts(E);
  TUTEL_RETURN_IF_ERROR(backend.copy(counts.data(), expert_count.data(), E * 4, CopyKind::kDeviceToHost));
  float l_aux_host = 0.f;
  TUTEL_RETURN_IF_ERROR(backend.copy(&l_aux_host, l_aux.data(), 4, CopyKind::kDeviceToHost));
  const int64_t max_count = *std::max_element(counts.begin(), counts.end());
  const int64_t C = layer_capacity(spec, S, max_count);
  if (E * C >= (int64_t{1} << 31) || E * C * std::max({M, H, O}) > (int64_t{1} << 40))
    return Status::ResourceExhausted("capacity " + std::to_string(C) + " for " + std::to_string(E) +
                                     " experts needs more memory than a layer may use; lower capacity_factor");
  int64_t dropped = 0;
  for (int32_t c : counts) dropped += std::max<int64_t>(0, c - C);

  TUTEL_RETURN_IF_ERROR(ws.reserve_experts(backend, spec, C, training, weights.experts));
  const TensorView slots = view_of(ws.slot_assignment_, DType::kI32, {E, C}, dev);
  const TensorView dispatched = view_of(ws.dispatched_, spec.dispatch_dtype(), {E, C, M}, dev);
  const TensorView hidden = view_of(ws.hidden_, DType::kF32, {E, C, H}, dev);
  const TensorView expert_out = view_of(ws.expert_out_, DType::kF32, {E, C, O}, dev);
  TensorView pre;
  if (training && spec.activation != Activation::kRelu)
    pre = view_of(ws.pre_activation_, DType::kF32, {E, C, H}, dev);
  const TensorView workspace(ws.workspace_.data(), DType::kU8,
                             {static_cast<int64_t>(ws.workspace_.bytes())}, dev);

  TUTEL_RETURN_IF_ERROR(backend.slot_map({expert_index, location, C, slots}));
  TUTEL_RETURN_IF_ERROR(backend.encode({x, gates, slots, spec.is_postscore, dispatched}));
  TUTEL_RETURN_IF_ERROR(
      backend.expert_forward({dispatched, weights.experts, spec.activation, spec.matmul_dtype, pre,
                              hidden, expert_out, workspace,
                              /*keep_hidden=*/training, expert_count}));
  TUTEL_RETURN_IF_ERROR(backend.decode({expert_out, gates, expert_index, location, C, spec.is_postscore, y}));

  ws.stats_ = RoutingStats{C, dropped, l_aux_host};
  ws.trained_ = training;
  ws.has_forward_ = true;
  if (stats) *stats = ws.stats_;
  return Status::OK();
}

Status layer_backward(Backend& backend, const LayerSpec& spec, const LayerWeights& weights,
                      TensorView x, LayerWorkspace& ws, TensorView dy, float dl_aux,
                      TensorView dx, const LayerWeights& grads) {
  if (!ws.has_forward_ || !ws.trained_)
    return Status::InvalidArgument("backward needs a training forward on this workspace first");
  // The workspace's buffers are laid out for the forward's spec: another one would read past them.
  const LayerSpec& fwd = ws.spec_;
  auto shapes = [](const LayerSpec& s) {
    return "E " + std::to_string(s.experts) + ", k " + std::to_string(s.k) + ", M " + std::to_string(s.model_dim) +
           ", H " + std::to_string(s.hidden) + ", O " + std::to_string(s.out_dim());
  };
  if (spec.experts != fwd.experts || spec.k != fwd.k || spec.model_dim != fwd.model_dim || spec.hidden != fwd.hidden ||
      spec.out_dim() != fwd.out_dim() || spec.activation != fwd.activation || spec.matmul_dtype != fwd.matmul_dtype)
    return Status::InvalidArgument("backward's spec (" + shapes(spec) +
                                   ", or its activation or matmul dtype) differs from its forward's (" + shapes(fwd) +
                                   "); pass the spec the forward ran with");
  // What the gradient's formula reads besides the shapes: another value computes a wrong
  // gradient without a word. (Gate noise and its seed are the forward's alone.)
  if (spec.capacity_factor != fwd.capacity_factor || spec.normalize_gate != fwd.normalize_gate ||
      spec.batch_prioritized != fwd.batch_prioritized || spec.is_postscore != fwd.is_postscore ||
      spec.has_fc1_bias != fwd.has_fc1_bias || spec.has_fc2_bias != fwd.has_fc2_bias || spec.alignment != fwd.alignment)
    return Status::InvalidArgument(
        "backward's spec differs from its forward's in its capacity factor, gate normalisation, routing, "
        "scoring, biases or alignment; pass the spec the forward ran with");
  const int64_t S = ws.tokens_, E = spec.experts, k = spec.k, M = spec.model_dim, H = spec.hidden,
                O = spec.out_dim(), C = ws.capacity_;
  TUTEL_RETURN_IF_ERROR(weights.validate(spec, "weights"));
  TUTEL_RETURN_IF_ERROR(grads.validate(spec, "gradients"));
  TUTEL_RETURN_IF_ERROR(x.expect("x", DType::kF32, {S, M}));
  TUTEL_RETURN_IF_ERROR(dy.expect("dy", DType::kF32, {S, O}));
  TUTEL_RETURN_IF_ERROR(dx.expect("dx", DType::kF32, {S, M}));
  const Device dev = backend.device();

  TUTEL_RETURN_IF_ERROR(ensure(backend, ws.d_gates_, S * k * 4));
  TUTEL_RETURN_IF_ERROR(ensure(backend, ws.d_logits_, S * E * 4));
  TUTEL_RETURN_IF_ERROR(ensure(backend, ws.d_expert_out_, E * C * O * 4));
  TUTEL_RETURN_IF_ERROR(ensure(backend, ws.d_hidden_, E * C * H * 4));
  TUTEL_RETURN_IF_ERROR(ensure(backend, ws.d_dispatched_, E * C * M * 4));
  // The forward may have had the weights' bf16 copies and this call not: its workspace is scratch.
  TUTEL_RETURN_IF_ERROR(ws.reserve_expert_workspace(backend, spec, C, weights.experts));

  const TensorView scores = view_of(ws.scores_, DType::kF32, {S, E}, dev);
  const TensorView expert_index = view_of(ws.expert_index_, DType::kI32, {S, k}, dev);
  const TensorView gates = view_of(ws.gates_, DType::kF32, {S, k}, dev);
  const TensorView location = view_of(ws.location_, DType::kI32, {S, k}, dev);
  const TensorView slots = view_of(ws.slot_assignment_, DType::kI32, {E, C}, dev);
  const TensorView dispatched = view_of(ws.dispatched_, spec.dispatch_dtype(), {E, C, M}, dev);
  const TensorView hidden = view_of(ws.hidden_, DType::kF32, {E, C, H}, dev);
  const TensorView expert_out = view_of(ws.expert_out_, DType::kF32, {E, C, O}, dev);
  TensorView pre;
  if (spec.activation != Activation::kRelu) pre = view_of(ws.pre_activation_, DType::kF32, {E, C, H}, dev);
  const TensorView workspace(ws.workspace_.data(), DType::kU8,
                             {static_cast<int64_t>(ws.workspace_.bytes())}, dev);
  const TensorView d_gates = view_of(ws.d_gates_, DType::kF32, {S, k}, dev);
  const TensorView d_logits = view_of(ws.d_logits_, DType::kF32, {S, E}, dev);
  const TensorView d_expert_out = view_of(ws.d_expert_out_, DType::kF32, {E, C, O}, dev);
  const TensorView d_hidden = view_of(ws.d_hidden_, DType::kF32, {E, C, H}, dev);
  const TensorView d_dispatched = view_of(ws.d_dispatched_, DType::kF32, {E, C, M}, dev);

  TUTEL_RETURN_IF_ERROR(backend.decode_backward({dy, expert_out, gates, expert_index, location, slots,
                                                 spec.is_postscore, d_expert_out, d_gates}));
  TUTEL_RETURN_IF_ERROR(backend.expert_backward({dispatched, pre, hidden, weights.experts, spec.activation,
                                                 spec.matmul_dtype, d_expert_out, d_hidden,
                                                 d_dispatched, grads.experts, workspace}));
  TUTEL_RETURN_IF_ERROR(backend.encode_backward({d_dispatched, x, gates, expert_index, location, C,
                                                 spec.is_postscore, dx, d_gates}));
  TUTEL_RETURN_IF_ERROR(backend.gate_backward({x, weights.gate_weight, scores, expert_index, d_gates,
                                               dl_aux, spec.normalize_gate, d_logits, dx,
                                               grads.gate_weight}));
  return Status::OK();
}

}  // namespace tutel
