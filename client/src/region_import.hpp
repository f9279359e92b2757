// Maps a device region the daemon exported (FrameType::kMapRegion's reply) into this process.
//
// "host_memfd": the memfd the reply carried, mapped shared (the CPU backend's memory).
// "cuda_ipc": a cudaIpcMemHandle_t opened with cudaIpcOpenMemHandle on the GPU the daemon names
// by PCI bus id. libtutel_client does not link the CUDA runtime (it must load on machines
// without one): the runtime is loaded with dlopen on first use, or found already loaded (a
// PyTorch process has it).
// Thread-safety: an ImportedMemory belongs to one owner; imports may run on any thread.
#pragma once

#include <cstddef>
#include <string>

#include "tutel/core/shared_memory.hpp"
#include "tutel/core/status.hpp"

namespace tutel::client::internal {

class ImportedMemory {
 public:
  ImportedMemory() = default;
  ImportedMemory(ImportedMemory&& o) noexcept { *this = std::move(o); }
  ImportedMemory& operator=(ImportedMemory&& o) noexcept;
  ImportedMemory(const ImportedMemory&) = delete;
  ImportedMemory& operator=(const ImportedMemory&) = delete;
  ~ImportedMemory() { reset(); }

  // `kind`, `handle` (raw bytes) and `device_id` as the daemon sent them; `fd` for host_memfd;
  // at least `bytes` must be mapped.
  static Result<ImportedMemory> open(const std::string& kind, const std::string& handle, UniqueFd fd,
                                     const std::string& device_id, size_t bytes);

  void* data() const { return data_; }
  // Unmaps (closes the IPC mapping) now.
  void reset();

 private:
  SharedMemory host_;      // host_memfd
  void* cuda_ = nullptr;   // cuda_ipc: the pointer cudaIpcOpenMemHandle gave
  int cuda_device_ = -1;   // cuda_ipc: the device it was opened on (closed on the same one)
  void* data_ = nullptr;
};

// Parses the hex string of a handle ("a1b2...") into its bytes.
Result<std::string> parse_hex(const std::string& hex, const char* what);

}  // namespace tutel::client::internal
