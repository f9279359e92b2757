// Backends for testing the daemon's data path without a GPU.
//
// SimulatedDevice wraps the CPU backend and behaves, towards its caller, like a device whose
// memory is not host memory: it reports DeviceKind::kCuda, hands out allocations of its own
// (filled with 0xff bytes, as a device's recycled memory holds garbage), and refuses any op whose
// views point outside those allocations, and any copy whose kind does not match where its
// pointers are. Every refusal is also recorded, so a test can assert there were none.
// With guard_host_access(), its memory is also closed to the host (PROT_NONE) outside its own
// ops and copies, so code that reads or writes it directly faults where it does so.
// CountingCpu forwards everything to the CPU backend and records the copies it is asked for.
//
// Thread-safety: like any Backend, one thread at a time.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::daemon::testing {

struct CopyRecord {
  const void* dst;
  const void* src;
  size_t bytes;
  CopyKind kind;
  bool host_side_registered;  // the host end lies in a register_host() range
};

inline bool overlaps(const void* p, size_t n, const void* q, size_t m) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + m && b < a + n;
}

class SimulatedDevice final : public Backend {
 public:
  explicit SimulatedDevice(std::unique_ptr<Backend> cpu) : cpu_(std::move(cpu)) {}
  ~SimulatedDevice() override {
    for (auto& [p, bytes] : allocations_) free_memory(reinterpret_cast<void*>(p), bytes);
  }

  // From now on (call it before the first allocation) the device's memory is whole pages of
  // its own, inaccessible to the host (mprotect PROT_NONE) except inside an Access: during this
  // device's ops and copies, and wherever a test opens one, e.g. around the collectives of a
  // communicator that carries this memory (as NCCL reads a GPU's). A host access elsewhere
  // faults (SIGSEGV) at the offending line.
  void guard_host_access() {
    if (!allocations_.empty()) (void)violation("guard_host_access() after the first allocation");
    guarded_ = true;
  }
  // While one lives (they nest), the memory is open to the host.
  class Access {
   public:
    explicit Access(SimulatedDevice& d) : d_(d) {
      if (d_.guarded_ && d_.open_++ == 0) d_.protect_all(PROT_READ | PROT_WRITE);
    }
    ~Access() {
      if (d_.guarded_ && --d_.open_ == 0) d_.protect_all(PROT_NONE);
    }
    Access(const Access&) = delete;
    Access& operator=(const Access&) = delete;

   private:
    SimulatedDevice& d_;
  };

  const std::vector<std::string>& violations() const { return violations_; }
  const std::vector<CopyRecord>& copies() const { return copies_; }
  int64_t allocations() const { return allocation_count_; }
  // register_host() ranges now held: start → bytes.
  const std::map<uintptr_t, size_t>& registered() const { return registered_; }
  // Every register_host() call that succeeded, in order.
  const std::vector<std::pair<const void*, size_t>>& registrations() const {
    return registrations_;
  }
  // Makes register_host() fail, as cudaHostRegister does on a mapping it cannot lock.
  void fail_registration(bool fail) { fail_registration_ = fail; }
  // Refuses allocations that would take the memory it holds past `bytes` (a full device, or a
  // tenant's quota); ~0 lifts the limit.
  void limit_memory(size_t bytes) { memory_limit_ = bytes; }
  // Loses the device, as a sticky CUDA error does: from now on every op, copy, allocation and
  // synchronize fails (Internal, as the CUDA backend reports one), and device_health() says why.
  void lose(std::string why) { lost_ = std::move(why); }
  Status device_health() override {
    return lost_.empty() ? Status::OK() : Status::Unavailable("simulated device is lost: " + lost_);
  }
  size_t live_bytes() const { return live_bytes_; }

  std::string_view name() const override { return "simulated-cuda"; }
  Device device() const override { return {DeviceKind::kCuda, 0}; }

  Result<DeviceBuffer> allocate(size_t bytes) override {
    TUTEL_RETURN_IF_ERROR(sticky("allocate"));
    const size_t align = guarded_ ? page_size() : 64;
    const size_t rounded = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
    if (rounded > memory_limit_ || live_bytes_ > memory_limit_ - rounded)
      return Status::ResourceExhausted("simulated device: " + std::to_string(bytes) +
                                       " more bytes would pass its limit");
    void* p = guarded_ ? ::mmap(nullptr, rounded, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                       : std::aligned_alloc(64, rounded);
    if (p == nullptr || p == MAP_FAILED)
      return Status::ResourceExhausted("simulated device: out of memory");
    std::memset(p, 0xff, rounded);
    if (guarded_ && open_ == 0) ::mprotect(p, rounded, PROT_NONE);
    allocations_[reinterpret_cast<uintptr_t>(p)] = rounded;
    live_bytes_ += rounded;
    ++allocation_count_;
    return DeviceBuffer(this, p, bytes);
  }
  void release(void* data, size_t bytes) override {
    auto it = allocations_.find(reinterpret_cast<uintptr_t>(data));
    if (it == allocations_.end()) {
      (void)violation("release of " + address(data) + ", which this device did not allocate");
      return;
    }
    free_memory(data, it->second);
    live_bytes_ -= it->second;
    allocations_.erase(it);
  }

  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    if (bytes == 0) return Status::OK();  // as CudaBackend: no copy, whatever the pointers
    TUTEL_RETURN_IF_ERROR(sticky("copy"));
    const bool dst_device = on_device(dst, bytes), src_device = on_device(src, bytes);
    const bool dst_host = on_host(dst, bytes), src_host = on_host(src, bytes);
    const char* kind_name = kind == CopyKind::kHostToDevice   ? "host-to-device"
                            : kind == CopyKind::kDeviceToHost ? "device-to-host"
                                                              : "device-to-device";
    const bool ok = kind == CopyKind::kHostToDevice   ? src_host && dst_device
                    : kind == CopyKind::kDeviceToHost ? src_device && dst_host
                                                      : src_device && dst_device;
    if (!ok)
      return violation(std::string(kind_name) + " copy of " + std::to_string(bytes) +
                       " bytes from " + where(src, bytes) + " to " + where(dst, bytes));
    const void* host_end = kind == CopyKind::kHostToDevice ? src : dst;
    copies_.push_back({dst, src, bytes, kind,
                       kind != CopyKind::kDeviceToDevice && is_registered(host_end, bytes)});
    Access open(*this);
    std::memmove(dst, src, bytes);
    return Status::OK();
  }
  Status fill_zero(TensorView t) override {
    TUTEL_RETURN_IF_ERROR(check("fill_zero", {t}));
    Access open(*this);
    return cpu_->fill_zero(t);
  }
  Status synchronize() override { return sticky("synchronize"); }

  Status register_host(void* data, size_t bytes) override {
    if (fail_registration_) return Status::Unavailable("simulated device: cannot lock that memory");
    if (!on_host(data, bytes))
      return violation("register_host of " + where(data, bytes) + ", which is not host memory");
    if (registered_.count(reinterpret_cast<uintptr_t>(data)))
      return violation("register_host of " + address(data) + " twice");
    registered_[reinterpret_cast<uintptr_t>(data)] = bytes;
    registrations_.emplace_back(data, bytes);
    return Status::OK();
  }
  Status unregister_host(void* data) override {
    if (!registered_.erase(reinterpret_cast<uintptr_t>(data)))
      return violation("unregister_host of " + address(data) + ", which is not registered");
    return Status::OK();
  }

  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override {
    TUTEL_RETURN_IF_ERROR(check("gate_noise", {out}));
    Access open(*this);
    return cpu_->gate_noise(seed, counter, scale, out);
  }
  Status gate_forward(const GateForwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check(
        "gate_forward", {a.x, a.gate_weight, a.noise, a.scores, a.expert_index, a.gates, a.l_aux}));
    Access open(*this);
    return cpu_->gate_forward(a);
  }
  Status locations(const LocationsArgs& a) override {
    TUTEL_RETURN_IF_ERROR(
        check("locations", {a.scores, a.expert_index, a.location, a.expert_count}));
    Access open(*this);
    return cpu_->locations(a);
  }
  Status slot_map(const SlotMapArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("slot_map", {a.expert_index, a.location, a.slot_assignment}));
    Access open(*this);
    return cpu_->slot_map(a);
  }
  Status encode(const EncodeArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("encode", {a.x, a.gates, a.slot_assignment, a.dispatched}));
    Access open(*this);
    return cpu_->encode(a);
  }
  Status decode(const DecodeArgs& a) override {
    TUTEL_RETURN_IF_ERROR(
        check("decode", {a.expert_out, a.gates, a.expert_index, a.location, a.y}));
    Access open(*this);
    return cpu_->decode(a);
  }
  size_t expert_workspace_bytes(const ExpertShape& s, DType d) const override {
    return cpu_->expert_workspace_bytes(s, d);
  }
  Status expert_forward(const ExpertForwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check(
        "expert_forward",
        {a.dispatched, a.pre_activation, a.hidden, a.expert_out, a.workspace, a.weights.fc1_weight,
         a.weights.fc1_bias, a.weights.fc2_weight, a.weights.fc2_bias, a.weights.fc1_weight_bf16,
         a.weights.fc2_weight_bf16}));
    Access open(*this);
    return cpu_->expert_forward(a);
  }
  Status expert_backward(const ExpertBackwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check(
        "expert_backward", {a.dispatched, a.pre_activation, a.hidden, a.d_expert_out, a.d_hidden,
                            a.d_dispatched, a.workspace, a.weights.fc1_weight, a.weights.fc1_bias,
                            a.weights.fc2_weight, a.weights.fc2_bias, a.weights.fc1_weight_bf16,
                            a.weights.fc2_weight_bf16, a.grads.fc1_weight, a.grads.fc1_bias,
                            a.grads.fc2_weight, a.grads.fc2_bias}));
    Access open(*this);
    return cpu_->expert_backward(a);
  }
  Status decode_backward(const DecodeBackwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(
        check("decode_backward", {a.dy, a.expert_out, a.gates, a.expert_index, a.location,
                                  a.slot_assignment, a.d_expert_out, a.d_gates}));
    Access open(*this);
    return cpu_->decode_backward(a);
  }
  Status encode_backward(const EncodeBackwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("encode_backward", {a.d_dispatched, a.x, a.gates, a.expert_index,
                                                    a.location, a.dx, a.d_gates}));
    Access open(*this);
    return cpu_->encode_backward(a);
  }
  Status gate_backward(const GateBackwardArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("gate_backward", {a.x, a.gate_weight, a.scores, a.expert_index,
                                                  a.d_gates, a.d_logits, a.dx, a.d_gate_weight}));
    Access open(*this);
    return cpu_->gate_backward(a);
  }
  Status sgd_step(const SgdArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("sgd_step", {a.param, a.grad, a.momentum_buffer, a.param_bf16}));
    Access open(*this);
    return cpu_->sgd_step(a);
  }
  Status adamw_step(const AdamWArgs& a) override {
    TUTEL_RETURN_IF_ERROR(check("adamw_step", {a.param, a.grad, a.exp_avg, a.exp_avg_sq, a.param_bf16}));
    Access open(*this);
    return cpu_->adamw_step(a);
  }
  Status convert(TensorView src, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(check("convert", {src, dst}));
    Access open(*this);
    return cpu_->convert(src, dst);
  }
  Status add(TensorView dst, TensorView src) override {
    TUTEL_RETURN_IF_ERROR(check("add", {dst, src}));
    Access open(*this);
    return cpu_->add(dst, src);
  }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(check("add_sum_squares", {src, dst}));
    Access open(*this);
    return cpu_->add_sum_squares(src, dst);
  }
  Status scale(TensorView t, float factor) override {
    TUTEL_RETURN_IF_ERROR(check("scale", {t}));
    Access open(*this);
    return cpu_->scale(t, factor);
  }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    TUTEL_RETURN_IF_ERROR(check("add_row_bias", {out, bias}));
    Access open(*this);
    return cpu_->add_row_bias(out, bias, column);
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    TUTEL_RETURN_IF_ERROR(check("add_column_sums", {src, dst}));
    Access open(*this);
    return cpu_->add_column_sums(src, column, dst);
  }

 private:
  static std::string address(const void* p) {
    std::ostringstream o;
    o << p;
    return o.str();
  }
  // [p, p + n) lies inside one allocation (an empty range may sit at its end).
  bool on_device(const void* p, size_t n) const {
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto it = allocations_.upper_bound(a);
    if (it == allocations_.begin()) return false;
    --it;
    return a >= it->first && a + n <= it->first + it->second;
  }
  // [p, p + n) touches no allocation.
  bool on_host(const void* p, size_t n) const {
    if (p == nullptr) return false;
    for (const auto& [start, bytes] : allocations_)
      if (overlaps(p, std::max<size_t>(n, 1), reinterpret_cast<const void*>(start), bytes))
        return false;
    return true;
  }
  bool is_registered(const void* p, size_t n) const {
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto it = registered_.upper_bound(a);
    if (it == registered_.begin()) return false;
    --it;
    return a + n <= it->first + it->second;
  }
  std::string where(const void* p, size_t n) const {
    return address(p) + (on_device(p, n) ? " (device)"
                         : on_host(p, n) ? " (host)"
                                         : " (straddles device memory)");
  }
  static size_t page_size() { return static_cast<size_t>(::sysconf(_SC_PAGESIZE)); }
  void free_memory(void* p, size_t bytes) {
    if (guarded_)
      ::munmap(p, bytes);
    else
      std::free(p);
  }
  void protect_all(int prot) {
    for (const auto& [start, bytes] : allocations_)
      ::mprotect(reinterpret_cast<void*>(start), bytes, prot);
  }
  Status violation(std::string what) {
    violations_.push_back(what);
    return Status::Internal("simulated device: " + what);
  }
  Status sticky(const char* op) const {
    if (lost_.empty()) return Status::OK();
    return Status::Internal(std::string("simulated device: ") + op + " failed: " + lost_ + " (sticky error)");
  }
  Status check(const char* op, std::initializer_list<TensorView> views) {
    TUTEL_RETURN_IF_ERROR(sticky(op));
    int i = 0;
    for (const TensorView& v : views) {
      ++i;
      if (v.empty()) continue;  // an optional operand left out
      if (!on_device(v.data(), v.nbytes()))
        return violation(std::string(op) + ": operand " + std::to_string(i) + " " +
                         v.shape().to_string() + " at " + where(v.data(), v.nbytes()) +
                         " is not in this device's memory");
      if (!(v.device() == device()))
        return violation(std::string(op) + ": operand " + std::to_string(i) + " says it is on " +
                         v.device().to_string() + ", not " + device().to_string());
    }
    return Status::OK();
  }

  std::unique_ptr<Backend> cpu_;
  std::map<uintptr_t, size_t> allocations_;  // start → bytes (rounded up)
  std::map<uintptr_t, size_t> registered_;
  std::vector<std::pair<const void*, size_t>> registrations_;
  std::vector<std::string> violations_;
  std::vector<CopyRecord> copies_;
  int64_t allocation_count_ = 0;
  bool fail_registration_ = false;
  size_t memory_limit_ = ~size_t{0};
  size_t live_bytes_ = 0;
  bool guarded_ = false;  // guard_host_access()
  int open_ = 0;          // live Access objects
  std::string lost_;      // lose()'s cause; empty while the device works
};

// The CPU backend, recording the copies it is asked for.
class CountingCpu final : public ForwardingBackend {
 public:
  explicit CountingCpu(std::unique_ptr<Backend> cpu) : ForwardingBackend(std::move(cpu)) {}
  const std::vector<CopyRecord>& copies() const { return copies_; }
  // Makes its shareable memory say what CUDA IPC's says: not to be freed while exported.
  void keep_exports_until_exit(bool keep) { keep_exports_ = keep; }
  int64_t shareable_allocations() const { return shareable_allocations_; }
  int64_t releases() const { return releases_; }
  // The next synchronize() returns `error` (as a device reports a kernel that failed) after
  // synchronizing.
  void fail_next_synchronize(Status error) { synchronize_error_ = std::move(error); }

  Status synchronize() override {
    TUTEL_RETURN_IF_ERROR(ForwardingBackend::synchronize());
    return std::exchange(synchronize_error_, Status::OK());
  }
  void release(void* data, size_t bytes) override {
    ++releases_;
    if (inner_shareable_.erase(data)) return;  // the inner buffer frees it
    ForwardingBackend::release(data, bytes);
  }
  Result<ShareableBuffer> allocate_shareable(size_t bytes) override {
    TUTEL_ASSIGN_OR_RETURN(ShareableBuffer inner, ForwardingBackend::allocate_shareable(bytes));
    ++shareable_allocations_;
    inner.exported.keep_until_exit = keep_exports_;
    // Freed through this wrapper, so releases are counted.
    ShareableBuffer out{DeviceBuffer(this, inner.buffer.data(), inner.buffer.bytes()), std::move(inner.exported)};
    void* data = inner.buffer.data();
    inner_shareable_.emplace(data, std::move(inner.buffer));
    return out;
  }
  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    copies_.push_back({dst, src, bytes, kind, false});
    return ForwardingBackend::copy(dst, src, bytes, kind);
  }

 private:
  std::vector<CopyRecord> copies_;
  bool keep_exports_ = false;
  int64_t shareable_allocations_ = 0, releases_ = 0;
  Status synchronize_error_;
  std::map<void*, DeviceBuffer> inner_shareable_;  // what allocate_shareable's buffers wrap
};

}  // namespace tutel::daemon::testing
