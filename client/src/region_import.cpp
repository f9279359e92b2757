#include "region_import.hpp"

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <utility>

namespace tutel::client::internal {
namespace {

// The few CUDA runtime entry points a cuda_ipc import needs, resolved at run time. The types
// mirror cuda_runtime_api.h: cudaError_t is an int-sized enum, cudaIpcMemHandle_t a 64-byte
// struct passed by value.
struct IpcMemHandle {
  char reserved[64];
};
constexpr unsigned kIpcMemLazyEnablePeerAccess = 0x01;

struct CudaRuntime {
  int (*get_device)(int*) = nullptr;
  int (*set_device)(int) = nullptr;
  int (*device_get_by_pci_bus_id)(int*, const char*) = nullptr;
  int (*ipc_open_mem_handle)(void**, IpcMemHandle, unsigned) = nullptr;
  int (*ipc_close_mem_handle)(void*) = nullptr;
  int (*get_last_error)() = nullptr;
  const char* (*get_error_string)(int) = nullptr;
  std::string error;  // why it could not be loaded ("" when it was)
};

template <typename F>
bool resolve(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(::dlsym(lib, name));
  return *out != nullptr;
}

const CudaRuntime& cuda_runtime() {
  static const CudaRuntime runtime = [] {
    CudaRuntime rt;
    void* lib = nullptr;
    // A runtime this process already loaded (a PyTorch trainer's) first, so no second one comes
    // next to it; else the soname the daemon was built with, then older and unversioned ones:
    // IPC handles are the driver's, so any runtime opens them.
    constexpr const char* kNames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
    for (const char* name : kNames)
      if ((lib = ::dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) != nullptr) break;
    for (const char* name : kNames) {
      if (lib != nullptr) break;
      lib = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == nullptr) {
      rt.error = "the CUDA runtime (libcudart.so) cannot be loaded in this process; install it or add its "
                 "directory to LD_LIBRARY_PATH";
      return rt;
    }
    const bool ok = resolve(lib, "cudaGetDevice", &rt.get_device) && resolve(lib, "cudaSetDevice", &rt.set_device) &&
                    resolve(lib, "cudaDeviceGetByPCIBusId", &rt.device_get_by_pci_bus_id) &&
                    resolve(lib, "cudaIpcOpenMemHandle", &rt.ipc_open_mem_handle) &&
                    resolve(lib, "cudaIpcCloseMemHandle", &rt.ipc_close_mem_handle) &&
                    resolve(lib, "cudaGetLastError", &rt.get_last_error) &&
                    resolve(lib, "cudaGetErrorString", &rt.get_error_string);
    if (!ok) rt.error = "the CUDA runtime loaded lacks the IPC entry points (cudaIpcOpenMemHandle)";
    return rt;  // the library stays loaded for the process's life
  }();
  return runtime;
}

// The failure as a Status; the runtime's last error is cleared, so that the host application (a
// PyTorch trainer) does not later see an error of ours as its own.
Status cuda_failure(const CudaRuntime& rt, int err, const std::string& call) {
  (void)rt.get_last_error();
  return Status::Unavailable(call + " failed: " + rt.get_error_string(err) + " (CUDA error " + std::to_string(err) + ")");
}

}  // namespace

ImportedMemory& ImportedMemory::operator=(ImportedMemory&& o) noexcept {
  if (this != &o) {
    reset();
    host_ = std::move(o.host_);
    cuda_ = std::exchange(o.cuda_, nullptr);
    cuda_device_ = std::exchange(o.cuda_device_, -1);
    data_ = std::exchange(o.data_, nullptr);
  }
  return *this;
}

void ImportedMemory::reset() {
  if (cuda_ != nullptr) {
    // A mapping is closed on the device that opened it: switch there and back, as open() did,
    // whatever device the caller has made current since; then leave no error of ours behind.
    const CudaRuntime& rt = cuda_runtime();
    int previous = -1;
    const int got = rt.get_device(&previous);
    const int switched = got == 0 && previous != cuda_device_ ? rt.set_device(cuda_device_) : -1;
    const int closed = rt.ipc_close_mem_handle(cuda_);
    const int restored = switched == 0 ? rt.set_device(previous) : 0;
    // Cleared only where a call of ours failed: an error pending before, from the host
    // application's own launches, stays for it to see.
    if (got != 0 || switched > 0 || closed != 0 || restored != 0) (void)rt.get_last_error();
  }
  cuda_ = nullptr;
  cuda_device_ = -1;
  host_ = SharedMemory();
  data_ = nullptr;
}

Result<ImportedMemory> ImportedMemory::open(const std::string& kind, const std::string& handle, UniqueFd fd,
                                            const std::string& device_id, size_t bytes) {
  ImportedMemory m;
  if (kind == "host_memfd") {
    if (!fd.valid()) return Status::Corruption("tuteld sent a host_memfd device region without its memfd");
    // The daemon's memfd is the region rounded up to whole pages (SharedMemory::create).
    const size_t page = page_bytes();
    if (bytes == 0 || bytes > (size_t{1} << 46))
      return Status::Corruption("tuteld announced a device region of " + std::to_string(bytes) + " bytes");
    const size_t expected = (bytes + page - 1) / page * page;
    Result<SharedMemory> host = SharedMemory::attach(std::move(fd), "the device region's memfd", expected);
    if (!host.ok())
      return host.status().code() == StatusCode::kInvalidArgument
                 ? Status::Corruption(std::string(host.status().message()) + " (tuteld sent it)")
                 : host.status();
    m.host_ = std::move(*host);
    m.data_ = m.host_.data();
    return m;
  }
  if (kind == "cuda_ipc") {
    if (handle.size() != sizeof(IpcMemHandle))
      return Status::Corruption("tuteld sent a cuda_ipc handle of " + std::to_string(handle.size()) +
                                " bytes; a cudaIpcMemHandle_t has " + std::to_string(sizeof(IpcMemHandle)));
    const CudaRuntime& rt = cuda_runtime();
    if (!rt.error.empty()) return Status::Unavailable(rt.error + "; it is needed to map a GPU device region");
    int device = -1, previous = -1;
    if (int err = rt.device_get_by_pci_bus_id(&device, device_id.c_str()); err != 0)
      return cuda_failure(rt, err, "cudaDeviceGetByPCIBusId(\"" + device_id +
                                       "\") (is that GPU hidden from this process by CUDA_VISIBLE_DEVICES?)");
    // The mapping is made on the current device: switch to the daemon's GPU for it and back, so
    // the caller's current device is left as it was.
    if (int err = rt.get_device(&previous); err != 0) return cuda_failure(rt, err, "cudaGetDevice");
    if (int err = rt.set_device(device); err != 0) return cuda_failure(rt, err, "cudaSetDevice");
    IpcMemHandle h;
    std::memcpy(&h, handle.data(), sizeof h);
    void* p = nullptr;
    const int err = rt.ipc_open_mem_handle(&p, h, kIpcMemLazyEnablePeerAccess);
    if (int restored = rt.set_device(previous); restored != 0 && err == 0) {
      (void)rt.ipc_close_mem_handle(p);
      return cuda_failure(rt, restored, "cudaSetDevice (back to the caller's device)");
    }
    if (err != 0) return cuda_failure(rt, err, "cudaIpcOpenMemHandle");
    m.cuda_ = p;
    m.cuda_device_ = device;
    m.data_ = p;
    return m;
  }
  return Status::Unimplemented("tuteld exported a device region of kind '" + kind +
                               "', which this client cannot map (it knows host_memfd and cuda_ipc); upgrade "
                               "libtutel_client");
}

Result<std::string> parse_hex(const std::string& hex, const char* what) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return Status::Corruption(std::string(what) + " has an odd number of hex digits");
  std::string out(hex.size() / 2, '\0');
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status::Corruption(std::string(what) + " is not a hex string");
    out[i] = static_cast<char>(hi << 4 | lo);
  }
  return out;
}

}  // namespace tutel::client::internal
