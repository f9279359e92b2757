// GraphCapture on a CUDA stream (phase_runner.hpp): thread-local capture mode, so other threads
// (other executors, other layers' groups) may keep allocating while this one records; the NCCL
// calls a phase enqueues on the stream become nodes of the graph (NCCL >= 2.9).
//
// UNTESTED on a device: the development machines have no GPU. The runner's policy around it is
// tested on the CPU with a recording backend (tests/graphs/expert_parallel_device_test.cpp).
// Never links the driver library: runtime API only.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <type_traits>

#include "cuda/cuda_graph_handles.hpp"
#include "tutel/graphs/phase_runner.hpp"

namespace tutel::graphs {
namespace {

Status cuda_failure(cudaError_t err, const char* expr) {
  // The launchers of later ops return cudaGetLastError(): leave no stale error for them.
  (void)cudaGetLastError();
  std::string msg = std::string(expr) + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(std::move(msg));
  return Status::Internal(std::move(msg));
}

#define CAPTURE_CUDA_CHECK(expr)                                               \
  do {                                                                         \
    const cudaError_t _capture_err = (expr);                                   \
    if (_capture_err != cudaSuccess) return cuda_failure(_capture_err, #expr); \
  } while (0)

using detail::ExecPtr;
using detail::GraphPtr;

class CudaGraph final : public CapturedGraph {
 public:
  CudaGraph(ExecPtr exec, cudaStream_t stream, int device)
      : exec_(std::move(exec)), stream_(stream), device_(device) {}
  Status launch() override {
    // The calling thread may serve layers on several devices.
    CAPTURE_CUDA_CHECK(cudaSetDevice(device_));
    CAPTURE_CUDA_CHECK(cudaGraphLaunch(exec_.get(), stream_));
    return Status::OK();
  }

 private:
  ExecPtr exec_;
  cudaStream_t stream_;
  int device_;
};

class CudaGraphCapture final : public GraphCapture {
 public:
  CudaGraphCapture(cudaStream_t stream, int device) : stream_(stream), device_(device) {}

  Status begin() override {
    CAPTURE_CUDA_CHECK(cudaSetDevice(device_));
    CAPTURE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    return Status::OK();
  }

  Result<std::unique_ptr<CapturedGraph>> end() override {
    cudaGraph_t raw = nullptr;
    // Always ends the capture, also when an op failed inside it (the stream leaves capture
    // mode; the partial graph is destroyed here).
    const cudaError_t ended = cudaStreamEndCapture(stream_, &raw);
    GraphPtr graph(raw);
    CAPTURE_CUDA_CHECK(ended);
    if (!graph) return Status::Internal("stream capture returned no graph");
    cudaGraphExec_t exec = nullptr;
    CAPTURE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
    return std::unique_ptr<CapturedGraph>(new CudaGraph(ExecPtr(exec), stream_, device_));
  }

 private:
  cudaStream_t stream_;
  int device_;
};

}  // namespace

std::unique_ptr<PhaseRunner> make_phase_runner(Backend& backend, size_t max_graphs) {
  void* stream = backend.native_stream();
  if (stream == nullptr) return std::make_unique<EagerPhaseRunner>();
  return std::make_unique<GraphPhaseRunner>(
      std::make_unique<CudaGraphCapture>(static_cast<cudaStream_t>(stream), backend.device().index),
      max_graphs);
}

}  // namespace tutel::graphs
