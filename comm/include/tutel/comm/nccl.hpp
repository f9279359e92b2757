// The NCCL communicator: the same collectives over CUDA device memory.
//
// Every buffer passed to its collectives is device memory on `NcclOptions::device`. Calls
// enqueue on the communicator's stream and, by default, wait for it with the collective
// timeout; a timeout or an asynchronous NCCL error aborts the NCCL communicator
// (ncclCommAbort) and fails the call, never hangs. The 2DH all-to-all runs the algebra of
// comm/src/two_dh.hpp with cudaMemcpy2DAsync stride copies and grouped ncclSend/ncclRecv.
//
// Status: compiled in every CUDA build, never run on the development machines (no GPU);
// see comm/README.md. In a build without CUDA (or without NCCL) every function here returns
// kUnimplemented.
//
// Thread-safety: as Communicator.
#pragma once

#include <memory>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/comm/communicator.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm {

struct NcclOptions {
  int device = 0;  // CUDA device of this rank
  // A cudaStream_t to enqueue on (not owned); null: the communicator creates its own.
  void* stream = nullptr;
  // false: collectives only enqueue work and return (for CUDA graph capture, where the caller
  // synchronises); timeouts then apply only to communicator creation and split.
  bool synchronize = true;
  // As BootstrapOptions::abandon: raised, a waiting collective (or wait_enqueued) gives up at
  // once with kAborted and aborts the communicator. Null: never raised.
  std::shared_ptr<const std::atomic<bool>> abandon;
};

// True in a build that has NCCL.
bool nccl_available();

// Collective over the `options.size` ranks: a coordinator round named "nccl" broadcasts rank
// 0's ncclUniqueId (the bootstrap hook: every other rank's payload is empty), then
// ncclCommInitRankConfig. May follow ucx_bootstrap on the same coordinator port.
Result<std::unique_ptr<Communicator>> nccl_bootstrap(const BootstrapOptions& options,
                                                     const NcclOptions& nccl);

// Collective over `host` (e.g. a UCX communicator of the same ranks): rank 0's ncclUniqueId
// travels by host.all_gather; the new communicator has host's ranks, local_size and the
// given collective timeout.
Result<std::unique_ptr<Communicator>> nccl_from_host(Communicator& host, const NcclOptions& nccl,
                                                     std::chrono::milliseconds collective_timeout);

}  // namespace tutel::comm
