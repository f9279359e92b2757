// The NCCL Communicator (nccl.hpp). UNTESTED: the development machines have no GPU; this file
// is compiled in every CUDA build and exercised only where a device exists.
//
// The NCCL communicator is created non-blocking (ncclConfig_t::blocking = 0) so that no NCCL
// call can block us forever: every call that returns ncclInProgress is waited for by polling
// ncclCommGetAsyncError against a deadline, and completion of enqueued work by polling a CUDA
// event. A deadline that passes aborts the communicator (ncclCommAbort), which also makes the
// kernels already enqueued exit.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../src/block_layout.hpp"
#include "../src/group_layout.hpp"
#include "../src/two_dh.hpp"
#include "tutel/comm/nccl.hpp"

namespace tutel::comm {
namespace {

using Clock = std::chrono::steady_clock;

Status cuda_failure(cudaError_t e, const char* expr) {
  const StatusCode code = e == cudaErrorMemoryAllocation ? StatusCode::kResourceExhausted
                          : (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
                              ? StatusCode::kUnavailable
                              : StatusCode::kInternal;
  return Status(code,
                std::string(expr) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

Status nccl_failure(ncclResult_t r, const char* expr, ncclComm_t comm) {
  std::string msg = std::string(expr) + ": " + ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') msg += " (" + std::string(last) + ")";
  const StatusCode code = (r == ncclRemoteError || r == ncclSystemError) ? StatusCode::kUnavailable
                          : r == ncclInvalidArgument || r == ncclInvalidUsage
                              ? StatusCode::kInvalidArgument
                              : StatusCode::kInternal;
  return Status(code, msg);
}

#define TUTEL_NCCL_CUDA(expr)                                          \
  do {                                                                 \
    const cudaError_t _tutel_e = (expr);                               \
    if (_tutel_e != cudaSuccess) return cuda_failure(_tutel_e, #expr); \
  } while (0)

// ncclInProgress is not an error for a non-blocking communicator: the caller waits on it.
#define TUTEL_NCCL(expr, comm)                                 \
  do {                                                         \
    const ncclResult_t _tutel_r = (expr);                      \
    if (_tutel_r != ncclSuccess && _tutel_r != ncclInProgress) \
      return nccl_failure(_tutel_r, #expr, comm);              \
  } while (0)

// NcclOptions::abandon was raised: the caller gives up as at its deadline.
bool abandoned(const std::atomic<bool>* abandon) {
  return abandon != nullptr && abandon->load(std::memory_order_acquire);
}
Status abandoned_status() { return Status::Aborted("abandoned: this process is shutting down"); }

// Waits until `comm` has no NCCL call in progress, until `deadline` or until `abandon` (null:
// never) is raised.
Status wait_comm(ncclComm_t comm, Clock::time_point deadline, const std::atomic<bool>* abandon) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return nccl_failure(r, "ncclCommGetAsyncError", comm);
    if (state == ncclSuccess) return Status::OK();
    if (state != ncclInProgress) return nccl_failure(state, "NCCL (asynchronous)", comm);
    if (abandoned(abandon)) return abandoned_status();
    if (Clock::now() >= deadline) return Status::Timeout("NCCL call still in progress");
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// dst[j][i] = src[i][j] for a [rows][cols] matrix of `chunk`-byte elements in device memory:
// a 2-D copy per column (the source's row as its pitch), or, where that pitch is past the
// device's largest (`max_pitch`, cudaDevAttrMaxPitch: a 2-D copy would fail), one copy per
// element.
Status transpose_chunks_device(void* dst, const void* src, int rows, int cols, size_t chunk,
                               size_t max_pitch, cudaStream_t stream) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const size_t src_pitch = static_cast<size_t>(cols) * chunk;
  const bool two_d = src_pitch <= max_pitch;
  for (int j = 0; j < cols; ++j) {
    unsigned char* column_to = d + static_cast<size_t>(j) * rows * chunk;
    const unsigned char* column_from = s + static_cast<size_t>(j) * chunk;
    if (two_d) {
      TUTEL_NCCL_CUDA(cudaMemcpy2DAsync(column_to, chunk, column_from, src_pitch, chunk,
                                        static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream));
      continue;
    }
    for (int i = 0; i < rows; ++i)
      TUTEL_NCCL_CUDA(cudaMemcpyAsync(column_to + static_cast<size_t>(i) * chunk,
                                      column_from + static_cast<size_t>(i) * src_pitch, chunk,
                                      cudaMemcpyDeviceToDevice, stream));
  }
  return Status::OK();
}

ncclRedOp_t to_nccl(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

class NcclCommunicator final : public Communicator {
 public:
  struct Shape {
    int rank = -1, size = 0, local_size = 0;
    int world_local_size = 0;
    std::vector<int> members;  // world rank of each group rank
  };

  static Result<std::unique_ptr<NcclCommunicator>> create(ncclComm_t comm, Shape shape,
                                                          const NcclOptions& options,
                                                          std::chrono::milliseconds timeout) {
    std::unique_ptr<NcclCommunicator> self(
        new NcclCommunicator(comm, std::move(shape), options, timeout));
    if (Status s = self->init_cuda(); !s.ok()) {
      // The caller still owns `comm` and aborts it: the half-made object must not destroy it too.
      self->comm_ = nullptr;
      return s;
    }
    return self;
  }

  ~NcclCommunicator() override {
    // On our device, and back on the caller's after (a thread's current device is its state).
    int caller_device = -1;
    if (cudaGetDevice(&caller_device) != cudaSuccess) caller_device = -1;
    struct RestoreDevice {
      int device;
      ~RestoreDevice() {
        if (device >= 0) cudaSetDevice(device);
      }
    } restore{caller_device};
    cudaSetDevice(options_.device);
    release_graphs();  // NCCL's destroy would wait for them
    if (comm_ != nullptr) {
      bool clean = broken_.ok();
      if (clean) {
        const ncclResult_t r = ncclCommFinalize(comm_);
        clean = (r == ncclSuccess || r == ncclInProgress) &&
                wait_comm(comm_, Clock::now() + timeout_, options_.abandon.get()).ok();
      }
      if (clean) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (own_stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return shape_.rank; }
  int size() const override { return shape_.size; }
  int local_size() const override { return shape_.local_size; }

  // NCCL names no failed peer: after a failure every peer carries the communicator's error.
  std::vector<PeerStatus> peers() const override {
    std::string error;
    {
      std::lock_guard<std::mutex> lock(failure_mu_);
      error = failure_text_;
    }
    std::vector<PeerStatus> out;
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) continue;
      PeerStatus& s = out.emplace_back();
      s.rank = p;
      s.address = "NCCL rank " + std::to_string(shape_.members[p]);
      s.failed = !error.empty();
      s.error = error;
      s.bytes_sent = bytes_per_peer_.load(std::memory_order_relaxed);
      s.bytes_received = s.bytes_sent;  // every collective here is symmetric
    }
    return out;
  }

  uint64_t scratch_epoch() const override { return scratch_epoch_; }
  uint64_t captured_traffic() const override { return captured_bytes_per_peer_; }
  uint64_t add_graph_release(std::function<void()> release) override {
    graph_releases_.emplace(++graph_release_ids_, std::move(release));
    return graph_release_ids_;
  }
  void remove_graph_release(uint64_t id) override { graph_releases_.erase(id); }
  void count_replayed(uint64_t bytes_per_peer) override {
    bytes_per_peer_.fetch_add(bytes_per_peer, std::memory_order_relaxed);
  }

  Status wait_enqueued() override {
    TUTEL_RETURN_IF_ERROR(begin("wait_enqueued"));
    return finish(wait_stream());
  }

  using Communicator::all_to_all;
  Status all_to_all(const void* send, const BlockLayout& from, void* recv, const BlockLayout& to,
                    AllToAllAlgo algo) override {
    TUTEL_RETURN_IF_ERROR(begin("all_to_all"));
    TUTEL_RETURN_IF_ERROR(detail::check_block_layouts(from, to, size()));
    // Empty blocks (an expert-parallel step where no rank has a token: capacity 0) move
    // nothing; the 2DH path's 0-width stride copies and empty scratch are not asked to.
    if (from.block_bytes() == 0) return Status::OK();
    add_traffic(from.block_bytes());
    const int n = size(), l = local_size();
    if (algo == AllToAllAlgo::k2DH && n % l != 0)
      return Status::InvalidArgument(
          "2DH all-to-all needs local_size (" + std::to_string(l) + ") to divide the group size (" +
          std::to_string(n) + "); use AllToAllAlgo::kLinear, or a local_size that divides it");
    const auto* s = static_cast<const unsigned char*>(send);
    auto* r = static_cast<unsigned char*>(recv);
    if (algo == AllToAllAlgo::kLinear || l == 1 || l == n) {
      // A send and a receive per piece; NCCL pairs the ones between two ranks in order.
      return finish(grouped([&]() -> Status {
        for (int p = 0; p < n; ++p)
          for (size_t j = 0; j < from.pieces; ++j) {
            TUTEL_NCCL(ncclSend(s + p * from.block_stride + j * from.piece_stride, from.piece_bytes,
                                ncclInt8, p, comm_, stream_),
                       comm_);
            TUTEL_NCCL(ncclRecv(r + p * to.block_stride + j * to.piece_stride, to.piece_bytes,
                                ncclInt8, p, comm_, stream_),
                       comm_);
          }
        return Status::OK();
      }));
    }
    const bool pack = !from.is_contiguous(), unpack = !to.is_contiguous();
    if (!pack && !unpack) return finish(all_to_all_2dh(s, r, from.block_bytes()));
    // 2DH moves whole contiguous blocks: a strided side is packed before it, or unpacked after,
    // on the stream, through scratch past the 2DH's own (T and U).
    const size_t c = from.block_bytes(), total = static_cast<size_t>(n) * c;
    TUTEL_RETURN_IF_ERROR(finish(reserve_scratch((2 + size_t{pack} + size_t{unpack}) * total)));
    unsigned char* staging = static_cast<unsigned char*>(scratch_) + 2 * total;
    // The same pieces, back to back.
    const BlockLayout packed{from.piece_bytes, from.pieces, from.piece_bytes, c};
    const unsigned char* in = s;
    if (pack) {
      TUTEL_RETURN_IF_ERROR(finish(copy_blocks_device(staging, packed, s, from, n)));
      in = staging;
    }
    unsigned char* out = unpack ? staging + (pack ? total : 0) : r;
    // Only enqueued: the unpack follows on the stream, and the wait (when synchronising) comes
    // after it.
    const bool synchronize = std::exchange(options_.synchronize, false);
    Status st = all_to_all_2dh(in, out, c);
    options_.synchronize = synchronize;
    TUTEL_RETURN_IF_ERROR(finish(std::move(st)));
    if (unpack) TUTEL_RETURN_IF_ERROR(finish(copy_blocks_device(r, to, out, packed, n)));
    return finish(complete());
  }

  Status all_gather(const void* send, void* recv, size_t bytes) override {
    TUTEL_RETURN_IF_ERROR(begin("all_gather"));
    add_traffic(bytes);
    return finish(
        enqueue([&] { return ncclAllGather(send, recv, bytes, ncclInt8, comm_, stream_); },
                "ncclAllGather"));
  }

  Status reduce_scatter(const float* send, float* recv, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("reduce_scatter"));
    add_traffic(count * sizeof(float));
    return finish(enqueue(
        [&] {
          return ncclReduceScatter(send, recv, count, ncclFloat32, to_nccl(op), comm_, stream_);
        },
        "ncclReduceScatter"));
  }

  Status all_reduce(float* data, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("all_reduce"));
    add_traffic(count * sizeof(float) / static_cast<size_t>(size()));
    return finish(enqueue(
        [&] { return ncclAllReduce(data, data, count, ncclFloat32, to_nccl(op), comm_, stream_); },
        "ncclAllReduce"));
  }

  Status all_reduce(int64_t* data, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("all_reduce"));
    add_traffic(count * sizeof(int64_t) / static_cast<size_t>(size()));
    return finish(enqueue(
        [&] { return ncclAllReduce(data, data, count, ncclInt64, to_nccl(op), comm_, stream_); },
        "ncclAllReduce"));
  }

  Status barrier() override {
    TUTEL_RETURN_IF_ERROR(begin("barrier"));
    TUTEL_RETURN_IF_ERROR(finish(reserve_scratch(sizeof(int32_t))));
    auto* token = static_cast<int32_t*>(scratch_);
    return finish(
        enqueue([&] { return ncclAllReduce(token, token, 1, ncclInt32, ncclSum, comm_, stream_); },
                "ncclAllReduce"));
  }

  // NCCL has no way to tell the peers: they find out at their collective timeout. The abort
  // makes kernels of this communicator still running return.
  void give_up(const Status& why) override {
    if (!broken_.ok()) return;
    (void)finish(Status::Aborted("rank " + std::to_string(rank()) + "'s own work failed between collectives: " +
                                 std::string(why.message())));
  }

  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    TUTEL_RETURN_IF_ERROR(begin("split"));
    // Everyone learns every (color, key) to derive the new group's members and local_size;
    // NCCL orders the new ranks the same way (key, then parent rank).
    struct Entry {
      int32_t color, key;
    };
    const Entry mine{color < 0 ? kNoColor : color, key};
    std::vector<Entry> all(static_cast<size_t>(size()));
    TUTEL_RETURN_IF_ERROR(finish(host_all_gather(&mine, all.data(), sizeof(Entry))));

    ncclComm_t child = nullptr;
    ncclConfig_t config = nonblocking_config();
    const ncclResult_t split_result = ncclCommSplit(
        comm_, mine.color == kNoColor ? NCCL_SPLIT_NOCOLOR : mine.color, key, &child, &config);
    if (split_result != ncclSuccess && split_result != ncclInProgress)
      return finish(nccl_failure(split_result, "ncclCommSplit", comm_));
    TUTEL_RETURN_IF_ERROR(finish(wait_comm(comm_, deadline_, options_.abandon.get())));
    if (mine.color == kNoColor) return std::unique_ptr<Communicator>();
    if (child == nullptr) return finish(Status::Internal("ncclCommSplit returned no communicator"));
    if (Status s = wait_comm(child, deadline_, options_.abandon.get()); !s.ok()) {
      ncclCommAbort(child);
      return finish(std::move(s));
    }

    std::vector<int> order;
    for (int p = 0; p < size(); ++p)
      if (all[p].color == mine.color) order.push_back(p);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return all[a].key < all[b].key; });
    Shape shape;
    shape.world_local_size = shape_.world_local_size;
    for (int p : order) {
      if (p == rank()) shape.rank = static_cast<int>(shape.members.size());
      shape.members.push_back(shape_.members[p]);
    }
    shape.size = static_cast<int>(shape.members.size());
    shape.local_size = detail::derive_local_size(shape.members, shape.world_local_size);
    NcclOptions options = options_;
    options.stream = own_stream_ ? nullptr : stream_;
    auto created = create(child, std::move(shape), options, timeout_);
    if (!created.ok()) {
      ncclCommAbort(child);
      return std::move(created).status();
    }
    return std::unique_ptr<Communicator>(std::move(created).value());
  }

  // Gathers host bytes through a device staging buffer (used by split and nccl_from_host). The
  // host side of both copies is pinned: a copy to or from pageable memory may block the calling
  // thread until the stream reaches it, which waits for the all-gather, which waits forever
  // for a peer that never calls it. With pinned memory only wait_stream waits, within the
  // collective's deadline.
  Status host_all_gather(const void* send, void* recv, size_t bytes) {
    const size_t total = bytes * static_cast<size_t>(size());
    TUTEL_RETURN_IF_ERROR(reserve_scratch(total + bytes));
    TUTEL_RETURN_IF_ERROR(reserve_pinned(total + bytes));
    auto* gathered = static_cast<unsigned char*>(scratch_);
    unsigned char* mine = gathered + total;
    auto* host = static_cast<unsigned char*>(pinned_);
    std::memcpy(host + total, send, bytes);
    TUTEL_NCCL_CUDA(cudaMemcpyAsync(mine, host + total, bytes, cudaMemcpyHostToDevice, stream_));
    TUTEL_NCCL(ncclAllGather(mine, gathered, bytes, ncclInt8, comm_, stream_), comm_);
    TUTEL_RETURN_IF_ERROR(wait_comm(comm_, deadline_, options_.abandon.get()));
    TUTEL_NCCL_CUDA(cudaMemcpyAsync(host, gathered, total, cudaMemcpyDeviceToHost, stream_));
    TUTEL_RETURN_IF_ERROR(wait_stream());
    std::memcpy(recv, host, total);
    return Status::OK();
  }

  Status reserve_pinned(size_t bytes) {
    if (bytes <= pinned_bytes_) return Status::OK();
    if (pinned_ != nullptr) {
      // A copy queued before may still use it (only after a failure, when the stream did not
      // drain): wait, within the deadline, before it goes.
      TUTEL_RETURN_IF_ERROR(wait_stream());
      TUTEL_NCCL_CUDA(cudaFreeHost(pinned_));
      pinned_ = nullptr;
      pinned_bytes_ = 0;
    }
    TUTEL_NCCL_CUDA(cudaMallocHost(&pinned_, bytes));
    pinned_bytes_ = bytes;
    return Status::OK();
  }

  Status begin(const char* what) {
    what_ = what;
    if (abort_pending_ && !capturing()) abort();
    if (!broken_.ok())
      return Status::Aborted(std::string(what) + ": this NCCL communicator failed earlier (" +
                             std::string(broken_.message()) + "); create a new one");
    deadline_ = Clock::now() + timeout_;
    TUTEL_NCCL_CUDA(cudaSetDevice(options_.device));
    return Status::OK();
  }

 private:
  Status init_cuda() {
    TUTEL_NCCL_CUDA(cudaSetDevice(options_.device));
    if (stream_ == nullptr) {
      TUTEL_NCCL_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      own_stream_ = true;
    }
    TUTEL_NCCL_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    int max_pitch = 0;
    TUTEL_NCCL_CUDA(cudaDeviceGetAttribute(&max_pitch, cudaDevAttrMaxPitch, options_.device));
    max_pitch_ = static_cast<size_t>(max_pitch);
    return Status::OK();
  }

  NcclCommunicator(ncclComm_t comm, Shape shape, const NcclOptions& options,
                   std::chrono::milliseconds timeout)
      : comm_(comm),
        shape_(std::move(shape)),
        options_(options),
        timeout_(timeout),
        stream_(static_cast<cudaStream_t>(options.stream)) {}

  // Any failure after work was enqueued aborts: the ranks no longer agree on where they are.
  // Not while the stream is being captured: the abort makes CUDA calls the capture refuses,
  // and it waits for every graph holding this communicator's collectives to be destroyed,
  // the one being captured included, which its capturer destroys only after this call
  // returns: it would wait forever. The next call (begin) or the destructor aborts then.
  Status finish(Status s) {
    if (s.ok()) return s;
    if (comm_ != nullptr) {
      if (capturing())
        abort_pending_ = true;
      else
        abort();
    }
    if (s.code() == StatusCode::kTimeout)
      s = Status::Timeout("did not complete within " + std::to_string(timeout_.count()) +
                          " ms (a peer of this group may have died or stopped calling "
                          "collectives); NCCL communicator aborted");
    broken_ = s.with_context(std::string("NCCL ") + what_ + " (rank " + std::to_string(rank()) +
                             " of " + std::to_string(size()) + ")");
    std::lock_guard<std::mutex> lock(failure_mu_);
    failure_text_ = std::string(broken_.message());
    return broken_;
  }

  // Runs `calls` (ncclSend/ncclRecv) between ncclGroupStart and ncclGroupEnd, then completes.
  template <typename F>
  Status grouped(F&& calls) {
    TUTEL_NCCL(ncclGroupStart(), comm_);
    Status s = calls();
    const ncclResult_t r = ncclGroupEnd();  // always close the group, even after an error
    TUTEL_RETURN_IF_ERROR(s);
    if (r != ncclSuccess && r != ncclInProgress) return nccl_failure(r, "ncclGroupEnd", comm_);
    return complete();
  }

  template <typename F>
  Status enqueue(F&& call, const char* name) {
    const ncclResult_t r = call();
    if (r != ncclSuccess && r != ncclInProgress) return nccl_failure(r, name, comm_);
    return complete();
  }

  // Waits for the enqueue, then (when synchronising) for the stream.
  Status complete() {
    TUTEL_RETURN_IF_ERROR(wait_comm(comm_, deadline_, options_.abandon.get()));
    if (!options_.synchronize) return Status::OK();
    return wait_stream();
  }

  Status wait_stream() {
    TUTEL_NCCL_CUDA(cudaEventRecord(done_, stream_));
    for (;;) {
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return Status::OK();
      if (q != cudaErrorNotReady) return cuda_failure(q, "cudaEventQuery");
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress)
        return nccl_failure(state, "NCCL (asynchronous)", comm_);
      if (abandoned(options_.abandon.get())) return abandoned_status();
      if (Clock::now() >= deadline_) return Status::Timeout("stream did not drain");
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  Status reserve_scratch(size_t bytes) {
    if (bytes <= scratch_bytes_) return Status::OK();
    if (scratch_ != nullptr) {
      // Work queued before may still read the old staging: wait for it, within the collective's
      // deadline (a dead peer's all-to-all would otherwise hold this wait forever).
      TUTEL_RETURN_IF_ERROR(wait_stream());
      TUTEL_NCCL_CUDA(cudaFree(scratch_));
      scratch_ = nullptr;
      scratch_bytes_ = 0;
    }
    TUTEL_NCCL_CUDA(cudaMalloc(&scratch_, bytes));
    scratch_bytes_ = bytes;
    ++scratch_epoch_;
    return Status::OK();
  }

  // Device memory: block i, piece j of `src` (laid out as `from`) to the same piece of `dst` (as
  // `to`) on the stream: a 2-D copy per block (rows = pieces, the strides as pitches), or a copy
  // per piece where a stride is past the device's largest pitch.
  Status copy_blocks_device(void* dst, const BlockLayout& to, const void* src,
                            const BlockLayout& from, int blocks) {
    auto* d = static_cast<unsigned char*>(dst);
    const auto* s = static_cast<const unsigned char*>(src);
    // A single row's pitch is never read, but must not be below its width.
    const size_t to_pitch = to.pieces > 1 ? to.piece_stride : to.piece_bytes;
    const size_t from_pitch = from.pieces > 1 ? from.piece_stride : from.piece_bytes;
    const bool two_d = to_pitch <= max_pitch_ && from_pitch <= max_pitch_;
    for (int i = 0; i < blocks; ++i) {
      unsigned char* block_to = d + static_cast<size_t>(i) * to.block_stride;
      const unsigned char* block_from = s + static_cast<size_t>(i) * from.block_stride;
      if (two_d) {
        TUTEL_NCCL_CUDA(cudaMemcpy2DAsync(block_to, to_pitch, block_from, from_pitch,
                                          from.piece_bytes, from.pieces, cudaMemcpyDeviceToDevice,
                                          stream_));
        continue;
      }
      for (size_t j = 0; j < from.pieces; ++j)
        TUTEL_NCCL_CUDA(cudaMemcpyAsync(block_to + j * to.piece_stride,
                                        block_from + j * from.piece_stride, from.piece_bytes,
                                        cudaMemcpyDeviceToDevice, stream_));
    }
    return Status::OK();
  }

  // See src/two_dh.hpp: T and U live in scratch; V reuses T.
  Status all_to_all_2dh(const unsigned char* send, unsigned char* recv, size_t c) {
    const detail::TwoDH g(rank(), size(), local_size());
    const size_t total = static_cast<size_t>(size()) * c;
    TUTEL_RETURN_IF_ERROR(reserve_scratch(2 * total));
    auto* t = static_cast<unsigned char*>(scratch_);
    unsigned char* u = t + total;

    TUTEL_RETURN_IF_ERROR(transpose_chunks_device(t, send, g.nodes, g.local_size, c, max_pitch_, stream_));
    const size_t b1 = g.phase1_bytes(c);
    // Phase 1 is only enqueued (no stream wait): stream order puts it before the next copy.
    const bool synchronize = std::exchange(options_.synchronize, false);
    Status s = grouped([&]() -> Status {
      for (int j = 0; j < g.local_size; ++j) {
        TUTEL_NCCL(ncclSend(t + j * b1, b1, ncclInt8, g.phase1_peer(j), comm_, stream_), comm_);
        TUTEL_NCCL(ncclRecv(u + j * b1, b1, ncclInt8, g.phase1_peer(j), comm_, stream_), comm_);
      }
      return Status::OK();
    });
    options_.synchronize = synchronize;
    TUTEL_RETURN_IF_ERROR(s);

    unsigned char* v = t;
    TUTEL_RETURN_IF_ERROR(transpose_chunks_device(v, u, g.local_size, g.nodes, c, max_pitch_, stream_));
    const size_t b2 = g.phase2_bytes(c);
    return grouped([&]() -> Status {
      for (int m = 0; m < g.nodes; ++m) {
        TUTEL_NCCL(ncclSend(v + m * b2, b2, ncclInt8, g.phase2_peer(m), comm_, stream_), comm_);
        TUTEL_NCCL(ncclRecv(recv + m * b2, b2, ncclInt8, g.phase2_peer(m), comm_, stream_), comm_);
      }
      return Status::OK();
    });
  }

  ncclComm_t comm_;
  Shape shape_;
  NcclOptions options_;
  std::chrono::milliseconds timeout_;
  cudaStream_t stream_;
  bool own_stream_ = false;
  cudaEvent_t done_ = nullptr;
  size_t max_pitch_ = 0;  // cudaDevAttrMaxPitch: the largest stride of a 2-D copy
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* pinned_ = nullptr;  // host staging of host_all_gather (cudaMallocHost)
  size_t pinned_bytes_ = 0;
  uint64_t scratch_epoch_ = 0;  // moves with every reallocation of scratch_
  const char* what_ = "";
  Clock::time_point deadline_;
  Status broken_;
  bool abort_pending_ = false;  // failed while stream_ was captured: abort once it is not
  // For peers(), read from any thread.
  mutable std::mutex failure_mu_;
  std::string failure_text_;
  std::atomic<uint64_t> bytes_per_peer_{0};  // payload each peer was addressed (symmetric)
  uint64_t captured_bytes_per_peer_ = 0;      // issued into graph captures (captured_traffic)
  std::map<uint64_t, std::function<void()>> graph_releases_;
  uint64_t graph_release_ids_ = 0;

  void release_graphs() {
    for (auto& [id, release] : graph_releases_) release();
  }

  // The abort sets NCCL's abort flag, so that kernels of this communicator still running (a
  // launched graph's too) return, then waits for every graph that captured its collectives to
  // be destroyed: those are released first (an in-flight one is freed when it completes).
  void abort() {
    release_graphs();
    ncclCommAbort(comm_);
    comm_ = nullptr;
    abort_pending_ = false;
  }

  // Whether stream_ is in a capture (active or invalidated); a failed query counts as one, so
  // that the abort waits for begin() or the destructor rather than risk the capture's hang.
  bool capturing() const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &status) != cudaSuccess) {
      (void)cudaGetLastError();
      return true;
    }
    return status != cudaStreamCaptureStatusNone;
  }

  void add_traffic(size_t bytes_per_peer) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &capture) != cudaSuccess) (void)cudaGetLastError();
    // Active or invalidated: nothing moves now; a launch of the graph is counted by its caller.
    if (capture != cudaStreamCaptureStatusNone) {
      captured_bytes_per_peer_ += bytes_per_peer;
      return;
    }
    bytes_per_peer_.fetch_add(bytes_per_peer, std::memory_order_relaxed);
  }
};

Result<std::unique_ptr<Communicator>> init_from_id(const ncclUniqueId& id, int rank, int size,
                                                   int local_size, const NcclOptions& options,
                                                   Clock::time_point deadline,
                                                   std::chrono::milliseconds timeout) {
  TUTEL_NCCL_CUDA(cudaSetDevice(options.device));
  ncclComm_t comm = nullptr;
  ncclConfig_t config = nonblocking_config();
  if (const ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
      r != ncclSuccess && r != ncclInProgress) {
    Status s = nccl_failure(r, "ncclCommInitRankConfig", comm);
    if (comm != nullptr) ncclCommAbort(comm);  // a handle NCCL made before it failed
    return s;
  }
  if (Status s = wait_comm(comm, deadline, options.abandon.get()); !s.ok()) {
    ncclCommAbort(comm);
    if (s.code() == StatusCode::kTimeout)
      return Status::Timeout("NCCL communicator creation (rank " + std::to_string(rank) + " of " +
                             std::to_string(size) +
                             ") did not finish in time; a rank is "
                             "missing or cannot reach the others");
    return s;
  }
  NcclCommunicator::Shape shape;
  shape.rank = rank;
  shape.size = size;
  shape.local_size = local_size;
  shape.world_local_size = local_size;
  for (int p = 0; p < size; ++p) shape.members.push_back(p);
  auto created = NcclCommunicator::create(comm, std::move(shape), options, timeout);
  if (!created.ok()) {
    ncclCommAbort(comm);
    return std::move(created).status();
  }
  return std::unique_ptr<Communicator>(std::move(created).value());
}

}  // namespace

bool nccl_available() { return true; }

Result<std::unique_ptr<Communicator>> nccl_bootstrap(const BootstrapOptions& options,
                                                     const NcclOptions& nccl) {
  TUTEL_RETURN_IF_ERROR(validate(options));
  const auto deadline = Clock::now() + options.timeout;
  std::string payload;
  if (options.rank == 0) {
    ncclUniqueId id;
    TUTEL_NCCL(ncclGetUniqueId(&id), nullptr);
    payload.assign(reinterpret_cast<const char*>(&id), sizeof id);
  }
  TUTEL_ASSIGN_OR_RETURN(BootstrapTable table, coordinator_exchange(options, "nccl", payload));
  if (table.payloads[0].size() != sizeof(ncclUniqueId))
    return Status::Corruption("bootstrap: rank 0 sent no NCCL unique id");
  ncclUniqueId id;
  std::memcpy(&id, table.payloads[0].data(), sizeof id);
  NcclOptions with_abandon = nccl;
  if (!with_abandon.abandon) with_abandon.abandon = options.abandon;
  return init_from_id(id, options.rank, options.size, options.local_size, with_abandon,
                      std::max(deadline, Clock::now() + options.collective_timeout),
                      options.collective_timeout);
}

Result<std::unique_ptr<Communicator>> nccl_from_host(Communicator& host, const NcclOptions& nccl,
                                                     std::chrono::milliseconds collective_timeout) {
  ncclUniqueId id{};
  if (host.rank() == 0) TUTEL_NCCL(ncclGetUniqueId(&id), nullptr);
  std::vector<ncclUniqueId> all(static_cast<size_t>(host.size()));
  TUTEL_RETURN_IF_ERROR(
      host.all_gather(&id, all.data(), sizeof id).with_context("sharing the NCCL unique id"));
  return init_from_id(all[0], host.rank(), host.size(), host.local_size(), nccl,
                      Clock::now() + collective_timeout, collective_timeout);
}

}  // namespace tutel::comm
