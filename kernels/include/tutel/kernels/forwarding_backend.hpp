// ForwardingBackend: a Backend that passes every call to another, for wrappers that change one
// or two things (the daemon's ActivationBackend charges allocations to a tenant; tests count
// allocations or copies). A wrapper overrides only what it changes, and an op added to Backend
// is forwarded here once instead of in every wrapper.
//
// Buffers from allocate() are the inner backend's (it frees them); a wrapper that hands out
// buffers of its own overrides release() for those.
// Thread-safety: as the inner backend's.
#pragma once

#include <memory>

#include "tutel/kernels/backend.hpp"

namespace tutel {

class ForwardingBackend : public Backend {
 public:
  std::string_view name() const override { return inner_.name(); }
  Device device() const override { return inner_.device(); }
  std::string describe() const override { return inner_.describe(); }
  Result<DeviceBuffer> allocate(size_t bytes) override { return inner_.allocate(bytes); }
  void release(void* data, size_t bytes) override { inner_.release(data, bytes); }
  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    return inner_.copy(dst, src, bytes, kind);
  }
  Status fill_zero(TensorView t) override { return inner_.fill_zero(t); }
  Status synchronize() override { return inner_.synchronize(); }
  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override {
    return inner_.gate_noise(seed, counter, scale, out);
  }
  Status gate_forward(const GateForwardArgs& a) override { return inner_.gate_forward(a); }
  Status locations(const LocationsArgs& a) override { return inner_.locations(a); }
  Status slot_map(const SlotMapArgs& a) override { return inner_.slot_map(a); }
  Status encode(const EncodeArgs& a) override { return inner_.encode(a); }
  Status decode(const DecodeArgs& a) override { return inner_.decode(a); }
  size_t expert_workspace_bytes(const ExpertShape& shape, DType matmul_dtype) const override {
    return inner_.expert_workspace_bytes(shape, matmul_dtype);
  }
  Status expert_forward(const ExpertForwardArgs& a) override { return inner_.expert_forward(a); }
  Status expert_backward(const ExpertBackwardArgs& a) override { return inner_.expert_backward(a); }
  Status decode_backward(const DecodeBackwardArgs& a) override { return inner_.decode_backward(a); }
  Status encode_backward(const EncodeBackwardArgs& a) override { return inner_.encode_backward(a); }
  Status gate_backward(const GateBackwardArgs& a) override { return inner_.gate_backward(a); }
  Status sgd_step(const SgdArgs& a) override { return inner_.sgd_step(a); }
  Status adamw_step(const AdamWArgs& a) override { return inner_.adamw_step(a); }
  Status convert(TensorView src, TensorView dst) override { return inner_.convert(src, dst); }
  Status add(TensorView dst, TensorView src) override { return inner_.add(dst, src); }
  Status add_sum_squares(TensorView src, TensorView dst) override { return inner_.add_sum_squares(src, dst); }
  Status scale(TensorView t, float factor) override { return inner_.scale(t, factor); }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    return inner_.add_row_bias(out, bias, column);
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    return inner_.add_column_sums(src, column, dst);
  }
  Result<ShareableBuffer> allocate_shareable(size_t bytes) override {
    return inner_.allocate_shareable(bytes);
  }
  void discard_shareable(void* data) override { inner_.discard_shareable(data); }
  Status register_host(void* data, size_t bytes) override {
    return inner_.register_host(data, bytes);
  }
  Status unregister_host(void* data) override { return inner_.unregister_host(data); }
  void* native_stream() const override { return inner_.native_stream(); }
  uint64_t scratch_epoch() const override { return inner_.scratch_epoch(); }
  Status join_forked_work() override { return inner_.join_forked_work(); }
  Status device_health() override { return inner_.device_health(); }

 protected:
  // Forwards to `inner`, which must outlive this backend.
  explicit ForwardingBackend(Backend& inner) : inner_(inner) {}
  // Forwards to `inner` and owns it.
  explicit ForwardingBackend(std::unique_ptr<Backend> inner)
      : owned_(std::move(inner)), inner_(*owned_) {}
  Backend& inner() const { return inner_; }

 private:
  std::unique_ptr<Backend> owned_;
  Backend& inner_;
};

}  // namespace tutel
