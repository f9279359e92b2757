// A graph capture without a GPU: while a Tape records, the ops of a TapeBackend and the
// collectives of a TapeCollectives are appended to it instead of run, as a CUDA stream capture
// records kernels and NCCL calls without running them; launching the captured tape runs them
// with the arguments they were recorded with, as a graph replays its baked addresses. What a
// capture must not contain is refused and kept as a violation: an allocation, a wait for the
// device or for a collective, a copy to or from the host (CUDA refuses these while capturing, or
// they would be baked into the graph as stale host work).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tutel/comm/communicator.hpp"
#include "tutel/graphs/phase_runner.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::testing {

class Tape {
 public:
  bool recording() const { return recording_; }
  const std::vector<std::string>& violations() const { return violations_; }
  int64_t recorded_ops() const { return recorded_ops_; }

  // Runs `op`, or records it while recording.
  Status run_or_record(std::function<Status()> op) {
    if (!recording_) return op();
    ops_.push_back(std::move(op));
    ++recorded_ops_;
    return Status::OK();
  }
  // `what` may not happen inside a capture.
  Status forbid(const std::string& what) {
    if (!recording_) return Status::OK();
    violations_.push_back(what + " while capturing");
    return Status::Internal(what + " is not allowed while capturing a graph");
  }

  void begin() {
    recording_ = true;
    ops_.clear();
  }
  std::vector<std::function<Status()>> end() {
    recording_ = false;
    return std::exchange(ops_, {});
  }

 private:
  bool recording_ = false;
  std::vector<std::function<Status()>> ops_;
  std::vector<std::string> violations_;
  int64_t recorded_ops_ = 0;
};

class TapeGraph final : public graphs::CapturedGraph {
 public:
  explicit TapeGraph(std::vector<std::function<Status()>> ops) : ops_(std::move(ops)) {}
  Status launch() override {
    for (auto& op : ops_) TUTEL_RETURN_IF_ERROR(op());
    return Status::OK();
  }

 private:
  std::vector<std::function<Status()>> ops_;
};

class TapeCapture final : public graphs::GraphCapture {
 public:
  // fail: every capture fails at its end, as cudaStreamEndCapture does on an invalidated capture.
  explicit TapeCapture(Tape& tape, bool fail = false) : tape_(tape), fail_(fail) {}
  Status begin() override {
    if (tape_.recording()) return Status::Internal("a capture is already recording");
    tape_.begin();
    return Status::OK();
  }
  Result<std::unique_ptr<graphs::CapturedGraph>> end() override {
    auto ops = tape_.end();
    if (fail_) return Status::Internal("simulated capture failure (the capture was invalidated)");
    return std::unique_ptr<graphs::CapturedGraph>(new TapeGraph(std::move(ops)));
  }

 private:
  Tape& tape_;
  bool fail_;
};

// The backend's queue, recordable: the queued ops are recorded while capturing; what a capture
// may not contain is refused; the rest (name, device, sizes) is the inner backend's.
class TapeBackend final : public ForwardingBackend {
 public:
  TapeBackend(Backend& inner, Tape& tape) : ForwardingBackend(inner), tape_(tape) {}

  Result<DeviceBuffer> allocate(size_t bytes) override {
    TUTEL_RETURN_IF_ERROR(tape_.forbid("allocate(" + std::to_string(bytes) + ")"));
    return inner().allocate(bytes);  // the inner backend owns and frees it
  }
  void release(void* data, size_t bytes) override {
    (void)tape_.forbid("release");
    inner().release(data, bytes);
  }
  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    if (kind != CopyKind::kDeviceToDevice)
      TUTEL_RETURN_IF_ERROR(tape_.forbid("a copy to or from the host"));
    return tape_.run_or_record([=, this] { return inner().copy(dst, src, bytes, kind); });
  }
  Status synchronize() override {
    TUTEL_RETURN_IF_ERROR(tape_.forbid("synchronize()"));
    return inner().synchronize();
  }
  Status fill_zero(TensorView t) override {
    return tape_.run_or_record([=, this] { return inner().fill_zero(t); });
  }
  Status gate_noise(uint64_t seed, uint64_t counter, float scale, TensorView out) override {
    return tape_.run_or_record([=, this] { return inner().gate_noise(seed, counter, scale, out); });
  }
#define TUTEL_TAPE_OP(method, Args)                                      \
  Status method(const Args& a) override {                                \
    return tape_.run_or_record([a, this] { return inner().method(a); }); \
  }
  TUTEL_TAPE_OP(gate_forward, GateForwardArgs)
  TUTEL_TAPE_OP(locations, LocationsArgs)
  TUTEL_TAPE_OP(slot_map, SlotMapArgs)
  TUTEL_TAPE_OP(encode, EncodeArgs)
  TUTEL_TAPE_OP(decode, DecodeArgs)
  TUTEL_TAPE_OP(expert_forward, ExpertForwardArgs)
  TUTEL_TAPE_OP(expert_backward, ExpertBackwardArgs)
  TUTEL_TAPE_OP(decode_backward, DecodeBackwardArgs)
  TUTEL_TAPE_OP(encode_backward, EncodeBackwardArgs)
  TUTEL_TAPE_OP(gate_backward, GateBackwardArgs)
  TUTEL_TAPE_OP(sgd_step, SgdArgs)
  TUTEL_TAPE_OP(adamw_step, AdamWArgs)
#undef TUTEL_TAPE_OP
  Status convert(TensorView src, TensorView dst) override {
    return tape_.run_or_record([=, this] { return inner().convert(src, dst); });
  }
  Status add(TensorView dst, TensorView src) override {
    return tape_.run_or_record([=, this] { return inner().add(dst, src); });
  }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    return tape_.run_or_record([=, this] { return inner().add_sum_squares(src, dst); });
  }
  Status scale(TensorView t, float factor) override {
    return tape_.run_or_record([=, this] { return inner().scale(t, factor); });
  }
  Status add_row_bias(TensorView out, TensorView bias, int64_t column) override {
    return tape_.run_or_record([=, this] { return inner().add_row_bias(out, bias, column); });
  }
  Status add_column_sums(TensorView src, int64_t column, TensorView dst) override {
    return tape_.run_or_record([=, this] { return inner().add_column_sums(src, column, dst); });
  }

 private:
  Tape& tape_;
};

// Collectives that enqueue on the backend's queue (the tape's order) and return, as NCCL's on
// the backend's stream with NcclOptions::synchronize = false. log() says how each ran, a letter
// per collective: E op by op, C recorded into a capture, L run by a graph's launch; NCCL needs
// every rank of a group to have the same log.
class TapeCollectives final : public comm::Communicator {
 public:
  TapeCollectives(comm::Communicator& inner, Tape& tape) : inner_(inner), tape_(tape) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  int local_size() const override { return inner_.local_size(); }
  using Communicator::all_to_all;
  Status all_to_all(const void* send, const comm::BlockLayout& send_layout, void* recv,
                    const comm::BlockLayout& recv_layout, comm::AllToAllAlgo algo) override {
    return collective(send_layout.block_bytes(), [=, this] {
      return inner_.all_to_all(send, send_layout, recv, recv_layout, algo);
    });
  }
  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    return collective(bytes_per_rank,
                      [=, this] { return inner_.all_gather(send, recv, bytes_per_rank); });
  }
  Status reduce_scatter(const float* send, float* recv, size_t count_per_rank,
                        comm::ReduceOp op) override {
    return collective(count_per_rank * sizeof(float),
                      [=, this] { return inner_.reduce_scatter(send, recv, count_per_rank, op); });
  }
  Status all_reduce(float* data, size_t count, comm::ReduceOp op) override {
    return collective(count * sizeof(float) / size_t(size()),
                      [=, this] { return inner_.all_reduce(data, count, op); });
  }
  Status all_reduce(int64_t* data, size_t count, comm::ReduceOp op) override {
    return collective(count * sizeof(int64_t) / size_t(size()),
                      [=, this] { return inner_.all_reduce(data, count, op); });
  }
  Status barrier() override {
    TUTEL_RETURN_IF_ERROR(tape_.forbid("barrier()"));
    return inner_.barrier();
  }
  void give_up(const Status& why) override { inner_.give_up(why); }
  Status wait_enqueued() override {
    TUTEL_RETURN_IF_ERROR(tape_.forbid("wait_enqueued()"));
    ++waits_;
    return Status::OK();
  }
  // The new group's collectives go through the same tape, with a log of their own.
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> inner, inner_.split(color, key));
    if (inner == nullptr) return std::unique_ptr<Communicator>();
    auto child = std::make_unique<TapeCollectives>(*inner, tape_);
    child->owned_ = std::move(inner);
    return std::unique_ptr<Communicator>(std::move(child));
  }
  std::vector<comm::PeerStatus> peers() const override { return inner_.peers(); }
  uint64_t captured_traffic() const override { return captured_; }
  void count_replayed(uint64_t bytes_per_peer) override { counted_ += bytes_per_peer; }
  int64_t waits() const { return waits_; }
  const std::string& log() const { return log_; }
  // Traffic per peer as NCCL's communicator counts it (when a collective is issued, or into
  // captured_traffic() while capturing, plus what count_replayed() reports), and as it moved
  // (when the collective ran: op by op, or replayed by a launch).
  uint64_t counted_traffic() const { return counted_; }
  uint64_t moved_traffic() const { return moved_; }

  uint64_t add_graph_release(std::function<void()> release) override {
    releases_.emplace(++release_ids_, std::move(release));
    return release_ids_;
  }
  void remove_graph_release(uint64_t id) override { releases_.erase(id); }
  size_t graph_releases() const { return releases_.size(); }
  // The next collective the host issues fails as NCCL's do: the communicator calls the
  // registered releases, then `at_abort` (where a test sees what NCCL's abort would wait for),
  // then is aborted: that collective and every later one return kAborted.
  void fail_next(std::function<void()> at_abort) { at_abort_ = std::move(at_abort); }

 private:
  Status collective(uint64_t bytes_per_peer, std::function<Status()> call) {
    if (at_abort_) {
      for (auto& [id, release] : releases_) release();
      std::exchange(at_abort_, nullptr)();
      aborted_ = true;
    }
    if (aborted_) return Status::Aborted("simulated collective failure: communicator aborted");
    if (!tape_.recording()) {
      log_ += 'E';
      counted_ += bytes_per_peer;
      moved_ += bytes_per_peer;
      return call();
    }
    log_ += 'C';
    captured_ += bytes_per_peer;
    // A recorded collective runs only when its graph is launched.
    return tape_.run_or_record([this, call, bytes_per_peer] {
      log_ += 'L';
      moved_ += bytes_per_peer;
      return call();
    });
  }

  comm::Communicator& inner_;
  std::unique_ptr<Communicator> owned_;  // inner_, for a group made by split()
  Tape& tape_;
  int64_t waits_ = 0;
  std::string log_;
  uint64_t captured_ = 0, counted_ = 0, moved_ = 0;
  std::map<uint64_t, std::function<void()>> releases_;
  uint64_t release_ids_ = 0;
  std::function<void()> at_abort_;
  bool aborted_ = false;
};

}  // namespace tutel::testing
