#include "tutel/client.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "session.hpp"
#include "tutel/core/shared_memory.hpp"
#include "tutel/ipc/json_body.hpp"

namespace tutel::client {

using internal::LayerState;
using internal::Session;
using internal::Submission;
using nlohmann::json;

namespace {

Status moved_from(const char* what) {
  return Status::InvalidArgument(std::string("this ") + what +
                                 " was moved from; use the object it was moved to");
}

Result<LayerInfo> parse_layer_info(const json& body);

Result<LayerInfo> layer_info_from(const json& body) {
  Result<LayerInfo> info = parse_layer_info(body);
  if (!info.ok()) return internal::malformed_reply(info.status(), "LayerInfo");
  return info;
}

Result<LayerInfo> parse_layer_info(const json& body) {
  LayerInfo info;
  TUTEL_ASSIGN_OR_RETURN(const int64_t handle, ipc::get_int(body, "handle"));
  if (handle < 0) return Status::Corruption("tuteld sent a negative layer handle");
  info.handle = static_cast<uint64_t>(handle);
  TUTEL_ASSIGN_OR_RETURN(info.name, ipc::get_string(body, "name"));
  TUTEL_ASSIGN_OR_RETURN(info.experts, ipc::get_int(body, "experts"));
  TUTEL_ASSIGN_OR_RETURN(info.model_dim, ipc::get_int(body, "model_dim"));
  TUTEL_ASSIGN_OR_RETURN(info.output_dim, ipc::get_int(body, "output_dim"));
  for (auto [key, out] : {std::pair{"hidden", &info.hidden}, std::pair{"k", &info.k},
                          std::pair{"step", &info.step}}) {
    if (body.contains(key)) {
      TUTEL_ASSIGN_OR_RETURN(*out, ipc::get_int(body, key));
    }
  }
  if (body.contains("rank")) {
    TUTEL_ASSIGN_OR_RETURN(const int64_t rank, ipc::get_int(body, "rank"));
    if (rank < 0 || rank > std::numeric_limits<int>::max())
      return Status::Corruption("tuteld placed layer '" + info.name + "' on rank " + std::to_string(rank));
    info.rank = static_cast<int>(rank);
  }
  if (body.contains("device")) {
    TUTEL_ASSIGN_OR_RETURN(info.device, ipc::get_string(body, "device"));
  }
  if (body.contains("state_bytes")) {
    TUTEL_ASSIGN_OR_RETURN(const int64_t bytes, ipc::get_int(body, "state_bytes"));
    if (bytes < 0) return Status::Corruption("tuteld gave layer '" + info.name + "' a negative state_bytes");
    info.state_bytes = static_cast<uint64_t>(bytes);
  }
  if (body.contains("kept_aside")) {
    TUTEL_ASSIGN_OR_RETURN(info.kept_aside, ipc::get_string(body, "kept_aside"));
  }
  if (body.contains("gate_noise")) {
    TUTEL_ASSIGN_OR_RETURN(info.gate_noise, ipc::get_number(body, "gate_noise"));
    if (!(info.gate_noise >= 0) || !std::isfinite(info.gate_noise))
      return Status::Corruption("tuteld gave layer '" + info.name + "' gate_noise " + std::to_string(info.gate_noise));
  }
  if (info.model_dim < 1 || info.output_dim < 1 || info.experts < 1)
    return Status::Corruption("tuteld described layer '" + info.name +
                              "' with non-positive dimensions");
  return info;
}

// Bytes of a [tokens, dim] f32 tensor, or an error when that overflows.
Result<uint64_t> tensor_bytes(int64_t tokens, int64_t dim, const char* name) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 8;
  if (tokens < 0)
    return Status::InvalidArgument("tokens = " + std::to_string(tokens) + " must not be negative");
  if (tokens > kMax / 4 / dim)
    return Status::InvalidArgument(std::string(name) + " of " + std::to_string(tokens) +
                                   " tokens is too large");
  return static_cast<uint64_t>(tokens * dim * 4);
}

}  // namespace

// ---- Client ---------------------------------------------------------------------------------

Client::Client(std::shared_ptr<Session> session) : session_(std::move(session)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&& other) noexcept {
  if (this != &other) {
    close();
    session_ = std::move(other.session_);
  }
  return *this;
}
Client::~Client() { close(); }

Status Client::no_session() const { return moved_from("Client"); }

Result<Client> Client::connect(const std::string& socket_path, const ClientOptions& options) {
  TUTEL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Session::open(socket_path, options));
  return Client(std::move(session));
}

void Client::close() {
  // The session object stays until the Client goes: another thread's call may be inside it
  // (resetting session_ under it freed it, or left that thread waiting on a destroyed mutex).
  // Closed, every later call on it fails with this.
  if (session_)
    session_->close(Status::Unavailable("the client was closed (Client::close / tutel_close); connect again"));
}

bool Client::is_connected() const {
  if (!session_) return false;
  const auto held = session_->hold();
  return session_->broken().ok();
}

const std::string& Client::tenant() const {
  static const std::string none;
  return session_ ? session_->tenant() : none;
}
uint64_t Client::session_id() const { return session_ ? session_->id() : 0; }
uint64_t Client::data_bytes() const { return session_ ? session_->data_bytes() : 0; }
const std::string& Client::socket_path() const {
  static const std::string none;
  return session_ ? session_->socket_path() : none;
}

Result<Layer> Client::create_layer(std::string_view spec_toml) {
  if (!session_) return no_session();
  TUTEL_ASSIGN_OR_RETURN(
      json reply, session_->call(ipc::FrameType::kCreateLayer, {{"spec", std::string(spec_toml)}},
                                 ipc::FrameType::kLayerInfo));
  TUTEL_ASSIGN_OR_RETURN(LayerInfo info, layer_info_from(reply));
  auto state = std::make_shared<LayerState>();
  state->session = session_;
  state->info = std::move(info);
  return Layer(std::move(state));
}

Result<Layer> Client::attach_layer(std::string_view name) {
  if (!session_) return no_session();
  TUTEL_ASSIGN_OR_RETURN(json reply,
                         session_->call(ipc::FrameType::kAttachLayer, {{"name", std::string(name)}},
                                        ipc::FrameType::kLayerInfo));
  TUTEL_ASSIGN_OR_RETURN(LayerInfo info, layer_info_from(reply));
  auto state = std::make_shared<LayerState>();
  state->session = session_;
  state->info = std::move(info);
  return Layer(std::move(state));
}

Result<DeviceRegion> Client::map_device_region(int rank, size_t bytes) {
  if (!session_) return no_session();
  if (bytes == 0 || bytes % 4 != 0)
    return Status::InvalidArgument("a device region needs a positive multiple of 4 bytes (f32 tensors), not " +
                                   std::to_string(bytes));
  TUTEL_ASSIGN_OR_RETURN(auto region, session_->map_device_region(rank, bytes));
  return DeviceRegion(session_, std::move(region));
}

Result<ForwardInfo> Client::wait(const Ticket& ticket) {
  if (!session_) return no_session();
  return session_->wait(ticket.request_id);
}

Result<ForwardInfo> Client::wait(const Ticket& ticket, std::chrono::milliseconds timeout) {
  if (!session_) return no_session();
  return session_->wait(ticket.request_id, timeout);
}

void Client::abandon(const Ticket& ticket) {
  if (session_) session_->abandon(ticket.request_id);
}

Status Client::wait_all() {
  if (!session_) return no_session();
  return session_->drain();
}

Status Client::ping() {
  if (!session_) return no_session();
  TUTEL_ASSIGN_OR_RETURN(Ticket t, session_->submit(Submission{}));
  return session_->wait(t.request_id).status();
}

Result<uint64_t> Client::transfer_checksum(const void* data, size_t bytes) {
  if (!session_) return no_session();
  if (bytes % 4 != 0) return Status::InvalidArgument("transfer_checksum needs a multiple of 4 bytes");
  if (data == nullptr && bytes > 0) return Status::InvalidArgument("transfer_checksum: data is null");
  Submission s;
  s.op = ipc::Op::kChecksum;
  s.input = static_cast<const float*>(data);
  s.input_bytes = bytes;
  s.input_name = "data";
  TUTEL_ASSIGN_OR_RETURN(Ticket t, session_->submit(s));
  return session_->wait_checksum(t.request_id);
}

// ---- DeviceRegion ---------------------------------------------------------------------------

DeviceRegion::DeviceRegion(std::shared_ptr<Session> session, std::shared_ptr<internal::MappedDeviceRegion> region)
    : session_(std::move(session)), region_(std::move(region)) {}
DeviceRegion::DeviceRegion(DeviceRegion&&) noexcept = default;
DeviceRegion& DeviceRegion::operator=(DeviceRegion&& other) noexcept {
  if (this != &other) {
    (void)unmap();
    session_ = std::move(other.session_);
    region_ = std::move(other.region_);
  }
  return *this;
}
DeviceRegion::~DeviceRegion() { (void)unmap(); }

void* DeviceRegion::data() const { return region_ ? region_->memory.data() : nullptr; }
size_t DeviceRegion::bytes() const { return region_ ? region_->bytes : 0; }
int DeviceRegion::rank() const { return region_ ? region_->rank : -1; }
const std::string& DeviceRegion::kind() const {
  static const std::string none;
  return region_ ? region_->kind : none;
}
const std::string& DeviceRegion::device() const {
  static const std::string none;
  return region_ ? region_->device : none;
}

Status DeviceRegion::unmap() {
  if (!region_) return Status::OK();
  Status st = session_->unmap_device_region(region_);
  if (session_->maps(region_)) return st;  // timed out waiting: the handle stays for another try
  region_.reset();
  session_.reset();
  return st;
}

// ---- Layer ----------------------------------------------------------------------------------

Layer::Layer(std::shared_ptr<LayerState> state) : state_(std::move(state)) {}
Layer::Layer(Layer&&) noexcept = default;
Layer& Layer::operator=(Layer&&) noexcept = default;
Layer::~Layer() = default;

const LayerInfo& Layer::info() const {
  static const LayerInfo none;
  return state_ ? state_->info : none;
}

size_t Layer::pending_backwards() const {
  if (!state_) return 0;
  const auto held = state_->session->hold();
  return state_->pending.size();
}

uint64_t Layer::oldest_pending_sequence() const {
  if (!state_) return 0;
  const auto held = state_->session->hold();
  return !state_->pending.empty() ? state_->pending.begin()->first : 0;
}

namespace {

Status usable(const std::shared_ptr<LayerState>& state) {
  if (!state) return moved_from("Layer");
  const auto held = state->session->hold();  // another thread may be failing the session
  if (state->destroyed)
    return Status::NotFound("layer '" + state->info.name + "' was destroyed through this handle");
  return state->session->broken();
}

using ForwardMode = Layer::ForwardMode;

ForwardMode mode_of(bool training) { return training ? ForwardMode::kTraining : ForwardMode::kInference; }

// Builds and submits a forward; `in_device_region`: x and y point into a device region.
Result<Ticket> submit_forward_request(const std::shared_ptr<LayerState>& state, const float* x, int64_t tokens,
                                      float* y, ForwardMode mode, bool in_device_region,
                                      std::optional<Layer::NoiseKey> noise = std::nullopt) {
  const bool training = mode != ForwardMode::kInference;
  TUTEL_RETURN_IF_ERROR(usable(state));
  if (noise && mode == ForwardMode::kTrainingWithoutNoise)
    return Status::InvalidArgument("forward: a forward without gate noise takes no noise key");
  const auto held = state->session->hold();  // the handle's pending forwards with the session
  Submission s;
  TUTEL_ASSIGN_OR_RETURN(s.input_bytes, tensor_bytes(tokens, state->info.model_dim, "x"));
  TUTEL_ASSIGN_OR_RETURN(s.output_bytes, tensor_bytes(tokens, state->info.output_dim, "y"));
  // An empty batch has nothing to read or write in host memory; a device call still names its
  // region by pointer.
  if ((x == nullptr || y == nullptr) && (tokens != 0 || in_device_region))
    return Status::InvalidArgument("forward: x and y must not be null");
  s.op = ipc::Op::kForward;
  s.flags = training ? uint32_t{ipc::kFlagTraining} : uint32_t{0};
  if (mode == ForwardMode::kTrainingWithoutNoise) s.flags |= ipc::kFlagWithoutNoise;
  if (noise) {
    s.flags |= ipc::kFlagNoiseKey;
    s.noise_key = noise->value;
  }
  s.layer = state;
  s.tokens = tokens;
  s.input = x;
  s.output = y;
  s.in_device_region = in_device_region;
  // Sequences are unique in the session, so two handles on one layer never collide.
  if (training) s.sequence = state->session->next_sequence();
  TUTEL_ASSIGN_OR_RETURN(Ticket t, state->session->submit(s));
  if (training) state->pending.emplace(t.sequence, tokens);
  return t;
}

Result<Ticket> submit_backward_request(const std::shared_ptr<LayerState>& state, uint64_t sequence,
                                       const float* dy, float dl_aux, float* dx, bool in_device_region,
                                       Layer::ParamGrads param_grads = Layer::ParamGrads::kAccumulate) {
  TUTEL_RETURN_IF_ERROR(usable(state));
  const auto held = state->session->hold();
  auto pending = state->pending.find(sequence);
  if (pending == state->pending.end()) {
    return Status::InvalidArgument(
        "backward: no training forward with sequence " + std::to_string(sequence) +
        " waits for its backward on this handle of layer '" + state->info.name +
        "' (already backwarded, failed, or submitted through another handle)");
  }
  // As for the forward: an empty batch's host buffers may be null.
  if ((dy == nullptr || dx == nullptr) && (pending->second != 0 || in_device_region))
    return Status::InvalidArgument("backward: dy and dx must not be null");
  Submission s;
  s.op = ipc::Op::kBackward;
  if (param_grads == Layer::ParamGrads::kKeep) s.flags |= ipc::kFlagKeepParamGrads;
  s.layer = state;
  s.sequence = sequence;
  s.tokens = pending->second;
  s.input = dy;
  s.output = dx;
  s.dl_aux = dl_aux;
  s.input_name = "dy";
  s.output_name = "dx";
  s.in_device_region = in_device_region;
  TUTEL_ASSIGN_OR_RETURN(s.input_bytes, tensor_bytes(s.tokens, state->info.output_dim, "dy"));
  TUTEL_ASSIGN_OR_RETURN(s.output_bytes, tensor_bytes(s.tokens, state->info.model_dim, "dx"));
  TUTEL_ASSIGN_OR_RETURN(Ticket t, state->session->submit(s));
  state->pending.erase(sequence);
  return t;
}

// Waits for a request that a synchronous call submitted. When the wait times out, the request
// is abandoned: the caller may free its buffers once the call returns, and no later backward
// may pair with a forward whose result the caller never saw. The message says so (the wait's
// own says "wait again", which a synchronous caller, without a ticket, cannot).
// `submitted` is checked first: a moved-from handle (null `state`) failed there. A backward's
// forward is consumed when the backward is submitted, and the daemon still runs an abandoned
// backward (its gradients accumulate): calling again would pair the retry with the next
// forward, so a backward's message (`what`) says not to.
enum class Waited { kForward, kBackward };
Result<ForwardInfo> wait_synchronously(const std::shared_ptr<LayerState>& state, Result<Ticket> submitted,
                                       Waited what = Waited::kForward) {
  TUTEL_ASSIGN_OR_RETURN(Ticket t, std::move(submitted));
  Session& session = *state->session;
  Result<ForwardInfo> got = session.wait(t.request_id);
  if (!got.ok() && got.status().code() == StatusCode::kTimeout) {
    session.abandon(t.request_id);
    return Status::Timeout(
        "layer '" + state->info.name + "': " + std::string(got.status().message()) +
        (what == Waited::kForward
             ? " [this call's request was given up: its buffers are not written, and a training forward is "
               "discarded in the daemon; call again, or raise the request timeout]"
             : " [this backward was given up: dx is not written, but the daemon still runs it and its gradients "
               "accumulate; its forward is consumed, so do not call backward again for it (a retry would pair "
               "with the next forward): raise the request timeout, or zero the gradients and run the step's "
               "forwards again]"));
  }
  return got;
}

// The backward of the oldest training forward waiting on the handle, chosen and submitted under
// the session's lock, so that two threads sharing the handle never take the same one. With
// `tokens`, refused when that forward had another count: the caller's dy and dx hold `tokens`
// rows, and the backward reads and writes the forward's.
Status backward_oldest(const std::shared_ptr<LayerState>& state, std::optional<int64_t> tokens, const float* dy,
                       float dl_aux, float* dx, bool in_device_region, Layer::ParamGrads param_grads) {
  TUTEL_RETURN_IF_ERROR(usable(state));
  const auto held = state->session->hold();  // the oldest stays the oldest until it is submitted
  if (state->pending.empty()) {
    return Status::InvalidArgument(
        "backward: layer '" + state->info.name +
        "' has no training forward waiting for its backward on this handle; "
        "call forward() first");
  }
  const auto [sequence, rows] = *state->pending.begin();
  if (tokens && *tokens != rows)
    return Status::InvalidArgument(
        "backward: dy and dx hold " + std::to_string(*tokens) + " tokens, but the oldest training forward of layer '" +
        state->info.name + "' waiting for its backward had " + std::to_string(rows) +
        "; backwards pair with forwards oldest first: take them in that order, or pass each forward's "
        "sequence (the submit_backward calls)");
  return wait_synchronously(
             state, submit_backward_request(state, sequence, dy, dl_aux, dx, in_device_region, param_grads),
             Waited::kBackward)
      .status();
}

// Waits for a submitted forward; its statistics go to `info` when given.
Status wait_forward(const std::shared_ptr<LayerState>& state, Result<Ticket> submitted, ForwardInfo* info) {
  TUTEL_ASSIGN_OR_RETURN(ForwardInfo got, wait_synchronously(state, std::move(submitted)));
  if (info != nullptr) *info = got;
  return Status::OK();
}

}  // namespace

Result<Ticket> Layer::submit_forward(const float* x, int64_t tokens, float* y, bool training) {
  return submit_forward_request(state_, x, tokens, y, mode_of(training), false);
}

Result<Ticket> Layer::submit_forward(const float* x, int64_t tokens, float* y, ForwardMode mode) {
  return submit_forward_request(state_, x, tokens, y, mode, false);
}

Result<Ticket> Layer::submit_forward(const float* x, int64_t tokens, float* y, ForwardMode mode, NoiseKey noise) {
  return submit_forward_request(state_, x, tokens, y, mode, false, noise);
}

Result<Ticket> Layer::submit_forward_device(const float* x, int64_t tokens, float* y, ForwardMode mode) {
  return submit_forward_request(state_, x, tokens, y, mode, true);
}

Result<Ticket> Layer::submit_forward_device(const float* x, int64_t tokens, float* y, ForwardMode mode,
                                            NoiseKey noise) {
  return submit_forward_request(state_, x, tokens, y, mode, true, noise);
}

Result<Ticket> Layer::submit_backward(uint64_t sequence, const float* dy, float dl_aux, float* dx) {
  return submit_backward(sequence, dy, dl_aux, dx, ParamGrads::kAccumulate);
}

Result<Ticket> Layer::submit_backward(uint64_t sequence, const float* dy, float dl_aux, float* dx,
                                      ParamGrads param_grads) {
  return submit_backward_request(state_, sequence, dy, dl_aux, dx, false, param_grads);
}

Result<Ticket> Layer::submit_forward_device(const float* x, int64_t tokens, float* y, bool training) {
  return submit_forward_request(state_, x, tokens, y, mode_of(training), true);
}

Result<Ticket> Layer::submit_backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx) {
  return submit_backward_device(sequence, dy, dl_aux, dx, ParamGrads::kAccumulate);
}

Result<Ticket> Layer::submit_backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx,
                                             ParamGrads param_grads) {
  return submit_backward_request(state_, sequence, dy, dl_aux, dx, true, param_grads);
}

Status Layer::forward_device(const float* x, int64_t tokens, float* y, ForwardInfo* info) {
  return wait_forward(state_, submit_forward_device(x, tokens, y, true), info);
}

Status Layer::infer_device(const float* x, int64_t tokens, float* y, ForwardInfo* info) {
  return wait_forward(state_, submit_forward_device(x, tokens, y, false), info);
}

Status Layer::backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx) {
  return backward_device(sequence, dy, dl_aux, dx, ParamGrads::kAccumulate);
}

Status Layer::backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx, ParamGrads param_grads) {
  return wait_synchronously(state_, submit_backward_device(sequence, dy, dl_aux, dx, param_grads), Waited::kBackward)
      .status();
}

Status Layer::backward_device(const float* dy, float dl_aux, float* dx, ParamGrads param_grads) {
  return backward_oldest(state_, std::nullopt, dy, dl_aux, dx, true, param_grads);
}

Status Layer::backward_device_checked(int64_t tokens, const float* dy, float dl_aux, float* dx,
                                      ParamGrads param_grads) {
  return backward_oldest(state_, tokens, dy, dl_aux, dx, true, param_grads);
}

Status Layer::forward(const float* x, int64_t tokens, float* y, ForwardInfo* info) {
  return wait_forward(state_, submit_forward(x, tokens, y, true), info);
}

Status Layer::infer(const float* x, int64_t tokens, float* y, ForwardInfo* info) {
  return wait_forward(state_, submit_forward(x, tokens, y, false), info);
}

Status Layer::backward(const float* dy, float dl_aux, float* dx) {
  return backward_oldest(state_, std::nullopt, dy, dl_aux, dx, false, ParamGrads::kAccumulate);
}

Status Layer::backward_checked(int64_t tokens, const float* dy, float dl_aux, float* dx) {
  return backward_oldest(state_, tokens, dy, dl_aux, dx, false, ParamGrads::kAccumulate);
}

Status Layer::backward(uint64_t sequence, const float* dy, float dl_aux, float* dx) {
  return backward(sequence, dy, dl_aux, dx, ParamGrads::kAccumulate);
}

Status Layer::backward(uint64_t sequence, const float* dy, float dl_aux, float* dx, ParamGrads param_grads) {
  return wait_synchronously(state_, submit_backward(sequence, dy, dl_aux, dx, param_grads), Waited::kBackward).status();
}

Status Layer::discard(uint64_t sequence) {
  TUTEL_RETURN_IF_ERROR(usable(state_));
  const auto held = state_->session->hold();
  Submission s;
  s.op = ipc::Op::kDiscard;
  s.layer = state_;
  s.sequence = sequence;
  Result<Ticket> submitted = state_->session->submit(s);
  if (submitted.ok()) state_->pending.erase(sequence);  // no backward may pair with it now
  return wait_synchronously(state_, std::move(submitted)).status();
}

namespace {

// A control request about one layer, after every request in flight has completed.
// `send_fds` go with the request (SCM_RIGHTS).
Result<json> layer_call(const std::shared_ptr<LayerState>& state, ipc::FrameType type, json body,
                        const std::vector<int>& send_fds = {}) {
  TUTEL_RETURN_IF_ERROR(usable(state));
  if (Status drained = state->session->drain(); !drained.ok()) {
    // The wait's own "wait again" is for a caller holding tickets: say what this one can do.
    if (drained.code() == StatusCode::kTimeout)
      return Status::Timeout(std::string(ipc::frame_type_name(type)) + " of layer '" + state->info.name +
                             "' waits for the requests in flight first: " + std::string(drained.message()) +
                             " [nothing was sent; call it again once they complete]");
    return drained;
  }
  body["handle"] = state->info.handle;
  return state->session->call(type, body, ipc::FrameType::kOk, nullptr, send_fds);
}

}  // namespace

Result<int64_t> Layer::step(const StepOptions& options) {
  json body = json::object();
  for (auto [key, value] : {std::pair{"lr", &options.lr}, std::pair{"weight_decay", &options.weight_decay}})
    if (value->has_value()) {
      // JSON has no NaN or infinity; the daemon checks the range.
      if (!std::isfinite(**value))
        return Status::InvalidArgument(std::string("step: ") + key + " must be finite, not " + std::to_string(**value));
      body[key] = **value;
    }
  TUTEL_ASSIGN_OR_RETURN(json reply, layer_call(state_, ipc::FrameType::kStep, std::move(body)));
  Result<int64_t> step = ipc::get_int(reply, "step");
  if (!step.ok()) return internal::malformed_reply(step.status(), "Step");
  state_->info.step = *step;
  // A daemon from before per-step settings answers without what it applied: it used the spec's.
  if ((options.lr || options.weight_decay) && !reply.contains("lr"))
    return Status::Unimplemented(
        "step: this tuteld steps only with the layer spec's lr and weight_decay (it predates per-step settings); "
        "upgrade the daemon to run a learning-rate schedule. The step was taken with the spec's settings");
  return state_->info.step;
}

Result<int64_t> Layer::step() { return step(StepOptions{}); }

Status Layer::zero_grad() { return zero_grad(true); }

Status Layer::zero_grad(bool set_to_none) {
  json body = json::object();
  if (!set_to_none) body["set_to_none"] = false;
  return layer_call(state_, ipc::FrameType::kZeroGrad, std::move(body)).status();
}

Result<double> Layer::grad_norm() {
  TUTEL_ASSIGN_OR_RETURN(json reply, layer_call(state_, ipc::FrameType::kGradNorm, json::object()));
  const auto norm = reply.find("norm");
  if (norm != reply.end() && norm->is_number()) return norm->get<double>();
  const auto not_finite = reply.find("not_finite");
  if (not_finite != reply.end() && *not_finite == "inf") return std::numeric_limits<double>::infinity();
  if (not_finite != reply.end() && *not_finite == "nan") return std::numeric_limits<double>::quiet_NaN();
  return internal::malformed_reply(Status::InvalidArgument("no number in 'norm' and no 'not_finite' of inf or nan: " +
                                                           ipc::dump_body(reply)),
                                   "GradNorm");
}

Status Layer::scale_grads(double factor) {
  // JSON carries no inf or NaN (it would send null): refused here, before anything is sent.
  if (!std::isfinite(factor))
    return Status::InvalidArgument("scale_grads: the factor must be a finite number, not " + std::to_string(factor));
  return layer_call(state_, ipc::FrameType::kScaleGrads, {{"factor", factor}}).status();
}

Result<std::string> Layer::save(std::string_view path) {
  TUTEL_ASSIGN_OR_RETURN(json reply,
                         layer_call(state_, ipc::FrameType::kSave, {{"path", std::string(path)}}));
  if (reply.contains("path") && reply["path"].is_string()) return reply["path"].get<std::string>();
  return std::string(path);
}

Status Layer::load(std::string_view path) {
  return layer_call(state_, ipc::FrameType::kLoad, {{"path", std::string(path)}}).status();
}

ExportedState::ExportedState(ExportedState&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      mapped_(std::exchange(o.mapped_, 0)) {}

ExportedState& ExportedState::operator=(ExportedState&& o) noexcept {
  if (this != &o) {
    ExportedState old(std::move(*this));  // what this held goes at the end of the scope
    fd_ = std::exchange(o.fd_, -1);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    mapped_ = std::exchange(o.mapped_, 0);
  }
  return *this;
}

ExportedState::~ExportedState() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), mapped_);
  if (fd_ >= 0) ::close(fd_);
}

int ExportedState::dup_fd() const {
  if (fd_ < 0) {
    errno = EBADF;
    return -1;
  }
  return ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
}

Result<ExportedState> Layer::export_state() {
  TUTEL_RETURN_IF_ERROR(usable(state_));
  const uint64_t bound = state_->info.state_bytes;
  if (bound == 0)
    return Status::Unimplemented("this tuteld does not export a layer's state (it sent no state_bytes): upgrade it, "
                                 "or use save()");
  // Allocated here, every page (the daemon refuses a memfd with holes): the memory is this
  // process's. Sealed against shrinking, so the daemon can map it without fear of SIGBUS.
  TUTEL_ASSIGN_OR_RETURN(SharedMemory memory, SharedMemory::create(bound, "tuteld layer state"));
  TUTEL_ASSIGN_OR_RETURN(json reply, layer_call(state_, ipc::FrameType::kExportState, json::object(), {memory.fd()}));
  const auto bytes = reply.find("bytes");
  if (bytes == reply.end() || !bytes->is_number_unsigned() || bytes->get<uint64_t>() < 8 ||
      bytes->get<uint64_t>() > memory.bytes())
    return internal::malformed_reply(
        Status::InvalidArgument("'bytes' must be a size within the " + std::to_string(memory.bytes()) +
                                " bytes given: " + ipc::dump_body(reply)),
        "ExportState");
  // Read-only from here on: a second mapping, then the writable one goes.
  const uint64_t mapped = memory.bytes();
  void* view = ::mmap(nullptr, mapped, PROT_READ, MAP_SHARED, memory.fd(), 0);
  if (view == MAP_FAILED)
    return Status::ResourceExhausted("mapping the exported state of " + std::to_string(mapped) +
                                     " bytes: " + std::strerror(errno));
  ExportedState out;
  out.fd_ = memory.take_fd().release();
  out.data_ = static_cast<const uint8_t*>(view);
  out.size_ = bytes->get<uint64_t>();
  out.mapped_ = mapped;
  return out;
}

namespace {

// The daemon reads memfds only (a file on a network or FUSE mount could block it for good):
// another regular file is copied into a new one here, from its start, and sealed, so that the
// daemon maps it rather than copying it again.
Result<UniqueFd> memfd_copy_of(int fd) {
  TUTEL_ASSIGN_OR_RETURN(UniqueFd copy, create_memfd("tuteld layer state"));
  std::vector<char> chunk(size_t{1} << 20);
  for (off_t at = 0;;) {
    const ssize_t n = ::pread(fd, chunk.data(), chunk.size(), at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::IOError(std::string("import_state: reading the file: ") + std::strerror(errno));
    if (n == 0) {
      if (::fcntl(copy.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) != 0)
        return Status::Internal(std::string("import_state: sealing the copy: ") + std::strerror(errno));
      return copy;
    }
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::pwrite(copy.get(), chunk.data() + done, static_cast<size_t>(n - done), at + done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return Status::ResourceExhausted(std::string("import_state: copying the file: ") + std::strerror(errno));
      done += w;
    }
    at += n;
  }
}

}  // namespace

Status Layer::import_state(int fd) {
  // A descriptor that is not open would fail the send, and a failed send ends the session.
  if (fd < 0 || ::fcntl(fd, F_GETFD) < 0)
    return Status::InvalidArgument("import_state: " + std::to_string(fd) + " is not an open descriptor");
  if (check_memory_file(fd, "the state").ok())
    return layer_call(state_, ipc::FrameType::kImportState, json::object(), {fd}).status();
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return Status::InvalidArgument("import_state: descriptor " + std::to_string(fd) +
                                   " is not a regular file (give a memfd or an open safetensors file)");
  TUTEL_ASSIGN_OR_RETURN(UniqueFd copy, memfd_copy_of(fd));
  return layer_call(state_, ipc::FrameType::kImportState, json::object(), {copy.get()}).status();
}

Status Layer::destroy() {
  TUTEL_RETURN_IF_ERROR(usable(state_));
  const auto held = state_->session->hold();
  TUTEL_RETURN_IF_ERROR(layer_call(state_, ipc::FrameType::kDestroyLayer, json::object()).status());
  state_->destroyed = true;
  state_->pending.clear();
  return Status::OK();
}

}  // namespace tutel::client
