// The NCCL communicator. Without NCCL in the build: every entry point says so. With NCCL: the
// same checks as for UCX, one forked process per CUDA device (up to 4), through an adapter that
// stages host buffers to the device; skipped where no device exists (the development machines).
#include "tutel/comm/nccl.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "comm_test_util.hpp"

#ifdef TUTEL_TEST_NCCL
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <unistd.h>

#include "collective_checks.hpp"
#endif

namespace tutel::comm {
namespace {

TEST(Nccl, EntryPointsSayWhenNcclIsMissing) {
  if (nccl_available()) GTEST_SKIP() << "this build has NCCL";
  auto r = nccl_bootstrap(testing::loopback_options(1234, 0, 2, 1), NcclOptions{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(r.status().message().find("without NCCL"), std::string_view::npos);
}

#ifdef TUTEL_TEST_NCCL

// Host-buffer collectives over a device communicator: copy in, run, copy out.
class StagedCommunicator final : public Communicator {
 public:
  explicit StagedCommunicator(std::unique_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  ~StagedCommunicator() override {
    cudaFree(a_);
    cudaFree(b_);
  }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  int local_size() const override { return inner_->local_size(); }

  using Communicator::all_to_all;
  // The layouts' whole extents travel, so the device buffers hold the same layouts.
  Status all_to_all(const void* send, const BlockLayout& from, void* recv, const BlockLayout& to,
                    AllToAllAlgo algo) override {
    const size_t in = from.extent(size()), out = to.extent(size());
    TUTEL_RETURN_IF_ERROR(stage(send, in, out));
    TUTEL_RETURN_IF_ERROR(back_fill(recv, out));
    TUTEL_RETURN_IF_ERROR(inner_->all_to_all(a_, from, b_, to, algo));
    return back(recv, out);
  }
  Status all_gather(const void* send, void* recv, size_t bytes) override {
    TUTEL_RETURN_IF_ERROR(stage(send, bytes, bytes * size()));
    TUTEL_RETURN_IF_ERROR(inner_->all_gather(a_, b_, bytes));
    return back(recv, bytes * size());
  }
  Status reduce_scatter(const float* send, float* recv, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(stage(send, count * size() * sizeof(float), count * sizeof(float)));
    TUTEL_RETURN_IF_ERROR(
        inner_->reduce_scatter(static_cast<float*>(a_), static_cast<float*>(b_), count, op));
    return back(recv, count * sizeof(float));
  }
  Status all_reduce(float* data, size_t count, ReduceOp op) override {
    return reduce_in_place(data, count, op);
  }
  Status all_reduce(int64_t* data, size_t count, ReduceOp op) override {
    return reduce_in_place(data, count, op);
  }
  Status barrier() override { return inner_->barrier(); }
  void give_up(const Status& why) override { inner_->give_up(why); }
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> child, inner_->split(color, key));
    if (!child) return std::unique_ptr<Communicator>();
    return std::unique_ptr<Communicator>(std::make_unique<StagedCommunicator>(std::move(child)));
  }
  std::vector<PeerStatus> peers() const override { return inner_->peers(); }

 private:
  template <typename T>
  Status reduce_in_place(T* data, size_t count, ReduceOp op) {
    TUTEL_RETURN_IF_ERROR(stage(data, count * sizeof(T), 0));
    TUTEL_RETURN_IF_ERROR(inner_->all_reduce(static_cast<T*>(a_), count, op));
    if (cudaMemcpy(data, a_, count * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess)
      return Status::Internal("cudaMemcpy");
    return Status::OK();
  }
  Status stage(const void* host, size_t in_bytes, size_t out_bytes) {
    if (in_bytes + 1 > a_bytes_) {
      cudaFree(a_);
      if (cudaMalloc(&a_, in_bytes + 1) != cudaSuccess) return Status::Internal("cudaMalloc");
      a_bytes_ = in_bytes + 1;
    }
    if (out_bytes + 1 > b_bytes_) {
      cudaFree(b_);
      if (cudaMalloc(&b_, out_bytes + 1) != cudaSuccess) return Status::Internal("cudaMalloc");
      b_bytes_ = out_bytes + 1;
    }
    if (cudaMemcpy(a_, host, in_bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      return Status::Internal("cudaMemcpy");
    return landed();
  }
  // A copy from pageable memory may return before its DMA is done, and NCCL's stream is not
  // ordered after the legacy stream's: what the collective reads or leaves alone must be there.
  static Status landed() {
    return cudaDeviceSynchronize() == cudaSuccess ? Status::OK() : Status::Internal("cudaDeviceSynchronize");
  }
  // The receive buffer as it is, so what the collective leaves alone comes back unchanged.
  Status back_fill(const void* host, size_t bytes) {
    if (cudaMemcpy(b_, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      return Status::Internal("cudaMemcpy");
    return landed();
  }
  Status back(void* host, size_t bytes) {
    if (cudaMemcpy(host, b_, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
      return Status::Internal("cudaMemcpy");
    return Status::OK();
  }

  std::unique_ptr<Communicator> inner_;
  void* a_ = nullptr;
  void* b_ = nullptr;
  size_t a_bytes_ = 0, b_bytes_ = 0;
};

// Counts devices in a child, so this process never initialises CUDA before forking ranks.
int device_count_in_child() {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    ::_exit(n > 100 ? 100 : n);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 0;
}

TEST(Nccl, CollectivesOnEveryDevice) {
  const int devices = device_count_in_child();
  if (devices == 0) GTEST_SKIP() << "no CUDA device: the NCCL communicator is compiled, not run";
  const int size = devices >= 4 ? 4 : devices;
  const int local_size = size % 2 == 0 ? 2 : 1;
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(size, [&](int rank, const testing::ChildChannel&) -> std::string {
    NcclOptions nccl;
    nccl.device = rank;
    auto comm = nccl_bootstrap(testing::loopback_options(port, rank, size, local_size), nccl);
    if (!comm.ok()) return "nccl_bootstrap: " + comm.status().to_string();
    StagedCommunicator staged(std::move(comm).value());
    std::string report = testing::check_collectives(staged, {12, 4096, 1 << 20});
    return report + testing::check_split_even_odd(staged);
  });
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

// A collective that fails while the communicator's stream is being captured into a CUDA graph
// (here: a synchronising communicator, whose wait for the stream the capture refuses) is an
// error, then the communicator is broken, and its destructor returns. Aborting it inside the
// capture would wait for the graph being captured to be destroyed: forever. The rank runs in
// a child with a guard alarm, so a hang fails the test instead of stalling the suite.
TEST(Nccl, AFailureInsideACaptureIsAnErrorNotAHang) {
  if (device_count_in_child() == 0)
    GTEST_SKIP() << "no CUDA device: the NCCL communicator is compiled, not run";
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(
      1,
      [&](int rank, const testing::ChildChannel&) -> std::string {
        cudaStream_t stream = nullptr;
        float* data = nullptr;
        if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
            cudaMalloc(reinterpret_cast<void**>(&data), 64 * sizeof(float)) != cudaSuccess)
          return "CUDA set-up failed";
        NcclOptions nccl;
        nccl.stream = stream;
        nccl.synchronize = true;
        auto comm = nccl_bootstrap(testing::loopback_options(port, rank, 1, 1), nccl);
        if (!comm.ok()) return "nccl_bootstrap: " + comm.status().to_string();
        std::string report;
        if (Status s = (*comm)->all_reduce(data, 64, ReduceOp::kSum); !s.ok())
          report += "all_reduce outside a capture failed: " + s.to_string() + "\n";
        if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess)
          return report + "cudaStreamBeginCapture failed";
        const Status inside = (*comm)->all_reduce(data, 64, ReduceOp::kSum);
        cudaGraph_t graph = nullptr;
        (void)cudaStreamEndCapture(stream, &graph);
        if (graph != nullptr) cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        if (inside.ok()) report += "a synchronising all_reduce inside a capture succeeded\n";
        const Status after = (*comm)->all_reduce(data, 64, ReduceOp::kSum);
        if (after.code() != StatusCode::kAborted)
          report += "after the failure: " + after.to_string() + ", expected Aborted\n";
        comm->reset();  // the deferred abort: must return
        cudaFree(data);
        cudaStreamDestroy(stream);
        return report;
      },
      /*guard_seconds=*/60);
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

#endif  // TUTEL_TEST_NCCL

}  // namespace
}  // namespace tutel::comm
