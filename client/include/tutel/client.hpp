// libtutel_client, C++ API: a trainer's connection to tuteld and the MoE layers it serves.
//
//   auto client = tutel::client::Client::connect("/run/tuteld/client.sock");
//   auto layer = client->create_layer(spec_toml);           // or attach_layer("moe0")
//   layer->forward(x, tokens, y, &info);                     // training forward
//   layer->backward(dy, /*dl_aux=*/0.01f, dx);               // of the oldest pending forward
//   layer->step();  layer->zero_grad();
//
// Tokens travel through the session's shared-memory arena (docs/protocol.md): x is copied in,
// a descriptor goes on the request ring, the daemon posts a completion, y is copied out. Control
// requests (create, attach, step, save, ...) are frames on the unix socket.
//
// Thread-safety: threads may share a Client and its Layers; their calls take turns (one lock
// per session: a call that waits, for a result or for room, holds the others until it returns).
// For requests that overlap, use one Client per thread: distinct Clients are independent
// sessions and run concurrently. A Layer handle pairs a backward without a sequence with its
// oldest pending forward: threads sharing one handle pass the sequence.
//
// Failure: every call returns a Status; nothing throws. When the daemon exits, a waiting call
// notices within about 200 ms (it polls the control socket for EOF) and fails with Unavailable;
// after that every call on the client fails the same way: connect again and attach the layers
// (they belong to the tenant and outlive the session).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::client {

namespace internal {
class Session;
struct LayerState;
struct MappedDeviceRegion;
}  // namespace internal

struct ClientOptions {
  // Reported to the daemon in hello (its logs name sessions by it); "" = the program's name.
  std::string name;
  // Bound on waiting for one data-path completion; zero or negative = none (a dead daemon is
  // still noticed through the socket).
  std::chrono::milliseconds request_timeout{0};
  // Bound on waiting for a control reply (create, step, save, ...); zero or negative = none.
  std::chrono::milliseconds control_timeout{0};
  // How often a waiting call checks the control socket for the daemon's exit.
  std::chrono::milliseconds liveness_interval{200};
  // A file holding the tenant's secret, for a tenant with `secret_file` in tuteld.toml: sent in
  // the hello. "" = the file named by the environment variable TUTEL_SECRET_FILE, if set (how the
  // C ABI and the Python module take it); neither: no secret. The file must be closed to other
  // users (mode o-rwx, g-w), as the daemon's is, or connect fails saying so.
  std::string secret_file;
};

// What the daemon reports about a layer when it is created or attached.
struct LayerInfo {
  uint64_t handle = 0;  // the tenant's handle for the layer
  std::string name;
  int64_t experts = 0, model_dim = 0, hidden = 0, output_dim = 0, k = 0;
  int64_t step = 0;  // optimizer steps taken so far
  int rank = 0;          // the daemon's rank (device slot) the layer runs on
  std::string device;    // that rank's device: "cpu:0", "cuda:1" (the daemon's numbering)
  // The most bytes Layer::export_state's file takes (0: a daemon without ExportState).
  uint64_t state_bytes = 0;
  // The spec's gate_noise: > 0 when training forwards draw gate noise (a forward's NoiseKey
  // matters then only); 0 from a daemon that does not report it.
  double gate_noise = 0;
  // Set by a creation only: an earlier layer of this name had a checkpoint the daemon moved
  // aside rather than replace (a group layer of another spec, one waiting for its ranks, one a
  // restart left out for a quota): its file among the tenant's checkpoints, which Layer::load
  // takes into a layer of the spec it was written for.
  std::string kept_aside;
};

// A layer's state (Layer::export_state): a safetensors file, as Layer::save writes one, in this
// process's memory (a memfd mapped read-only; the daemon wrote it there). Move-only; the memory
// goes with the last of the object and the descriptors taken from it.
class ExportedState {
 public:
  ExportedState() = default;
  ExportedState(ExportedState&&) noexcept;
  ExportedState& operator=(ExportedState&&) noexcept;
  ~ExportedState();
  // The file's bytes.
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  // A new descriptor of the memfd (close it when done; -1 with errno set when none can be
  // made): the file is its first size() bytes; the memfd may be longer.
  int dup_fd() const;

 private:
  friend class Layer;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  uint64_t mapped_ = 0;
};

// The routing statistics of one forward (zero for a backward or a ping).
struct ForwardInfo {
  float l_aux = 0.f;      // the GShard load-balancing loss
  int64_t capacity = 0;   // slots per expert
  int64_t dropped = 0;    // (token, choice) assignments that did not fit
  uint64_t sequence = 0;  // the sequence a training forward's backward pairs with
};

// An asynchronous request in flight; Client::wait(ticket) completes it.
struct Ticket {
  uint64_t request_id = 0;
  uint64_t sequence = 0;  // of a training forward: pass it to submit_backward / backward
};

class Layer;

// Memory on a rank's device that the daemon and this process both map: a layer's *_device calls
// take pointers into it, and the tokens and results are never copied (docs/protocol.md §7). On
// a GPU daemon it is GPU memory (data() is a device pointer in this process, on the GPU named by
// device(); use it with cudaMemcpy or as a tensor's storage); on a CPU daemon, shared host
// memory. It counts against the tenant's max_memory_bytes.
// Move-only. Destroying it unmaps it (as unmap(), errors ignored; if that times out, the region
// stays mapped on both sides until the session ends). When the session ends first
// (Client::close, the daemon's exit), the mapping stays until the handle goes, so memory the
// program still points into never disappears under it; requests through it fail then.
class DeviceRegion {
 public:
  DeviceRegion(DeviceRegion&&) noexcept;
  DeviceRegion& operator=(DeviceRegion&&) noexcept;
  DeviceRegion(const DeviceRegion&) = delete;
  DeviceRegion& operator=(const DeviceRegion&) = delete;
  ~DeviceRegion();

  void* data() const;  // null once unmapped (by unmap() or a move)
  size_t bytes() const;
  int rank() const;
  // How it is mapped: "host_memfd" (shared host memory) or "cuda_ipc" (GPU memory).
  const std::string& kind() const;
  // The device: "cpu", or the GPU's PCI bus id ("0000:3b:00.0"), the same in every process.
  const std::string& device() const;
  // Waits for the session's requests in flight, then unmaps it here and in the daemon. When that
  // wait runs past ClientOptions::request_timeout, it returns Timeout and changes nothing: the
  // requests still in flight may use the region, so it stays mapped here and in the daemon (still
  // counted against the quota) and this handle stays valid; call unmap() again. Any other error
  // (the session ended) leaves the handle empty, as success does.
  Status unmap();

 private:
  friend class Client;
  DeviceRegion(std::shared_ptr<internal::Session> session, std::shared_ptr<internal::MappedDeviceRegion> region);
  std::shared_ptr<internal::Session> session_;
  std::shared_ptr<internal::MappedDeviceRegion> region_;
};

class Client {
 public:
  // Connects to tuteld's client socket, says hello and maps the session's arena.
  static Result<Client> connect(const std::string& socket_path, const ClientOptions& options = {});

  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();  // close()

  // Creates a layer in the daemon from a layer spec (TOML: name, experts, model_dim, hidden,
  // k, ..., init_seed or weights, an [optimizer] table; docs/config.md). A relative `weights`
  // path names a file in the tenant's checkpoint directory on the daemon's side.
  Result<Layer> create_layer(std::string_view spec_toml);
  // Attaches to a layer of this client's tenant by name (e.g. after a reconnect).
  Result<Layer> attach_layer(std::string_view name);

  // Waits for an asynchronous request and returns its result. The buffers given to the submit
  // call must stay valid until then; the output is written into them before wait returns.
  Result<ForwardInfo> wait(const Ticket& ticket);
  // As wait(ticket), but for at most `timeout` (zero: only a request already complete), instead
  // of ClientOptions::request_timeout; on Timeout the request stays in flight: wait again, or
  // abandon it. For waits that must stay interruptible (the Python module waits in slices).
  Result<ForwardInfo> wait(const Ticket& ticket, std::chrono::milliseconds timeout);
  // Gives up on a request the caller will not wait for (its buffers are about to go): from now
  // on nothing is written into its output, its result is dropped, and a training forward is no
  // longer pending on its layer (the library discards it in the daemon, which gives back its
  // saved state). It still holds its ring slot and arena space until the daemon completes it; a
  // request in a device region still reads and writes the region until then. Unknown or
  // finished tickets are ignored.
  void abandon(const Ticket& ticket);
  // Waits for every request in flight (their results stay available to wait()).
  Status wait_all();

  // Maps `bytes` (a multiple of 4) of shared memory on the daemon's `rank` (a layer's
  // LayerInfo::rank) for zero-copy requests. At most 16 regions per session.
  Result<DeviceRegion> map_device_region(int rank, size_t bytes);
  // One empty request through the rings and back (Op::kNop): checks the data path.
  Status ping();
  // Hands `bytes` (a multiple of 4) to the daemon through the arena and returns the sum of their
  // 32-bit words as the daemon read them: verifies and measures the shared-memory path.
  Result<uint64_t> transfer_checksum(const void* data, size_t bytes);

  // Ends the session: the daemon forgets this session's pending forwards; the layers stay.
  // Layers made by this client fail from now on. Idempotent.
  void close();
  bool is_connected() const;

  const std::string& tenant() const;  // the tenant the daemon mapped this process to
  uint64_t session_id() const;
  // Bytes of the arena's data region; one request's input plus output must fit in it.
  uint64_t data_bytes() const;
  const std::string& socket_path() const;

 private:
  explicit Client(std::shared_ptr<internal::Session> session);
  // Why there is no session: the object was moved from. (A closed client keeps its session,
  // closed, so that a call another thread is making on it stays safe.)
  Status no_session() const;
  std::shared_ptr<internal::Session> session_;
};

// A handle on one layer in the daemon. Move-only; dropping it does not destroy the layer.
//
// Buffers are f32, row-major: x [tokens, model_dim], y [tokens, output_dim], dy [tokens,
// output_dim], dx [tokens, model_dim]. A request's input plus output must fit in the session's
// data region (Client::data_bytes(); raise server.arena_bytes in tuteld.toml for more).
// tokens may be 0 (an empty batch: l_aux 0, capacity 0 on a layer without [group], and the
// pointers may be null except in the _device calls). On an expert-parallel layer a rank with an
// empty batch must still call, as its peers do: its part of the step's collectives serves their
// tokens.
class Layer {
 public:
  Layer(Layer&&) noexcept;
  Layer& operator=(Layer&&) noexcept;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;
  ~Layer();

  const LayerInfo& info() const;

  // Training forward under a new sequence number (info->sequence): the daemon keeps what the
  // backward needs until backward() consumes it.
  Status forward(const float* x, int64_t tokens, float* y, ForwardInfo* info = nullptr);
  // Forward without keeping anything for backward.
  Status infer(const float* x, int64_t tokens, float* y, ForwardInfo* info = nullptr);
  // Backward of the oldest training forward not yet backwarded; accumulates the gradients.
  // The aux-loss gradient dl_aux is d(total loss)/d(l_aux) (e.g. the aux-loss weight). Refused
  // (InvalidArgument, the forward dropped) when the parameters changed since the forward (a
  // step that applied gradients, a load, an import_state): run every backward before the step.
  Status backward(const float* dy, float dl_aux, float* dx);
  // backward(dy, dl_aux, dx) where dy and dx hold `tokens` rows: refused (InvalidArgument,
  // nothing sent, the forward still waiting) when the oldest forward had another count. The
  // oldest forward's rows are what backward() reads and writes: backwards taken in another
  // order (autograd's reverse order, a handle used twice in a model) read and wrote past
  // buffers sized for their own forward.
  Status backward_checked(int64_t tokens, const float* dy, float dl_aux, float* dx);
  // Backward of the training forward with `sequence`.
  Status backward(uint64_t sequence, const float* dy, float dl_aux, float* dx);
  // The same with kKeep: dx alone, the parameter gradients left as they were (the gradient of
  // the input alone; a frozen module). On an expert-parallel layer every rank must ask alike,
  // or every rank's backward is refused (InvalidArgument) and its forward consumed. An
  // overload, not a default argument: the library's existing symbols stay as they were.
  enum class ParamGrads { kAccumulate, kKeep };
  Status backward(uint64_t sequence, const float* dy, float dl_aux, float* dx, ParamGrads param_grads);
  // Drops the training forward `sequence` that will never be backwarded (the trainer skipped
  // its backward, or abandoned its wait), with what the daemon holds for it: otherwise that
  // stays until the session ends, counted against the tenant's memory. A forward that is not
  // pending (backwarded, never made) is no error. On an expert-parallel layer it is this rank's
  // alone (no collective): the other ranks' trainers drop the same forward, or their backward
  // meets this rank's next call of the layer, and the group refuses both (as for any skipped
  // backward; with no next call, it waits until the collective timeout).
  Status discard(uint64_t sequence);

  // Asynchronous forms: several micro-batches may be in flight (at most the ring's 64 slots
  // and as many as fit in the data region; a submit waits for room when needed).
  Result<Ticket> submit_forward(const float* x, int64_t tokens, float* y, bool training = true);
  // kTrainingWithoutNoise: a training forward routed as an inference is, without gate noise (a
  // module in eval mode whose input needs a gradient); refused (InvalidArgument) on a layer
  // with gate_noise > 0.
  enum class ForwardMode { kInference, kTraining, kTrainingWithoutNoise };
  Result<Ticket> submit_forward(const float* x, int64_t tokens, float* y, ForwardMode mode);
  // With a noise key: the gate noise is drawn from `noise` (with the spec's noise_seed), not
  // from the daemon's (step, sequence) key, so a forward run again with its key draws the same
  // noise and routes alike: a trainer that recomputes forwards (reentrant checkpointing) takes
  // the key from its own generator. kInference with a key is an inference routed as a training
  // forward is: the noise drawn, nothing kept for a backward (a module in train mode under
  // no_grad). kTrainingWithoutNoise takes none (InvalidArgument). A layer without gate noise
  // (info().gate_noise == 0) draws none either way.
  struct NoiseKey {
    uint64_t value = 0;
  };
  Result<Ticket> submit_forward(const float* x, int64_t tokens, float* y, ForwardMode mode, NoiseKey noise);
  Result<Ticket> submit_backward(uint64_t sequence, const float* dy, float dl_aux, float* dx);
  Result<Ticket> submit_backward(uint64_t sequence, const float* dy, float dl_aux, float* dx, ParamGrads param_grads);

  // Zero-copy forms: the input and the output point into one DeviceRegion of this client, mapped
  // on this layer's rank; the daemon reads and writes them in place. On a GPU the input must be
  // complete on the device when submitted (synchronise the stream that wrote it), and the output
  // is complete on the device when the call (or wait) returns. The sequences and the pending
  // list are shared with the forms above.
  Status forward_device(const float* x, int64_t tokens, float* y, ForwardInfo* info = nullptr);
  Status infer_device(const float* x, int64_t tokens, float* y, ForwardInfo* info = nullptr);
  Status backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx);
  Result<Ticket> submit_forward_device(const float* x, int64_t tokens, float* y, bool training = true);
  Result<Ticket> submit_forward_device(const float* x, int64_t tokens, float* y, ForwardMode mode);
  Result<Ticket> submit_forward_device(const float* x, int64_t tokens, float* y, ForwardMode mode, NoiseKey noise);
  Result<Ticket> submit_backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx);
  // With kKeep: dx alone (as backward's).
  Status backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx, ParamGrads param_grads);
  // Of the oldest training forward not yet backwarded, as backward(dy, dl_aux, dx); the _checked
  // form refuses (InvalidArgument, nothing sent) where that forward had another count than
  // `tokens`, the rows dy and dx hold in the region (it would read and write past them, into
  // whatever else the region holds).
  Status backward_device(const float* dy, float dl_aux, float* dx, ParamGrads param_grads);
  Status backward_device_checked(int64_t tokens, const float* dy, float dl_aux, float* dx, ParamGrads param_grads);
  Result<Ticket> submit_backward_device(uint64_t sequence, const float* dy, float dl_aux, float* dx,
                                        ParamGrads param_grads);

  // The control requests below first wait for every request of the session in flight, so a
  // step always sees the gradients of the backwards submitted before it.
  // Applies the optimizer to the gradients accumulated since zero_grad; returns the step count
  // after it. A layer with no gradients (no backward since its creation or since
  // zero_grad(set_to_none = true), or only backwards for dx alone) is left as it is, its count
  // included, as torch's optimizers skip a parameter whose .grad is None. On an expert-parallel
  // layer a collective: every rank steps alike (the same options, after the same backwards).
  struct StepOptions {
    // This step's learning rate and weight decay in place of the spec's (a schedule): finite,
    // >= 0, within f32. The spec's stay for steps without them.
    std::optional<double> lr, weight_decay;
  };
  Result<int64_t> step(const StepOptions& options);
  Result<int64_t> step();  // (overloads, not default arguments: the library's symbols stay)
  // set_to_none (torch's default): the gradients are absent until the next backward, so a step
  // before it changes nothing; false: gradients that are there become zeros that a step applies
  // (weight decay, momentum), absent ones stay absent, as after torch's
  // zero_grad(set_to_none=False).
  Status zero_grad(bool set_to_none);
  Status zero_grad();
  // The L2 norm of the accumulated gradients, +inf or NaN where one is not finite (gradient
  // clipping, an overflow check). On an expert-parallel layer it is the whole layer's, the same
  // on every rank, and a collective: every rank asks, in the same order as its steps.
  Result<double> grad_norm();
  // Multiplies the accumulated gradients by `factor` (finite, within f32): clipping by a norm,
  // unscaling a loss scale. On an expert-parallel layer each rank scales its own; every rank
  // must pass the same factor (the gate's gradient is summed over the group at the step).
  Status scale_grads(double factor);
  // Writes parameters and optimizer state to `path`, a relative name inside the tenant's
  // checkpoint directory on the daemon (server.state_dir/<tenant>/checkpoints/); returns the
  // daemon-side path it wrote. Absolute paths and ".." are refused.
  Result<std::string> save(std::string_view path);
  // Reads them back from the same place.
  Status load(std::string_view path);
  // The parameters, optimizer state, step and spec as save() writes them, but into this
  // process's memory rather than the daemon's checkpoint directory (a state_dict; a checkpoint
  // the trainer keeps). Memory for info().state_bytes is allocated here, and the daemon writes
  // into it. On an expert-parallel layer: this rank's experts and the gate, as save().
  Result<ExportedState> export_state();
  // Replaces them with the safetensors file that `fd` holds (a memfd, sent as it is, or another
  // regular file, copied into one here first; read from its start; the descriptor stays the
  // caller's), as load() reads one: this layer's tensors,
  // or, on an expert-parallel layer, the whole layer's (every expert, as a Tutel checkpoint has
  // them). A file the daemon refuses leaves the layer as it was.
  Status import_state(int fd);
  // Destroys the layer in the daemon (for every session of the tenant); the handle is dead after.
  Status destroy();

  // Training forwards submitted on this handle and not yet backwarded (oldest first).
  size_t pending_backwards() const;
  uint64_t oldest_pending_sequence() const;  // 0 when none

 private:
  friend class Client;
  explicit Layer(std::shared_ptr<internal::LayerState> state);
  std::shared_ptr<internal::LayerState> state_;
};

}  // namespace tutel::client
