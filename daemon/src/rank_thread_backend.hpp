// A CPU rank's backend, whose computing ops run on the rank's thread (rank_thread.hpp), wherever
// they are called from. The layer's requests hand the rank thread whole steps (ServedLayer's
// on_rank), so their ops find themselves on it and run inline; an op called from elsewhere (a
// creation's initial values, a load, a rarely used path) is handed over alone, which costs a
// wake-up but keeps the rank's OpenMP work on one team. Memory ops (allocate, copy, which is a
// memcpy here, registration) run where they are called: they start no parallel region.
//
// Thread-safety: as the inner backend's; the rank's FairLock serialises its users.
#pragma once

#include <memory>

#include "rank_thread.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::daemon {

class RankThreadBackend final : public ForwardingBackend {
 public:
  // `thread` must outlive this backend.
  RankThreadBackend(std::unique_ptr<Backend> inner, RankThread& thread)
      : ForwardingBackend(std::move(inner)), thread_(thread) {}

  Status fill_zero(TensorView t) override {
    return on_thread([&] { return ForwardingBackend::fill_zero(t); });
  }
  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override {
    return on_thread([&] { return ForwardingBackend::gate_noise(seed, counter, scale, out); });
  }
  Status gate_forward(const GateForwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::gate_forward(a); });
  }
  Status locations(const LocationsArgs& a) override {
    return on_thread([&] { return ForwardingBackend::locations(a); });
  }
  Status slot_map(const SlotMapArgs& a) override {
    return on_thread([&] { return ForwardingBackend::slot_map(a); });
  }
  Status encode(const EncodeArgs& a) override { return on_thread([&] { return ForwardingBackend::encode(a); }); }
  Status decode(const DecodeArgs& a) override { return on_thread([&] { return ForwardingBackend::decode(a); }); }
  Status expert_forward(const ExpertForwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::expert_forward(a); });
  }
  Status expert_backward(const ExpertBackwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::expert_backward(a); });
  }
  Status decode_backward(const DecodeBackwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::decode_backward(a); });
  }
  Status encode_backward(const EncodeBackwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::encode_backward(a); });
  }
  Status gate_backward(const GateBackwardArgs& a) override {
    return on_thread([&] { return ForwardingBackend::gate_backward(a); });
  }
  Status sgd_step(const SgdArgs& a) override { return on_thread([&] { return ForwardingBackend::sgd_step(a); }); }
  Status adamw_step(const AdamWArgs& a) override {
    return on_thread([&] { return ForwardingBackend::adamw_step(a); });
  }
  Status convert(TensorView src, TensorView dst) override {
    return on_thread([&] { return ForwardingBackend::convert(src, dst); });
  }
  Status add(TensorView dst, TensorView src) override {
    return on_thread([&] { return ForwardingBackend::add(dst, src); });
  }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    return on_thread([&] { return ForwardingBackend::add_sum_squares(src, dst); });
  }
  Status scale(TensorView t, float factor) override {
    return on_thread([&] { return ForwardingBackend::scale(t, factor); });
  }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    return on_thread([&] { return ForwardingBackend::add_row_bias(out, bias, column); });
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    return on_thread([&] { return ForwardingBackend::add_column_sums(src, column, dst); });
  }

  // Ops called off the rank thread and handed over one by one (tests check the hot paths have
  // none).
  uint64_t ops_handed_over() const { return ops_handed_over_.load(std::memory_order_relaxed); }

 private:
  template <typename F>
  Status on_thread(F&& f) {
    if (thread_.on_thread()) return f();
    ops_handed_over_.fetch_add(1, std::memory_order_relaxed);
    return thread_.run(f);
  }

  RankThread& thread_;
  std::atomic<uint64_t> ops_handed_over_{0};
};

}  // namespace tutel::daemon
