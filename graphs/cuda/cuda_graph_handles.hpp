// Owning handles of CUDA graphs and their executables, for the graphs/ CUDA code. Runtime API
// only (never the driver library).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <type_traits>

namespace tutel::graphs::detail {

struct GraphDeleter {
  void operator()(cudaGraph_t g) const { (void)cudaGraphDestroy(g); }
};
using GraphPtr = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDeleter>;

// Destroying an executable that is still in flight is allowed: it is freed when it completes.
struct ExecDeleter {
  void operator()(cudaGraphExec_t e) const { (void)cudaGraphExecDestroy(e); }
};
using ExecPtr = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, ExecDeleter>;

}  // namespace tutel::graphs::detail
