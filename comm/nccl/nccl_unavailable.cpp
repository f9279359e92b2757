// nccl.hpp in a build without CUDA or NCCL: the functions exist and say why they cannot work.
#include "tutel/comm/nccl.hpp"

namespace tutel::comm {
namespace {
Status unavailable() {
  return Status::Unimplemented(
      "this tuteld was built without NCCL (TUTEL_CUDA=OFF or libnccl not found); use the UCX "
      "communicator for host memory, or rebuild with CUDA and NCCL");
}
}  // namespace

bool nccl_available() { return false; }

Result<std::unique_ptr<Communicator>> nccl_bootstrap(const BootstrapOptions&, const NcclOptions&) {
  return unavailable();
}

Result<std::unique_ptr<Communicator>> nccl_from_host(Communicator&, const NcclOptions&,
                                                     std::chrono::milliseconds) {
  return unavailable();
}

}  // namespace tutel::comm
