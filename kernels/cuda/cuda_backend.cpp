// The host half of the CUDA backend: memory, cuBLAS, and the composition of each Backend op
// from the kernels in *.cu (declared in cuda_kernels.hpp).
#include "cuda/cuda_backend.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/cuda_kernels.hpp"
#include "cuda/device_pool.hpp"
#include "cuda/elementwise_ops.hpp"
#include "cuda/lt_gemm.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::cuda {
namespace {

constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;  // NVIDIA's advice for Hopper
constexpr size_t kMaxCachedBytes = size_t{2} << 30;
constexpr int64_t kBf16Align = 128;  // elements: each bf16 operand starts 256-byte aligned

// One operand of a row-major GEMM: `data` holds `batch` matrices `stride` elements apart, each
// with row stride `ld`; `trans` uses the stored matrix transposed. `elems` is how many floats
// the whole operand spans (what the bf16 path converts). `bf16`, when not null, is the same
// operand already in bf16 (a weight's copy, ExpertWeights): the bf16 path reads it as it is.
// `data` is null for an operand that exists in bf16 only (bf16 dispatched rows): only a bf16
// GEMM may take it.
struct Operand {
  const float* data;
  int64_t ld, stride;
  bool trans;
  int64_t elems;
  const void* bf16 = nullptr;
};

// The dispatched tokens [E, C, M] as a GEMM operand: bf16 ones (encode's bf16 output) are read
// as they are, as a weight's bf16 copy is; f32 ones are converted under bf16 matmuls.
Operand dispatched_operand(const TensorView& dispatched, int64_t E, int64_t C, int64_t M) {
  if (dispatched.dtype() == DType::kBF16) return {nullptr, M, C * M, false, E * C * M, dispatched.data()};
  return {dispatched.data_as<float>(), M, C * M, false, E * C * M};
}

// What an expert GEMM adds in cuBLASLt's epilogue (CudaBackend::fused_gemm): `bias` (f32, one
// vector per batch, `bias_stride` elements apart) to every row of the row-major output, then
// ReLU when asked. With `out_bf16`, the output is bf16 there instead of f32 in c.
struct Epilogue {
  const float* bias = nullptr;
  int64_t bias_stride = 0;
  bool relu = false;
  void* out_bf16 = nullptr;
};

// The caller's bf16 workspace holds two operand rooms of `elems` bf16 each: gemm converts its
// first operand into `first`, its second into `second`.
struct Bf16Rooms {
  char* first;
  char* second;
  int64_t elems;
};

Bf16Rooms bf16_rooms(const TensorView& workspace) {
  const int64_t half = static_cast<int64_t>(workspace.nbytes() / 2 / 2) / kBf16Align * kBf16Align;
  auto* first = static_cast<char*>(workspace.data());
  return {first, first ? first + half * 2 : nullptr, half};
}

Status workspace_too_small() {
  return Status::InvalidArgument(
      "expert workspace too small for the bf16 matmul; size it with "
      "expert_workspace_bytes() (weights_bf16 only when both weights come with bf16 copies)");
}

bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v < 0 || v > INT_MAX) return false;
  return true;
}

// Page-locked host ranges, for the whole process: registration is per address range, not per
// device (cudaHostRegisterPortable makes it count for every device), yet every rank's backend
// registers the same session arenas. The first registration of a range pins it; the last
// unregistration unpins it.
struct HostRange {
  size_t bytes = 0;
  int refs = 0;
  bool owned = false;  // false: pinned by someone else before us; not ours to unpin
};
std::mutex& host_ranges_mutex() {
  static std::mutex m;
  return m;
}
std::map<const void*, HostRange>& host_ranges() {  // guarded by host_ranges_mutex()
  static std::map<const void*, HostRange> ranges;
  return ranges;
}

std::string address_of(const void* p) {
  std::ostringstream o;
  o << p;
  return o.str();
}

ActKind act_kind(Activation a) {
  switch (a) {
    case Activation::kRelu: return ActKind::kRelu;
    case Activation::kGelu: return ActKind::kGelu;
    case Activation::kSilu: return ActKind::kSilu;
  }
  return ActKind::kRelu;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, bool fused_epilogues) : device_(device), fused_epilogues_(fused_epilogues) {}
  ~CudaBackend() override;

  Status init();

  std::string_view name() const override { return "cuda"; }
  Device device() const override { return {DeviceKind::kCuda, device_}; }
  std::string describe() const override { return description_; }

  Result<DeviceBuffer> allocate(size_t bytes) override;
  void release(void* data, size_t bytes) override;
  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override;
  Status fill_zero(TensorView t) override;
  Status synchronize() override;
  Status convert(TensorView src, TensorView dst) override;
  // The small f32 ops live in elementwise_ops.cpp.
  Status add(TensorView dst, TensorView src) override {
    TUTEL_RETURN_IF_ERROR(enter_op());
    return cuda::add(dst, src, stream_);
  }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    TUTEL_RETURN_IF_ERROR(enter_op());
    return cuda::add_row_bias(out, bias, column, stream_);
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(enter_op());
    return cuda::add_column_sums(src, column, dst, [this](size_t n) { return scratch(n); }, stream_);
  }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(enter_op());
    return cuda::add_sum_squares(src, dst, [this](size_t n) { return scratch(n); }, stream_);
  }
  Status scale(TensorView t, float factor) override {
    TUTEL_RETURN_IF_ERROR(enter_op());
    return cuda::scale(t, factor, stream_);
  }
  Result<ShareableBuffer> allocate_shareable(size_t bytes) override;
  Status register_host(void* data, size_t bytes) override;
  Status unregister_host(void* data) override;

  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override;
  Status gate_forward(const GateForwardArgs& a) override;
  Status locations(const LocationsArgs& a) override;
  Status slot_map(const SlotMapArgs& a) override;
  Status encode(const EncodeArgs& a) override;
  Status decode(const DecodeArgs& a) override;
  size_t expert_workspace_bytes(const ExpertShape& s, DType matmul_dtype) const override;
  Status expert_forward(const ExpertForwardArgs& a) override;
  Status expert_backward(const ExpertBackwardArgs& a) override;
  Status decode_backward(const DecodeBackwardArgs& a) override;
  Status encode_backward(const EncodeBackwardArgs& a) override;
  Status gate_backward(const GateBackwardArgs& a) override;
  Status sgd_step(const SgdArgs& a) override;
  Status adamw_step(const AdamWArgs& a) override;
  void* native_stream() const override { return stream_; }
  uint64_t scratch_epoch() const override { return scratch_epoch_; }
  Status join_forked_work() override;
  Status device_health() override;

 private:
  // Makes this backend's device current on the calling thread (executors may change threads).
  Status activate();
  // activate() for an op that may read or overwrite what forked work writes: joins it first.
  // Only the forward ops that follow the gate (locations, slot_map, encode, expert_forward,
  // decode) call activate() alone, and so run beside the gate loss inside a graph.
  Status enter_op() {
    TUTEL_RETURN_IF_ERROR(activate());
    return join_forked_work();
  }
  // stream_'s capture: whether it is capturing, which capture, and (with_nodes) the nodes the
  // next captured node will depend on. Ask for the nodes only after our own kernels: the query
  // fails (cudaErrorLossyQuery) where a dependency carries edge data, as a library's may.
  struct CaptureDeps {
    bool capturing = false;
    unsigned long long id = 0;
    std::vector<cudaGraphNode_t> nodes;
  };
  Result<CaptureDeps> capture_deps(bool with_nodes);
  // The gate loss's scratch, apart from scratch_ so that the loss may run beside later ops.
  Result<void*> loss_scratch(size_t bytes);
  Result<void*> grow(DeviceBuffer& buffer, size_t bytes, size_t step);
  // Backend-owned scratch for the ops' reductions and sorts: grows, never shrinks. Reuse across
  // ops is safe because every op runs on the one stream.
  Result<void*> scratch(size_t bytes);
  // What cuBLAS reads for a GEMM's two operands: bf16 copies, rooms of the workspace to convert
  // into, or the f32 data itself.
  struct GemmInputs {
    const void* a;
    const void* b;
    cudaDataType type;
  };
  Result<GemmInputs> gemm_inputs(int64_t rows, int64_t cols, int64_t inner, const Operand& a, const Operand& b,
                                 int64_t ldc, int64_t batch, DType matmul_dtype, const TensorView& workspace) const;
  Status convert_gemm_inputs(const GemmInputs& in, const Operand& a, const Operand& b);
  Status gemm(int64_t rows, int64_t cols, int64_t inner, const Operand& a, const Operand& b, float* c,
              int64_t ldc, int64_t stride_c, int64_t batch, float beta, DType matmul_dtype,
              const TensorView& workspace);
  Result<bool> fused_gemm(int64_t rows, int64_t cols, int64_t inner, const Operand& a, const Operand& b, float* c,
                          int64_t ldc, int64_t stride_c, int64_t batch, DType matmul_dtype,
                          const TensorView& workspace, const Epilogue& ep);

  int device_;
  bool fused_epilogues_;
  std::string description_ = "cuda";  // init(): the device's model, architecture and SMs
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::unique_ptr<LtGemm> lt_;  // null when fused epilogues are off
  std::unique_ptr<DevicePool> pool_;
  DeviceBuffer scratch_, loss_scratch_, cublas_workspace_;
  // Leaves of the capture `forked_capture_` that the next captured op does not wait for (the
  // gate loss, gate_forward); join_forked_work() makes it wait.
  std::vector<cudaGraphNode_t> forked_;
  unsigned long long forked_capture_ = 0;
  uint64_t scratch_epoch_ = 0;  // bumped when a scratch buffer moves (captured graphs hold its address)
  std::set<const void*> registered_host_;  // register_host() ranges not yet unregistered
  // allocate_shareable()'s blocks: their own cudaMalloc each (an IPC handle exports a whole
  // allocation), cudaFree'd on release, never cached by the pool. Locked because a buffer may be
  // freed from a thread other than the one running ops (a client's region closes on the event
  // loop).
  std::mutex shareable_mutex_;
  std::set<void*> shareable_;
};

CudaBackend::~CudaBackend() {
  if (stream_) {
    (void)cudaSetDevice(device_);
    (void)cudaStreamSynchronize(stream_);
  }
  // Registrations the owner forgot: our share of them goes, the pages stay pinned while another
  // backend still holds the range.
  while (!registered_host_.empty())
    (void)unregister_host(const_cast<void*>(*registered_host_.begin()));
  // Buffers owned here go back to the pool while `this` is still whole.
  scratch_.reset();
  loss_scratch_.reset();
  lt_.reset();
  cublas_workspace_.reset();
  if (cublas_) cublasDestroy(cublas_);
  pool_.reset();
  if (stream_) (void)cudaStreamDestroy(stream_);
}

Status CudaBackend::init() {
  TUTEL_CUDA_CHECK(cudaSetDevice(device_));
  cudaDeviceProp prop{};
  TUTEL_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  description_ = std::string("cuda: ") + prop.name + ", sm_" + std::to_string(prop.major) +
                 std::to_string(prop.minor) + ", " + std::to_string(prop.multiProcessorCount) + " SMs";
  TUTEL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  pool_ = std::make_unique<DevicePool>(device_, stream_, kMaxCachedBytes);
  TUTEL_CUBLAS_CHECK(cublasCreate(&cublas_));
  TUTEL_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // A workspace of our own keeps cuBLAS from allocating inside a CUDA graph capture.
  TUTEL_ASSIGN_OR_RETURN(cublas_workspace_, allocate(kCublasWorkspaceBytes));
  TUTEL_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.data(), kCublasWorkspaceBytes));
  if (fused_epilogues_) {
    // cuBLAS and cuBLASLt share the workspace: both run only on stream_, one call at a time.
    lt_ = std::make_unique<LtGemm>();
    if (Status st = lt_->init(cublas_workspace_.data(), kCublasWorkspaceBytes); !st.ok()) {
      TUTEL_LOG(WARN) << "cuda:" << device_ << ": " << st << "; the expert GEMMs' epilogues run as passes of their own";
      lt_.reset();
    }
  }
  return Status::OK();
}

Status CudaBackend::activate() {
  int current = -1;
  TUTEL_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device_) TUTEL_CUDA_CHECK(cudaSetDevice(device_));
  return Status::OK();
}

// Grows in whole steps (never shrinks): each move makes every captured graph of this backend
// stale (scratch_epoch), so it should move seldom.
Result<void*> CudaBackend::grow(DeviceBuffer& buffer, size_t bytes, size_t step) {
  if (buffer.data() && buffer.bytes() >= bytes) return buffer.data();
  buffer.reset();
  ++scratch_epoch_;
  TUTEL_ASSIGN_OR_RETURN(buffer, allocate((std::max<size_t>(bytes, 1) + step - 1) / step * step));
  return buffer.data();
}

Result<void*> CudaBackend::scratch(size_t bytes) { return grow(scratch_, bytes, size_t{1} << 20); }

Result<void*> CudaBackend::loss_scratch(size_t bytes) { return grow(loss_scratch_, bytes, size_t{1} << 16); }

// The capture API as CUDA 13 names it; 12.3 to 12.9 had the same calls under versioned names.
#if CUDART_VERSION >= 13000
#define TUTEL_GET_CAPTURE_INFO cudaStreamGetCaptureInfo
#define TUTEL_UPDATE_CAPTURE_DEPS cudaStreamUpdateCaptureDependencies
#else
#define TUTEL_GET_CAPTURE_INFO cudaStreamGetCaptureInfo_v3
#define TUTEL_UPDATE_CAPTURE_DEPS cudaStreamUpdateCaptureDependencies_v2
#endif

Result<CudaBackend::CaptureDeps> CudaBackend::capture_deps(bool with_nodes) {
  CaptureDeps out;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* nodes = nullptr;
  size_t count = 0;
  TUTEL_CUDA_CHECK(TUTEL_GET_CAPTURE_INFO(stream_, &status, &out.id, nullptr, with_nodes ? &nodes : nullptr,
                                          nullptr, with_nodes ? &count : nullptr));
  out.capturing = status == cudaStreamCaptureStatusActive;
  if (out.capturing && count > 0) out.nodes.assign(nodes, nodes + count);  // valid until the next call
  return out;
}

Status CudaBackend::join_forked_work() {
  if (forked_.empty()) return Status::OK();
  const std::vector<cudaGraphNode_t> forked = std::move(forked_);
  forked_.clear();
  TUTEL_ASSIGN_OR_RETURN(const CaptureDeps now, capture_deps(/*with_nodes=*/false));
  // Outside that capture there is nothing to join: its graph ends only when all its nodes have.
  if (!now.capturing || now.id != forked_capture_) return Status::OK();
  TUTEL_CUDA_CHECK(TUTEL_UPDATE_CAPTURE_DEPS(stream_, const_cast<cudaGraphNode_t*>(forked.data()), nullptr,
                                             forked.size(), cudaStreamAddCaptureDependencies));
  return Status::OK();
}

Result<DeviceBuffer> CudaBackend::allocate(size_t bytes) {
  TUTEL_RETURN_IF_ERROR(activate());
  TUTEL_ASSIGN_OR_RETURN(void* p, pool_->allocate(bytes));
  return DeviceBuffer(this, p, bytes);
}

void CudaBackend::release(void* data, size_t bytes) {
  // Buffers are dropped on any thread (a shareable region on the event loop): that thread's
  // current device is put back as it was.
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) (void)cudaGetLastError();
  struct Restore {
    int device, previous;
    ~Restore() {
      if (previous >= 0 && previous != device) (void)cudaSetDevice(previous);
    }
  } restore{device_, previous};
  (void)activate();
  {
    std::lock_guard lock(shareable_mutex_);
    if (shareable_.erase(data)) {
      // Only once no other process maps it (MemoryExport::keep_until_exit: the owner's call).
      (void)cudaFree(data);
      return;
    }
  }
  pool_->release(data, bytes);
}

Result<ShareableBuffer> CudaBackend::allocate_shareable(size_t bytes) {
  if (bytes == 0) return Status::InvalidArgument("shared device memory must not be empty");
  // An IPC handle shares the whole underlying allocation, and the driver may place small
  // cudaMalloc blocks (the pool's) in one: a region of whole 2 MiB units is an allocation of its
  // own, so its importer sees nothing else (CUDA programming guide, interprocess communication).
  constexpr size_t kUnit = size_t{2} << 20;
  if (bytes > (size_t{1} << 46)) return Status::InvalidArgument("shared device memory of " + std::to_string(bytes) + " bytes is too large");
  const size_t size = (bytes + kUnit - 1) / kUnit * kUnit;
  TUTEL_RETURN_IF_ERROR(activate());
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, size);
  if (err == cudaErrorMemoryAllocation) {
    // The pools' caches of freed blocks may hold what is missing (it bypasses them).
    (void)cudaGetLastError();
    pool_->trim_device();
    err = cudaMalloc(&p, size);
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Status::ResourceExhausted("cannot allocate " + std::to_string(size) + " bytes of shared memory on cuda:" +
                                     std::to_string(device_) + ": " + cudaGetErrorString(err));
  }
  ShareableBuffer out;
  out.buffer = DeviceBuffer(this, p, size);  // from here on, freed through release()
  {
    std::lock_guard lock(shareable_mutex_);
    shareable_.insert(p);
  }
  // cudaMalloc hands back memory this process freed before, possibly another tenant's data.
  TUTEL_CUDA_CHECK(cudaMemsetAsync(p, 0, size, stream_));
  TUTEL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  cudaIpcMemHandle_t handle;
  TUTEL_CUDA_CHECK(cudaIpcGetMemHandle(&handle, p));
  char bus_id[32] = {};
  TUTEL_CUDA_CHECK(cudaDeviceGetPCIBusId(bus_id, sizeof bus_id, device_));
  out.exported.kind = "cuda_ipc";
  out.exported.handle.assign(reinterpret_cast<const char*>(&handle), sizeof handle);
  out.exported.device_id = bus_id;
  out.exported.keep_until_exit = true;
  return out;
}

// Host-to-device copies from pageable memory may be reused once this returns (the runtime
// stages them); from pinned memory, keep the source unchanged until synchronize().
Status CudaBackend::copy(void* dst, const void* src, size_t bytes, CopyKind kind) {
  if (bytes == 0) return Status::OK();
  TUTEL_RETURN_IF_ERROR(enter_op());
  cudaMemcpyKind k = cudaMemcpyDeviceToDevice;
  if (kind == CopyKind::kHostToDevice) k = cudaMemcpyHostToDevice;
  if (kind == CopyKind::kDeviceToHost) k = cudaMemcpyDeviceToHost;
  TUTEL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, stream_));
  if (kind == CopyKind::kDeviceToHost) TUTEL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return Status::OK();
}

Status CudaBackend::fill_zero(TensorView t) {
  if (t.nbytes() == 0) return Status::OK();
  TUTEL_RETURN_IF_ERROR(enter_op());
  TUTEL_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), stream_));
  return Status::OK();
}

Status CudaBackend::synchronize() {
  TUTEL_RETURN_IF_ERROR(enter_op());
  TUTEL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return Status::OK();
}

Status CudaBackend::device_health() {
  // After a sticky error every call returns it; otherwise these read a status and wait for
  // nothing. A stream being captured is not queried (the query would invalidate the capture).
  cudaError_t err = cudaSetDevice(device_);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (err == cudaSuccess) err = cudaStreamIsCapturing(stream_, &capture);
  if (err == cudaSuccess && capture == cudaStreamCaptureStatusNone) err = cudaStreamQuery(stream_);
  if (err == cudaSuccess || err == cudaErrorNotReady) return Status::OK();
  if (!cuda::is_sticky(err)) {
    (void)cudaGetLastError();  // not this device's loss: leave no error for the next launch
    return Status::OK();
  }
  return Status::Unavailable("CUDA device " + std::to_string(device_) + " is lost: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) +
                             "); this process can run nothing more on it: restart the process (the device may "
                             "need a reset, see nvidia-smi)");
}

Status CudaBackend::convert(TensorView src, TensorView dst) {
  TUTEL_RETURN_IF_ERROR(check_bf16_copy(src, dst, "convert's dst"));
  TUTEL_RETURN_IF_ERROR(enter_op());
  TUTEL_CUDA_CHECK(launch_to_bf16(src.data_as<float>(), src.numel(), dst.data(), stream_));
  return Status::OK();
}

Status CudaBackend::register_host(void* data, size_t bytes) {
  if (data == nullptr || bytes == 0)
    return Status::InvalidArgument("register_host: the host range is empty");
  if (registered_host_.count(data))
    return Status::AlreadyExists("host memory at " + address_of(data) +
                                 " is already registered with cuda:" + std::to_string(device_));
  TUTEL_RETURN_IF_ERROR(activate());
  std::lock_guard lock(host_ranges_mutex());
  auto& ranges = host_ranges();
  if (auto it = ranges.find(data); it != ranges.end()) {
    if (it->second.bytes != bytes)
      return Status::InvalidArgument("host memory at " + address_of(data) + " is registered with " +
                                     std::to_string(it->second.bytes) + " bytes, not " +
                                     std::to_string(bytes));
    ++it->second.refs;
  } else {
    const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
    bool owned = true;
    if (err == cudaErrorHostMemoryAlreadyRegistered) {
      // Pinned by other code in this process: usable for DMA as it is.
      owned = false;
    } else if (err != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it so no later call reports it
      return cuda_error(err, "cudaHostRegister(data, bytes, cudaHostRegisterPortable)", __FILE__,
                        __LINE__);
    }
    (void)cudaGetLastError();
    ranges.emplace(data, HostRange{bytes, 1, owned});
  }
  registered_host_.insert(data);
  return Status::OK();
}

Status CudaBackend::unregister_host(void* data) {
  if (!registered_host_.count(data))
    return Status::NotFound("host memory at " + address_of(data) +
                            " is not registered with cuda:" + std::to_string(device_));
  registered_host_.erase(data);
  // Copies queued from or to the range must finish before its pages may move. Our share of the
  // range goes even when that fails (a lost device copies nothing any more).
  Status st = activate();
  if (st.ok())
    if (const cudaError_t err = cudaStreamSynchronize(stream_); err != cudaSuccess)
      st = cuda_error(err, "cudaStreamSynchronize(stream_)", __FILE__, __LINE__);
  std::lock_guard lock(host_ranges_mutex());
  auto& ranges = host_ranges();
  auto it = ranges.find(data);
  if (it == ranges.end() || --it->second.refs > 0) return st;
  const bool owned = it->second.owned;
  ranges.erase(it);
  if (owned)
    if (const cudaError_t err = cudaHostUnregister(data); err != cudaSuccess && st.ok())
      st = cuda_error(err, "cudaHostUnregister(data)", __FILE__, __LINE__);
  return st;
}

// Row-major GEMM on column-major cuBLAS, derived once:
//   a row-major matrix X (r × c, row stride ld) is, byte for byte, the column-major matrix Xᵀ
//   (c × r, leading dimension ld). So the row-major product C = op(A)·op(B) (rows × cols, inner
//   dimension `inner`) is computed as the column-major product Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS gets
//   B first and A second, m = cols, n = rows, k = inner. For an operand stored untransposed,
//   its column-major view already is op(X)ᵀ (cuBLAS op N); for one used transposed, the view is
//   op(X) itself and cuBLAS must transpose it (op T). Leading dimensions are the row strides.
// With bf16, each operand without a bf16 copy is converted into its half of the caller's
// workspace first; accumulation and the output stay f32 (CUBLAS_COMPUTE_32F).
Result<CudaBackend::GemmInputs> CudaBackend::gemm_inputs(int64_t rows, int64_t cols, int64_t inner, const Operand& a,
                                                         const Operand& b, int64_t ldc, int64_t batch,
                                                         DType matmul_dtype, const TensorView& workspace) const {
  if (!fits_int({rows, cols, inner, a.ld, b.ld, ldc, batch}))
    return Status::InvalidArgument("matrix dimension beyond 2^31 for cuBLAS: " + std::to_string(rows) + " x " +
                                   std::to_string(cols) + " x " + std::to_string(inner));
  GemmInputs in{a.data, b.data, CUDA_R_32F};
  if (matmul_dtype != DType::kBF16 && (!a.data || !b.data))
    return Status::Internal("an operand held in bf16 only reached an f32 GEMM (check_dispatched first)");
  if (matmul_dtype == DType::kBF16) {
    const Bf16Rooms rooms = bf16_rooms(workspace);
    auto needs_room = [&](const Operand& x) { return !x.bf16 && (workspace.empty() || x.elems > rooms.elems); };
    if (needs_room(a) || needs_room(b)) return workspace_too_small();
    in.a = a.bf16 ? a.bf16 : rooms.first;
    in.b = b.bf16 ? b.bf16 : rooms.second;
    in.type = CUDA_R_16BF;
  } else if (matmul_dtype != DType::kF32) {
    return Status::InvalidArgument("matmul dtype " + std::string(dtype_name(matmul_dtype)) +
                                   " is not supported by the cuda backend; use f32 or bf16");
  }
  return in;
}

Status CudaBackend::convert_gemm_inputs(const GemmInputs& in, const Operand& a, const Operand& b) {
  if (in.type != CUDA_R_16BF) return Status::OK();
  if (!a.bf16) TUTEL_CUDA_CHECK(launch_to_bf16(a.data, a.elems, const_cast<void*>(in.a), stream_));
  if (!b.bf16) TUTEL_CUDA_CHECK(launch_to_bf16(b.data, b.elems, const_cast<void*>(in.b), stream_));
  return Status::OK();
}

Status CudaBackend::gemm(int64_t rows, int64_t cols, int64_t inner, const Operand& a, const Operand& b, float* c,
                         int64_t ldc, int64_t stride_c, int64_t batch, float beta, DType matmul_dtype,
                         const TensorView& workspace) {
  TUTEL_ASSIGN_OR_RETURN(const GemmInputs in, gemm_inputs(rows, cols, inner, a, b, ldc, batch, matmul_dtype, workspace));
  TUTEL_RETURN_IF_ERROR(convert_gemm_inputs(in, a, b));
  const float alpha = 1.f;
  TUTEL_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      cublas_, b.trans ? CUBLAS_OP_T : CUBLAS_OP_N, a.trans ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(cols),
      static_cast<int>(rows), static_cast<int>(inner), &alpha, in.b, in.type, static_cast<int>(b.ld), b.stride, in.a,
      in.type, static_cast<int>(a.ld), a.stride, &beta, c, CUDA_R_32F, static_cast<int>(ldc), stride_c,
      static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return Status::OK();
}

// gemm (beta 0) with `ep` in cuBLASLt's epilogue, the operands mapped as gemm maps them (so the
// bias, one per output column of the row-major product, is cuBLAS's per-row bias). False, with
// nothing queued, where fused epilogues are off or cuBLASLt has no algorithm for the problem.
Result<bool> CudaBackend::fused_gemm(int64_t rows, int64_t cols, int64_t inner, const Operand& a, const Operand& b,
                                     float* c, int64_t ldc, int64_t stride_c, int64_t batch, DType matmul_dtype,
                                     const TensorView& workspace, const Epilogue& ep) {
  if (!lt_ || (!ep.bias && !ep.relu && !ep.out_bf16)) return false;  // nothing to fuse
  TUTEL_ASSIGN_OR_RETURN(const GemmInputs in, gemm_inputs(rows, cols, inner, a, b, ldc, batch, matmul_dtype, workspace));
  const bool to_bf16 = ep.out_bf16 != nullptr;
  if (to_bf16 && in.type != CUDA_R_16BF) return Status::Internal("fused_gemm: a bf16 output needs bf16 inputs");
  void* d = to_bf16 ? ep.out_bf16 : static_cast<void*>(c);
  const int64_t in_size = in.type == CUDA_R_16BF ? 2 : 4, d_size = to_bf16 ? 2 : 4;
  LtProblem p;
  p.trans_a = b.trans;
  p.trans_b = a.trans;
  p.m = cols;
  p.n = rows;
  p.k = inner;
  p.lda = b.ld;
  p.ldb = a.ld;
  p.ldd = ldc;
  p.stride_a = b.stride;
  p.stride_b = a.stride;
  p.stride_d = stride_c;
  p.batch = batch;
  p.ab_type = in.type;
  p.d_type = to_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  p.bias = ep.bias != nullptr;
  p.bias_stride = ep.bias ? ep.bias_stride : 0;
  p.relu = ep.relu;
  p.align_a = lt_alignment(in.b, {b.stride * in_size});
  p.align_b = lt_alignment(in.a, {a.stride * in_size});
  p.align_d = lt_alignment(d, {stride_c * d_size});
  p.align_bias = ep.bias ? lt_alignment(ep.bias, {p.bias_stride * 4}) : 256;
  // cuBLASLt takes no alignment preference for the bias, so the kernel it picks may read the
  // bias with wide loads whatever the pointer: a bias (or a batch's) off 16 bytes, e.g. fc2's
  // at O = 7, takes the separate pass rather than risk a misaligned access, which is sticky.
  if (p.bias && p.align_bias < 16) return false;
  // Ask first, so a problem cuBLASLt refuses costs no conversion the fallback would redo.
  TUTEL_ASSIGN_OR_RETURN(const bool supported, lt_->supports(p));
  if (!supported) return false;
  TUTEL_RETURN_IF_ERROR(convert_gemm_inputs(in, a, b));
  return lt_->run(p, in.b, in.a, d, ep.bias, stream_);
}

Status CudaBackend::gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  TUTEL_CUDA_CHECK(launch_gate_noise(seed, counter, scale, out.data_as<float>(), out.numel(), stream_));
  return Status::OK();
}

Status CudaBackend::gate_forward(const GateForwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  const int64_t S = a.x.dim(0), M = a.x.dim(1), E = a.gate_weight.dim(0);
  float* scores = a.scores.data_as<float>();
  // logits[S, E] = x[S, M] · wgᵀ
  TUTEL_RETURN_IF_ERROR(gemm(S, E, M, {a.x.data_as<float>(), M, 0, false, S * M},
                             {a.gate_weight.data_as<float>(), M, 0, true, E * M}, scores, E, 0, 1, 0.f,
                             DType::kF32, {}));
  const float* noise = a.noise.empty() ? nullptr : a.noise.data_as<float>();
  TUTEL_CUDA_CHECK(launch_gate_softmax_topk(scores, noise, S, E, a.k, a.normalize_gate,
                                            a.expert_index.data_as<int32_t>(), a.gates.data_as<float>(), stream_));
  // The loss: nothing in a forward reads it on the device. Inside a graph capture it becomes a
  // branch off the softmax node that the rest of the step does not wait for (a graph runs each
  // node once its inputs are ready), so its three nodes leave the step's critical path: the
  // decode step's replay is mostly that path. Anything that may read l_aux or the loss's scratch
  // joins it first (enter_op, join_forked_work); a capture ending without a join is fine, as its
  // graph completes only with all of its nodes. Launched op by op it stays in line, where a fork
  // would cost host time (events) and gain nothing.
  TUTEL_ASSIGN_OR_RETURN(void* s, loss_scratch(gate_loss_scratch_bytes(S, E)));
  // The dependencies here are the softmax kernel's (and after the loss its last kernel's): plain
  // kernel nodes, so asking for them is safe.
  TUTEL_ASSIGN_OR_RETURN(const CaptureDeps before, capture_deps(/*with_nodes=*/true));
  TUTEL_CUDA_CHECK(launch_gate_loss(scores, a.expert_index.data_as<int32_t>(), S, E, a.k, s,
                                    a.l_aux.data_as<float>(), stream_));
  if (before.capturing && !before.nodes.empty()) {
    TUTEL_ASSIGN_OR_RETURN(const CaptureDeps after, capture_deps(/*with_nodes=*/true));
    if (after.nodes != before.nodes) {  // the loss captured nodes of its own (S > 0)
      TUTEL_CUDA_CHECK(TUTEL_UPDATE_CAPTURE_DEPS(stream_, const_cast<cudaGraphNode_t*>(before.nodes.data()), nullptr,
                                                 before.nodes.size(), cudaStreamSetCaptureDependencies));
      forked_.insert(forked_.end(), after.nodes.begin(), after.nodes.end());
      forked_capture_ = after.id;
    }
  }
  return Status::OK();
}

Status CudaBackend::locations(const LocationsArgs& a) {
  TUTEL_RETURN_IF_ERROR(activate());
  const int64_t S = a.expert_index.dim(0), k = a.expert_index.dim(1), E = a.expert_count.dim(0);
  const size_t bytes = locations_scratch_bytes(S, E, static_cast<int>(k), a.batch_prioritized);
  TUTEL_ASSIGN_OR_RETURN(void* s, scratch(bytes));
  const float* scores = a.batch_prioritized ? a.scores.data_as<float>() : nullptr;
  TUTEL_CUDA_CHECK(launch_locations(scores, a.expert_index.data_as<int32_t>(), S, E, static_cast<int>(k),
                                    a.batch_prioritized, s, bytes, a.location.data_as<int32_t>(),
                                    a.expert_count.data_as<int32_t>(), stream_));
  return Status::OK();
}

Status CudaBackend::slot_map(const SlotMapArgs& a) {
  TUTEL_RETURN_IF_ERROR(activate());
  const int64_t E = a.slot_assignment.rank() > 0 ? a.slot_assignment.dim(0) : 0;
  TUTEL_CUDA_CHECK(launch_slot_map(a.expert_index.data_as<int32_t>(), a.location.data_as<int32_t>(),
                                   a.expert_index.numel(), E, a.capacity, a.slot_assignment.data_as<int32_t>(),
                                   stream_));
  return Status::OK();
}

Status CudaBackend::encode(const EncodeArgs& a) {
  TUTEL_RETURN_IF_ERROR(activate());
  const int64_t M = a.x.dim(1), k = a.gates.dim(1);
  if (a.dispatched.dtype() == DType::kBF16) {
    TUTEL_CUDA_CHECK(launch_scatter_rows_to_bf16(a.x.data_as<float>(), a.gates.data_as<float>(),
                                                 a.slot_assignment.data_as<int32_t>(), a.slot_assignment.numel(),
                                                 M, static_cast<int>(k), !a.is_postscore, a.dispatched.data(),
                                                 stream_));
    return Status::OK();
  }
  if (a.dispatched.dtype() != DType::kF32)
    return Status::InvalidArgument("encode: dispatched has dtype " + std::string(dtype_name(a.dispatched.dtype())) +
                                   "; give f32 or bf16");
  TUTEL_CUDA_CHECK(launch_scatter_rows(a.x.data_as<float>(), a.gates.data_as<float>(),
                                       a.slot_assignment.data_as<int32_t>(), a.slot_assignment.numel(), M,
                                       static_cast<int>(k), !a.is_postscore, a.dispatched.data_as<float>(), stream_));
  return Status::OK();
}

Status CudaBackend::decode(const DecodeArgs& a) {
  TUTEL_RETURN_IF_ERROR(activate());
  const int64_t S = a.y.dim(0), O = a.y.dim(1), k = a.gates.dim(1);
  TUTEL_CUDA_CHECK(launch_gather_rows(a.expert_out.data_as<float>(), a.gates.data_as<float>(),
                                      a.expert_index.data_as<int32_t>(), a.location.data_as<int32_t>(), S,
                                      static_cast<int>(k), a.capacity, O, a.is_postscore, a.y.data_as<float>(),
                                      stream_));
  return Status::OK();
}

Status CudaBackend::decode_backward(const DecodeBackwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  const int64_t S = a.dy.dim(0), O = a.dy.dim(1), k = a.gates.dim(1), C = a.slot_assignment.dim(1);
  TUTEL_CUDA_CHECK(launch_scatter_rows(a.dy.data_as<float>(), a.gates.data_as<float>(),
                                       a.slot_assignment.data_as<int32_t>(), a.slot_assignment.numel(), O,
                                       static_cast<int>(k), a.is_postscore, a.d_expert_out.data_as<float>(),
                                       stream_));
  if (a.is_postscore) {
    TUTEL_CUDA_CHECK(launch_assignment_dot(a.expert_out.data_as<float>(), a.dy.data_as<float>(),
                                           a.expert_index.data_as<int32_t>(), a.location.data_as<int32_t>(), S,
                                           static_cast<int>(k), C, O, /*accumulate=*/false,
                                           a.d_gates.data_as<float>(), stream_));
  } else {
    TUTEL_RETURN_IF_ERROR(fill_zero(a.d_gates));
  }
  return Status::OK();
}

Status CudaBackend::encode_backward(const EncodeBackwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  const int64_t S = a.x.dim(0), M = a.x.dim(1), k = a.gates.dim(1);
  TUTEL_CUDA_CHECK(launch_gather_rows(a.d_dispatched.data_as<float>(), a.gates.data_as<float>(),
                                      a.expert_index.data_as<int32_t>(), a.location.data_as<int32_t>(), S,
                                      static_cast<int>(k), a.capacity, M, !a.is_postscore, a.dx.data_as<float>(),
                                      stream_));
  if (!a.is_postscore)
    TUTEL_CUDA_CHECK(launch_assignment_dot(a.d_dispatched.data_as<float>(), a.x.data_as<float>(),
                                           a.expert_index.data_as<int32_t>(), a.location.data_as<int32_t>(), S,
                                           static_cast<int>(k), a.capacity, M, /*accumulate=*/true,
                                           a.d_gates.data_as<float>(), stream_));
  return Status::OK();
}

Status CudaBackend::gate_backward(const GateBackwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  const int64_t S = a.x.dim(0), M = a.x.dim(1), E = a.gate_weight.dim(0), k = a.expert_index.dim(1);
  float* d_logits = a.d_logits.data_as<float>();
  TUTEL_ASSIGN_OR_RETURN(void* s, scratch(gate_backward_scratch_bytes(E)));
  TUTEL_CUDA_CHECK(launch_gate_backward_logits(a.scores.data_as<float>(), a.expert_index.data_as<int32_t>(),
                                               a.d_gates.data_as<float>(), S, E, static_cast<int>(k), a.dl_aux,
                                               a.normalize_gate, s, d_logits, stream_));
  // d_wg[E, M] += d_logitsᵀ · x ; dx[S, M] += d_logits · wg
  TUTEL_RETURN_IF_ERROR(gemm(E, M, S, {d_logits, E, 0, true, S * E}, {a.x.data_as<float>(), M, 0, false, S * M},
                             a.d_gate_weight.data_as<float>(), M, 0, 1, 1.f, DType::kF32, {}));
  TUTEL_RETURN_IF_ERROR(gemm(S, M, E, {d_logits, E, 0, false, S * E},
                             {a.gate_weight.data_as<float>(), M, 0, false, E * M}, a.dx.data_as<float>(), M, 0, 1,
                             1.f, DType::kF32, {}));
  return Status::OK();
}

size_t CudaBackend::expert_workspace_bytes(const ExpertShape& s, DType matmul_dtype) const {
  if (matmul_dtype != DType::kBF16) return 0;
  const int64_t C = s.capacity, M = s.model_dim, H = s.hidden, O = s.output_dim;
  // Two operands at a time: the weight gradients' GEMMs convert two activations even when the
  // weights come in bf16.
  int64_t per_expert = std::max({C * M, C * H, C * O});
  if (!s.weights_bf16) per_expert = std::max({per_expert, H * M, H * O});
  const int64_t per_operand = s.experts * per_expert;
  const int64_t aligned = (per_operand + kBf16Align - 1) / kBf16Align * kBf16Align;
  return static_cast<size_t>(2 * aligned) * 2;  // two bf16 operands
}

Status CudaBackend::expert_forward(const ExpertForwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(activate());
  const int64_t E = a.dispatched.dim(0), C = a.dispatched.dim(1), M = a.dispatched.dim(2);
  const int64_t H = a.weights.fc1_weight.dim(1), O = a.weights.fc2_weight.dim(2);
  if (C == 0) return Status::OK();
  const float* b1 = a.weights.fc1_bias.empty() ? nullptr : a.weights.fc1_bias.data_as<float>();
  const float* b2 = a.weights.fc2_bias.empty() ? nullptr : a.weights.fc2_bias.data_as<float>();
  float* pre = a.pre_activation.empty() ? nullptr : a.pre_activation.data_as<float>();
  float* hidden = a.hidden.data_as<float>();
  float* out = a.expert_out.data_as<float>();
  const ExpertWeights& w = a.weights;
  TUTEL_RETURN_IF_ERROR(check_dispatched(a.dispatched, a.matmul_dtype, "expert_forward:"));
  if (a.matmul_dtype == DType::kBF16) TUTEL_RETURN_IF_ERROR(w.check_bf16_copies("expert_forward:"));
  const ActKind act = act_kind(a.activation);
  const bool bf16 = a.matmul_dtype == DType::kBF16;
  const Operand disp = dispatched_operand(a.dispatched, E, C, M);
  const Operand fc1{w.fc1_weight.data_as<float>(), M, H * M, true, E * H * M, w.fc1_weight_bf16.data()};
  const Operand fc2{w.fc2_weight.data_as<float>(), O, H * O, false, E * H * O, w.fc2_weight_bf16.data()};
  // Under bf16 the second GEMM reads bf16(act(pre)), written by whatever makes act(pre): into the
  // workspace room where that GEMM would convert hidden (the same rounding as that conversion),
  // and the f32 hidden only where a backward reads it. With fused epilogues (lt_gemm.hpp) the
  // first GEMM adds b1 itself, and applies ReLU itself where nothing needs pre.
  void* hidden_bf16 = nullptr;
  if (bf16) {
    const Bf16Rooms rooms = bf16_rooms(a.workspace);
    if (rooms.elems < E * C * H) return workspace_too_small();
    hidden_bf16 = rooms.first;
  }
  float* hidden_out = hidden_bf16 && !a.keep_hidden ? nullptr : hidden;
  bool fused = false;
  if (bf16 && act == ActKind::kRelu && !pre && !hidden_out) {
    // An inference ReLU forward: the GEMM writes bf16(relu(pre)) itself, into the memory of the
    // f32 hidden (scratch here; the first room may be holding the dispatched rows it reads), so
    // nothing passes over [E, C, H] between the GEMMs. At the GPU shape of tutel-bench layer that is 3.8 GB less traffic.
    TUTEL_ASSIGN_OR_RETURN(fused, fused_gemm(C, H, M, disp, fc1, nullptr, H, C * H, E, a.matmul_dtype,
                                             a.workspace, {b1, H, true, hidden}));
    if (fused) hidden_bf16 = hidden;
  }
  if (!fused) {
    // pre[e] = disp[e] · fc1[e]ᵀ + b1[e], into pre where a backward needs it, else into hidden.
    // ReLU goes into the epilogue only where the f32 hidden is wanted: written as relu(pre).
    const bool relu_in_epilogue = act == ActKind::kRelu && !pre && hidden_out;
    float* fc1_out = pre ? pre : hidden;
    TUTEL_ASSIGN_OR_RETURN(fused, fused_gemm(C, H, M, disp, fc1, fc1_out, H, C * H, E, a.matmul_dtype,
                                             a.workspace, {b1, H, relu_in_epilogue, nullptr}));
    if (!fused) {
      TUTEL_RETURN_IF_ERROR(gemm(C, H, M, disp, fc1, fc1_out, H, C * H, E, 0.f, a.matmul_dtype, a.workspace));
      TUTEL_CUDA_CHECK(launch_bias_activation(fc1_out, b1, E, C, H, act, pre, hidden_out, hidden_bf16, stream_));
    } else if (!relu_in_epilogue) {
      TUTEL_CUDA_CHECK(
          launch_bias_activation(fc1_out, nullptr, E, C, H, act, nullptr, hidden_out, hidden_bf16, stream_));
    } else if (hidden_bf16) {
      // hidden = relu(pre) already; the second GEMM's operand is its rounding.
      TUTEL_CUDA_CHECK(launch_to_bf16(hidden, E * C * H, hidden_bf16, stream_));
    }
  }
  // out[e] = hidden[e] · fc2[e] + b2[e]
  const Operand hid{hidden, H, C * H, false, E * C * H, hidden_bf16};
  fused = false;
  if (b2) {
    TUTEL_ASSIGN_OR_RETURN(fused, fused_gemm(C, O, H, hid, fc2, out, O, C * O, E, a.matmul_dtype, a.workspace,
                                             {b2, O, false, nullptr}));
  }
  if (!fused) {
    TUTEL_RETURN_IF_ERROR(gemm(C, O, H, hid, fc2, out, O, C * O, E, 0.f, a.matmul_dtype, a.workspace));
    if (b2)
      TUTEL_CUDA_CHECK(launch_bias_activation(out, b2, E, C, O, ActKind::kNone, nullptr, out, nullptr, stream_));
  }
  return Status::OK();
}

Status CudaBackend::expert_backward(const ExpertBackwardArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  const int64_t E = a.dispatched.dim(0), C = a.dispatched.dim(1), M = a.dispatched.dim(2);
  const int64_t H = a.weights.fc1_weight.dim(1), O = a.weights.fc2_weight.dim(2);
  if (C == 0) return Status::OK();  // no slots: nothing flows to the weights, d_dispatched is empty
  if (a.activation != Activation::kRelu && a.pre_activation.empty())
    return Status::InvalidArgument(std::string(activation_name(a.activation)) +
                                   " backward needs the pre-activation kept by a training forward");
  const float* d_out = a.d_expert_out.data_as<float>();
  const float* hidden = a.hidden.data_as<float>();
  float* d_hidden = a.d_hidden.data_as<float>();
  const DType dt = a.matmul_dtype;
  const ExpertWeights& w = a.weights;
  TUTEL_RETURN_IF_ERROR(check_dispatched(a.dispatched, dt, "expert_backward:"));
  if (dt == DType::kBF16) TUTEL_RETURN_IF_ERROR(w.check_bf16_copies("expert_backward:"));
  const bool bias_grads = !a.grads.fc1_bias.empty() || !a.grads.fc2_bias.empty();
  void* bias_scratch = nullptr;
  if (bias_grads) {
    TUTEL_ASSIGN_OR_RETURN(bias_scratch, scratch(bias_grad_scratch_bytes(E, C, std::max(H, O))));
  }

  // fc2: dW2 += hᵀ·d_out, db2 += Σ_c d_out, d_hidden = d_out·W2ᵀ.
  TUTEL_RETURN_IF_ERROR(gemm(H, O, C, {hidden, H, C * H, true, E * C * H}, {d_out, O, C * O, false, E * C * O},
                             a.grads.fc2_weight.data_as<float>(), O, H * O, E, 1.f, dt, a.workspace));
  if (!a.grads.fc2_bias.empty())
    TUTEL_CUDA_CHECK(launch_bias_grad(d_out, E, C, O, bias_scratch, a.grads.fc2_bias.data_as<float>(), stream_));
  TUTEL_RETURN_IF_ERROR(
      gemm(C, H, O, {d_out, O, C * O, false, E * C * O},
           {w.fc2_weight.data_as<float>(), O, H * O, true, E * H * O, w.fc2_weight_bf16.data()},
           d_hidden, H, C * H, E, 0.f, dt, a.workspace));
  // act': in place, d_hidden becomes d_pre.
  const float* act_input = a.activation == Activation::kRelu ? hidden : a.pre_activation.data_as<float>();
  TUTEL_CUDA_CHECK(launch_activation_backward(act_input, act_kind(a.activation), E * C * H, d_hidden, stream_));
  // fc1: dW1 += d_preᵀ·disp, db1 += Σ_c d_pre, d_disp = d_pre·W1.
  TUTEL_RETURN_IF_ERROR(gemm(H, M, C, {d_hidden, H, C * H, true, E * C * H}, dispatched_operand(a.dispatched, E, C, M),
                             a.grads.fc1_weight.data_as<float>(), M, H * M, E, 1.f, dt, a.workspace));
  if (!a.grads.fc1_bias.empty())
    TUTEL_CUDA_CHECK(launch_bias_grad(d_hidden, E, C, H, bias_scratch, a.grads.fc1_bias.data_as<float>(), stream_));
  return gemm(C, M, H, {d_hidden, H, C * H, false, E * C * H},
              {w.fc1_weight.data_as<float>(), M, H * M, false, E * H * M, w.fc1_weight_bf16.data()},
              a.d_dispatched.data_as<float>(), M, C * M, E, 0.f, dt, a.workspace);
}

Status CudaBackend::sgd_step(const SgdArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  float* buf = a.momentum_buffer.empty() ? nullptr : a.momentum_buffer.data_as<float>();
  if (a.momentum != 0.f && !buf) return Status::InvalidArgument("sgd with momentum needs a momentum buffer");
  if (!a.param_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(a.param, a.param_bf16, "sgd param_bf16"));
  const SgdParams p{a.lr, a.momentum, a.weight_decay, a.nesterov, a.first_step};
  TUTEL_CUDA_CHECK(launch_sgd(a.param.data_as<float>(), a.grad.data_as<float>(), buf,
                              a.param_bf16.data(), a.param.numel(), p, stream_));
  return Status::OK();
}

Status CudaBackend::adamw_step(const AdamWArgs& a) {
  TUTEL_RETURN_IF_ERROR(enter_op());
  if (a.step < 1) return Status::InvalidArgument("adamw step count must be >= 1");
  if (!a.param_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(a.param, a.param_bf16, "adamw param_bf16"));
  // PyTorch's AdamW: decoupled decay, bias corrections folded into the step size (as the CPU).
  const double bc1 = 1.0 - std::pow(a.beta1, double(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, double(a.step));
  const AdamWParams p{static_cast<float>(a.beta1),
                      static_cast<float>(1.0 - a.beta1),
                      static_cast<float>(a.beta2),
                      static_cast<float>(1.0 - a.beta2),
                      a.eps,
                      static_cast<float>(a.lr / bc1),
                      static_cast<float>(std::sqrt(bc2)),
                      1.f - a.lr * a.weight_decay};
  TUTEL_CUDA_CHECK(launch_adamw(a.param.data_as<float>(), a.grad.data_as<float>(),
                                a.exp_avg.data_as<float>(), a.exp_avg_sq.data_as<float>(),
                                a.param_bf16.data(), a.param.numel(), p, stream_));
  return Status::OK();
}

std::string runtime_reason(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options) {
  if (options.device_index < 0)
    return Status::InvalidArgument("device_index = " + std::to_string(options.device_index) + " must be >= 0");
  int count = 0;
  if (const cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    (void)cudaGetLastError();
    return Status::Unavailable("cuda backend: no usable CUDA device (" + runtime_reason(err) +
                               "); run on a machine with an NVIDIA GPU and its driver, or use the 'cpu' backend");
  }
  if (count == 0)
    return Status::Unavailable("cuda backend: the CUDA driver reports no device; use the 'cpu' backend");
  if (options.device_index >= count)
    return Status::InvalidArgument("cuda backend: device_index = " + std::to_string(options.device_index) +
                                   " but this machine has " + std::to_string(count) + " CUDA device(s)");
  auto backend = std::make_unique<CudaBackend>(options.device_index, options.fused_epilogues);
  if (Status s = backend->init(); !s.ok()) return s.with_context("cuda backend on device " +
                                                                  std::to_string(options.device_index));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace tutel::cuda
