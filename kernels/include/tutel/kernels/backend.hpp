// Backend: the device-specific half of the MoE layer (DESIGN §2, §3).
//
// One interface, implemented by kernels/cpu (oneDNN + OpenMP) and kernels/cuda. Each op works on
// caller-owned TensorViews on the backend's device; no op allocates behind the caller's back:
// memory comes from allocate(), temporary space from a caller-provided workspace whose size the
// backend reports. The op sequence that composes a layer lives in moe_layer.hpp, above this
// interface, so every backend runs the same algorithm.
//
// Index tensors are i32; gate math is f32 on every backend.
// Thread-safety: a Backend may be used from one thread at a time (an executor owns it).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/shared_memory.hpp"
#include "tutel/core/status.hpp"
#include "tutel/core/tensor.hpp"

namespace tutel {

class Backend;

// Memory on one backend's device, freed by that backend when the buffer dies. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes) : owner_(owner), data_(data), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  void reset();

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// How another process of this host maps memory from Backend::allocate_shareable().
struct MemoryExport {
  // "host_memfd": mmap `fd`, a memfd sealed against shrink and grow.
  // "cuda_ipc": cudaIpcOpenMemHandle on `handle` (a cudaIpcMemHandle_t's bytes) on `device_id`.
  std::string kind;
  std::string handle;
  UniqueFd fd;
  // The device: "cpu", or the GPU's PCI bus id ("0000:3b:00.0"), which names the same GPU in
  // every process whatever its CUDA_VISIBLE_DEVICES.
  std::string device_id;
  // True where freeing the memory while another process still maps it is undefined (CUDA IPC:
  // cudaFree before the importer's cudaIpcCloseMemHandle), so its owner must keep it until the
  // importer is known to be done, which for an untrusted importer is never: until exit.
  bool keep_until_exit = false;
};
struct ShareableBuffer {
  DeviceBuffer buffer;
  MemoryExport exported;
};

enum class Activation : uint8_t { kRelu, kGelu, kSilu };
std::string_view activation_name(Activation a);
std::optional<Activation> parse_activation(std::string_view name);

enum class CopyKind : uint8_t { kHostToDevice, kDeviceToHost, kDeviceToDevice };

// Gate: logits = x·wgᵀ (+ noise), fp32 softmax, top-k (ties to the lower expert), gate
// normalisation and the GShard loss.
struct GateForwardArgs {
  TensorView x;           // [S, M] f32
  TensorView gate_weight; // [E, M] f32
  TensorView noise;       // [S, E] f32, already scaled; empty for none
  int k = 1;
  bool normalize_gate = true;
  TensorView scores;      // out [S, E] f32: softmax(logits + noise)
  TensorView expert_index;// out [S, k] i32
  TensorView gates;       // out [S, k] f32 (normalised when k > 1 and normalize_gate)
  TensorView l_aux;       // out [1] f32
};

// Locations: slot of each (token, choice) in its expert's queue, all choice-0 assignments
// first; batch_prioritized orders tokens by decreasing max score (stable).
struct LocationsArgs {
  TensorView scores;        // [S, E] f32 (read only when batch_prioritized)
  TensorView expert_index;  // [S, k] i32
  bool batch_prioritized = false;
  TensorView location;      // out [S, k] i32
  TensorView expert_count;  // out [E] i32: assignments per expert over all choices
};

// The inverse of the routing for capacity C: which assignment (s*k + j) fills slot (e, c), or -1.
struct SlotMapArgs {
  TensorView expert_index;  // [S, k] i32
  TensorView location;      // [S, k] i32
  int64_t capacity = 0;
  TensorView slot_assignment;  // out [E, C] i32
};

// disp[e, c] = x[s] (· g[s, j] unless postscore) for the assignment in slot (e, c); empty slots 0.
// A bf16 `dispatched` gets the f32 value's rounding (Backend::convert's), the same bits as
// encoding in f32 and converting after.
struct EncodeArgs {
  TensorView x;                // [S, M] f32
  TensorView gates;            // [S, k] f32
  TensorView slot_assignment;  // [E, C] i32
  bool is_postscore = true;
  TensorView dispatched;       // out [E, C, M] f32 or bf16
};

// y[s] = Σ_j (g[s, j] if postscore) · expert_out[e, c] over kept choices, in j order.
struct DecodeArgs {
  TensorView expert_out;    // [E, C, O] f32
  TensorView gates;         // [S, k] f32
  TensorView expert_index;  // [S, k] i32
  TensorView location;      // [S, k] i32
  int64_t capacity = 0;
  bool is_postscore = true;
  TensorView y;             // out [S, O] f32
};

// Backward of decode: gradient of expert_out and (postscore) of the gates.
struct DecodeBackwardArgs {
  TensorView dy;               // [S, O] f32
  TensorView expert_out;       // [E, C, O] f32
  TensorView gates;            // [S, k] f32
  TensorView expert_index;     // [S, k] i32
  TensorView location;         // [S, k] i32
  TensorView slot_assignment;  // [E, C] i32
  bool is_postscore = true;
  TensorView d_expert_out;     // out [E, C, O] f32
  TensorView d_gates;          // out [S, k] f32 (zeros when !postscore; encode' adds to it)
};

// Backward of encode: dx (overwritten) and, unless postscore, the gate gradient (added).
struct EncodeBackwardArgs {
  TensorView d_dispatched;  // [E, C, M] f32
  TensorView x;             // [S, M] f32
  TensorView gates;         // [S, k] f32
  TensorView expert_index;  // [S, k] i32
  TensorView location;      // [S, k] i32
  int64_t capacity = 0;
  bool is_postscore = true;
  TensorView dx;            // out [S, M] f32
  TensorView d_gates;       // in/out [S, k] f32
};

// Backward of the gate: normalisation', the GShard loss', softmax' and the gate matmul'.
struct GateBackwardArgs {
  TensorView x;             // [S, M] f32
  TensorView gate_weight;   // [E, M] f32
  TensorView scores;        // [S, E] f32
  TensorView expert_index;  // [S, k] i32
  TensorView d_gates;       // [S, k] f32
  float dl_aux = 0.f;
  bool normalize_gate = true;
  TensorView d_logits;      // scratch [S, E] f32
  TensorView dx;            // in/out [S, M] f32: the gate's part is added
  TensorView d_gate_weight; // in/out [E, M] f32: accumulated
};

// The grouped expert FFN: h = act(disp·fc1ᵀ + b1), out = h·fc2 + b2, for every local expert.
struct ExpertWeights {
  TensorView fc1_weight;  // [E, H, M]
  TensorView fc1_bias;    // [E, H] or empty
  TensorView fc2_weight;  // [E, H, O]
  TensorView fc2_bias;    // [E, O] or empty
  // (optional) bf16 copies of the two weights, each empty or bf16 in its weight's shape. Owned
  // and kept current by whoever owns the weights (Backend::convert once, then every optimizer
  // step through param_bf16): the backend never caches conversions itself, as a CUDA graph that
  // baked a cache's address would read stale weights after a step. With matmul_dtype bf16 the
  // expert ops read a present copy instead of converting the weight into the workspace on
  // every call, with bit-identical results; f32 matmuls ignore them.
  TensorView fc1_weight_bf16;  // [E, H, M] bf16 or empty
  TensorView fc2_weight_bf16;  // [E, H, O] bf16 or empty

  // Both copies are present: what ExpertShape::weights_bf16 promises.
  bool has_bf16_copies() const { return !fc1_weight_bf16.empty() && !fc2_weight_bf16.empty(); }
  // OK when every present copy is bf16 in its weight's shape; `what` prefixes messages.
  Status check_bf16_copies(std::string_view what) const;
};

struct ExpertForwardArgs {
  // [E, C, M] f32; or bf16 under bf16 matmuls (encode's bf16 output, LayerSpec::dispatch_dtype),
  // read as it is where an f32 one would be converted first: the same operand values. (A GEMM
  // library that picks its algorithm by pointer alignment, as cuBLAS does, may then differ in
  // the last bits where the rows start less aligned than a converted copy would.)
  TensorView dispatched;
  ExpertWeights weights;    // f32
  Activation activation = Activation::kRelu;
  DType matmul_dtype = DType::kF32;  // f32, or bf16 inputs with f32 accumulation
  TensorView pre_activation;// out [E, C, H] f32; needed for backward of gelu/silu, else may be empty
  TensorView hidden;        // out [E, C, H] f32: act(pre); scratch when !keep_hidden
  TensorView expert_out;    // out [E, C, O] f32
  TensorView workspace;     // u8, expert_workspace_bytes() long
  // False where no backward follows (inference): a backend may then leave `hidden` holding
  // anything, and skip writing act(pre) in f32 where its second GEMM reads another copy.
  bool keep_hidden = true;
  // Optional [E] i32: the tokens routed to each expert (LocationsArgs::expert_count), or any
  // value > 0 for an expert in use, read when the op runs. With it, an inference (!keep_hidden)
  // may skip an expert at 0: its rows of `hidden` hold anything, and its rows of `expert_out`
  // zeros (decode reads no slot of theirs; the expert-parallel layer sends them back to their
  // ranks). Skipping saves reading its weights (a decode step routes a few tokens to a few of
  // the experts). The CPU backend skips them; the CUDA backend computes every expert.
  TensorView expert_count;
};

struct ExpertBackwardArgs {
  TensorView dispatched;     // [E, C, M]: f32, or bf16 under bf16 matmuls (as in forward)
  TensorView pre_activation; // [E, C, H] (gelu/silu)
  TensorView hidden;         // [E, C, H]
  ExpertWeights weights;
  Activation activation = Activation::kRelu;
  DType matmul_dtype = DType::kF32;
  TensorView d_expert_out;   // [E, C, O]
  TensorView d_hidden;       // scratch [E, C, H]
  TensorView d_dispatched;   // out [E, C, M]
  ExpertWeights grads;       // in/out: accumulated (biases when present)
  TensorView workspace;
};

// Both optimizers: when param_bf16 is given, the step also writes bf16(updated param) there
// (Backend::convert's rounding) in the same pass, so a weight's bf16 copy (ExpertWeights) stays
// current without a second read of the parameter.
struct SgdArgs {
  TensorView param, grad, momentum_buffer;  // f32, same shape; momentum_buffer empty when momentum == 0
  float lr = 0.01f, momentum = 0.f, weight_decay = 0.f;
  bool nesterov = false;
  bool first_step = false;  // PyTorch initialises the buffer with the first gradient
  TensorView param_bf16;    // out, optional: bf16 in param's shape
};

// The betas are doubles, as PyTorch's are: a moment is updated as beta·m + (1 − beta)·g with both
// factors rounded to f32 from the double (1 − f32(0.999) is 1.3e-5 off 0.001), and the bias
// corrections 1 − beta^step are computed in double.
struct AdamWArgs {
  TensorView param, grad, exp_avg, exp_avg_sq;  // f32, same shape
  float lr = 1e-3f;
  double beta1 = 0.9, beta2 = 0.999;
  float eps = 1e-8f, weight_decay = 0.01f;
  int64_t step = 1;       // 1-based, after increment (PyTorch)
  TensorView param_bf16;  // out, optional: bf16 in param's shape
};

struct ExpertShape {
  int64_t experts, capacity, model_dim, hidden, output_dim;
  // The ops will get both weights' bf16 copies (ExpertWeights::has_bf16_copies()): a bf16
  // workspace then holds converted activations only, and is smaller. An op given a weight
  // without its copy needs the size for false, and refuses a workspace that is too small.
  bool weights_bf16 = false;
};

// OK when the expert ops may read `dispatched` under `matmul_dtype`: f32 always, bf16 only
// under bf16 matmuls (an f32 GEMM has no bf16 input). `op` prefixes the message.
Status check_dispatched(const TensorView& dispatched, DType matmul_dtype, std::string_view op);

// OK when `copy` is a bf16 view in the shape of `source`, an f32 tensor: the form of every bf16
// copy (ExpertWeights, the optimizers' param_bf16, convert's dst). `what` names the copy.
Status check_bf16_copy(const TensorView& source, const TensorView& copy, std::string_view what);

// The shape rules of Backend::add (dst and src f32 of one shape) and of add_row_bias and
// add_column_sums (`matrix` f32 [R, O], `slice` f32 [n], 0 <= column, column + n <= O), shared
// by every backend so they refuse the same arguments with the same message. `op` prefixes it.
Status check_add(const TensorView& dst, const TensorView& src, std::string_view op);
// add_sum_squares: src any f32 tensor, dst an f32 tensor of one element. scale: an f32 tensor.
Status check_sum_squares(const TensorView& src, const TensorView& dst);
Status check_scale(const TensorView& t);
Status check_column_slice(const TensorView& matrix, const TensorView& slice, int64_t column,
                          std::string_view op);

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual std::string_view name() const = 0;
  // The device this backend's memory lives on.
  virtual Device device() const = 0;
  // What it computes on, in one line ("cpu: 2 threads, <model>", "cuda: NVIDIA H200, sm_90,
  // 132 SMs"): what measurements made here hold for (the tuner's decisions are kept only on the
  // same). The default is name().
  virtual std::string describe() const { return std::string(name()); }

  // Device memory, 64-byte aligned at least.
  virtual Result<DeviceBuffer> allocate(size_t bytes) = 0;
  // Called by DeviceBuffer; frees what allocate() returned.
  virtual void release(void* data, size_t bytes) = 0;
  // `kind` says where dst and src live (host memory or this backend's memory). A device-to-host
  // copy returns once the data is on the host, after every op queued before it; a host-to-device
  // copy may read its source until then (or until synchronize()).
  virtual Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) = 0;
  virtual Status fill_zero(TensorView t) = 0;
  // Waits for every queued op (a no-op where ops are synchronous).
  virtual Status synchronize() = 0;

  // Standard-normal noise scaled by `scale`, from a counter-based generator: the same
  // (seed, counter) draws the same uniform bits on every backend; the normals agree within a
  // few ulp (the device's logf/sinf/cosf are not glibc's), so noisy routing near a tie may
  // differ between a CPU and a GPU run.
  virtual Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) = 0;
  virtual Status gate_forward(const GateForwardArgs& a) = 0;
  virtual Status locations(const LocationsArgs& a) = 0;
  virtual Status slot_map(const SlotMapArgs& a) = 0;
  virtual Status encode(const EncodeArgs& a) = 0;
  virtual Status decode(const DecodeArgs& a) = 0;

  // Bytes of workspace the expert ops need for this shape and matmul dtype (bf16: room to
  // convert the operands that come without a bf16 copy).
  virtual size_t expert_workspace_bytes(const ExpertShape& shape, DType matmul_dtype) const = 0;
  virtual Status expert_forward(const ExpertForwardArgs& a) = 0;
  virtual Status expert_backward(const ExpertBackwardArgs& a) = 0;

  virtual Status decode_backward(const DecodeBackwardArgs& a) = 0;
  virtual Status encode_backward(const EncodeBackwardArgs& a) = 0;
  virtual Status gate_backward(const GateBackwardArgs& a) = 0;

  virtual Status sgd_step(const SgdArgs& a) = 0;
  virtual Status adamw_step(const AdamWArgs& a) = 0;

  // dst = src element by element, f32 → bf16 with round-to-nearest-even: the conversion the
  // bf16 matmuls apply to their operands, so a weight copy made here gives the same bits as
  // converting on the fly (NaN stays NaN; its payload is the backend's). dst must pass
  // check_bf16_copy(src, dst). Queued like the other ops.
  virtual Status convert(TensorView src, TensorView dst) = 0;

  // Small f32 ops for code above the layer ops that must not touch device memory from the host
  // (graphs::ExpertParallelLayer: the shard sums, fc2 bias slices and their gradients of an
  // expert sharded along H). Views are contiguous; each op checks its shapes (check_add,
  // check_column_slice) and is queued like the others.
  //
  // dst[i] += src[i] elementwise; same shape, and dst must not partially overlap src.
  virtual Status add(TensorView dst, TensorView src) = 0;
  // out[r, column + c] += bias[c] for out [R, O], bias [n], column + n <= O: a bias that covers
  // only some of out's columns (a shard's slice of the fc2 bias).
  virtual Status add_row_bias(TensorView out, TensorView bias, int64_t column) = 0;
  // dst[c] += Σ_r src[r, column + c] for src [R, O], dst [n], column + n <= O: the gradient of
  // add_row_bias's bias. Summed in a fixed order, so no result depends on the thread count or
  // the launch configuration; the CPU backend adds row after row into dst[c] itself (the
  // host loop's order, bit for bit), the CUDA backend sums fixed blocks of rows, as its bias
  // gradients.
  virtual Status add_column_sums(TensorView src, int64_t column, TensorView dst) = 0;

  // Two f32 ops for the parameter gradients as a whole (a layer's gradient norm, clipping), on
  // the device like the others, so a group can all-reduce the result where it lies.
  // dst[0] += Σ_i src[i]², in a fixed order (fixed blocks, then the blocks in order: no result
  // depends on the thread count or the launch), in double past a few terms (the CPU gathers 8
  // squares per f32 lane first; CUDA is double throughout), added to dst in f32.
  virtual Status add_sum_squares(TensorView src, TensorView dst) = 0;
  // t[i] *= factor.
  virtual Status scale(TensorView t, float factor) = 0;

  // (optional) Memory of this device that other processes of this host can map (zero-copy
  // submission): at least `bytes` (buffer.bytes() says how much: whole pages, or 2 MiB on CUDA,
  // since an export shares its whole allocation), zeroed, never recycled into allocate()'s
  // memory (what another process may still map must never hold this process's later data).
  // Freed like allocate()'s; see MemoryExport::keep_until_exit.
  virtual Result<ShareableBuffer> allocate_shareable(size_t bytes) {
    return Status::Unimplemented("the " + std::string(name()) + " backend cannot share its memory with other processes");
  }
  // (optional) The other process is done with allocate_shareable()'s buffer at `data` (it
  // unmapped it, or is gone): memory it could still hold at this process's charge (a memfd's
  // pages) is freed now, whoever keeps the export; its mappings then read zeros. Memory the
  // other process cannot keep past the free does nothing here.
  virtual void discard_shareable(void* /*data*/) {}

  // (optional) Registers host memory [data, data + bytes) for fast transfers (page-locked, so
  // copies to and from it run by DMA) until unregister_host(data). The range must stay mapped
  // meanwhile. Nothing to do where this backend's memory is host memory. A failure only means
  // copies of that range take the slower path.
  virtual Status register_host(void* data, size_t bytes) { return Status::OK(); }
  // (optional) Undoes register_host(data, ...).
  virtual Status unregister_host(void* data) { return Status::OK(); }

  // (optional) The native queue every op is issued on (cudaStream_t on CUDA), so graphs/ can
  // capture a step into a CUDA graph; null where ops run synchronously on the calling thread.
  virtual void* native_stream() const { return nullptr; }
  // (optional) Changes whenever memory the backend owns and its ops use internally (scratch)
  // moves: a captured graph that baked the old address must be captured again.
  virtual uint64_t scratch_epoch() const { return 0; }
  // (optional) While native_stream() is being captured, a backend may leave work that nothing
  // after it needs off the graph's critical path (CUDA: the gate loss, a branch that the rest of
  // the step does not wait for). Its own ops join it where they need it; code that reads, on the
  // native stream directly, what a Backend op wrote (a captured device-to-host copy of l_aux)
  // calls this first.
  virtual Status join_forked_work() { return Status::OK(); }
  // (optional) OK while this backend's device can still run work; once it cannot, why (as
  // Unavailable), for good: on CUDA a sticky error (an illegal address, an uncorrectable ECC
  // error, a trap) destroys the process's context on the device, and every later call fails
  // the same way. Ops report such an error as they meet it; their caller asks here after a
  // failure, to tell a device that is lost from an op that failed (the daemon then takes the
  // device out of service). Cheap; one thread at a time, like the ops. Never fails on the CPU.
  virtual Status device_health() { return Status::OK(); }
};

struct BackendOptions {
  int threads = 0;        // CPU: worker threads (0 = all cores)
  int device_index = 0;   // CUDA: which device
  // CUDA: the expert GEMMs add their bias (and ReLU) in cuBLASLt's epilogue, where cuBLASLt
  // offers an algorithm for it, instead of in a pass of their own. Off only to compare the two.
  bool fused_epilogues = true;
};

// The registry: "cpu" always, "cuda" when built with CUDA and a device is present.
Result<std::unique_ptr<Backend>> make_backend(std::string_view name, const BackendOptions& options);
std::vector<std::string> available_backends();

}  // namespace tutel
