// libFuzzer target: the safetensors reader (core/src/safetensors.cpp), which reads weights files
// named in configs and requests, checkpoints a client asks to load, and state_dir on restart.
//
// SafetensorsFile::open only reads paths, so each input is written to one memfd and opened as
// /proc/self/fd/N (a regular file to fstat and mmap); SafetensorsFile::read copies the same memfd
// through its descriptor, and must agree with open() on every input.
// First byte even: the rest is the whole file.
// First byte odd: bytes 1-2 give a header length L (clamped to what follows); the file is the
// u64 L, then the rest. This keeps the length prefix consistent so the fuzzer works on the JSON.
// Each tensor handed out is checked against its dtype and shape and read in full (a tensor
// pointing past the mapping faults).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tutel/core/safetensors.hpp"
#include "fuzz_check.hpp"

using namespace tutel;

namespace {

int memfd() {
  static const int fd = ::memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string file;
  if (data[0] % 2 == 0) {
    file.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
  } else {
    if (size < 3) return 0;
    const size_t rest = size - 3;
    const uint64_t header = std::min<uint64_t>(data[1] | (uint64_t{data[2]} << 8), rest);
    file.assign(reinterpret_cast<const char*>(&header), 8);
    file.append(reinterpret_cast<const char*>(data) + 3, rest);
  }
  const int fd = memfd();
  FUZZ_CHECK(fd >= 0);
  FUZZ_CHECK(::ftruncate(fd, 0) == 0);
  FUZZ_CHECK(::pwrite(fd, file.data(), file.size(), 0) == static_cast<ssize_t>(file.size()));
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  Result<SafetensorsFile> opened = SafetensorsFile::open(path);
  // The reader of descriptors another process hands over (ImportState) copies the file and must
  // decide exactly as the mapping reader does.
  Result<SafetensorsFile> copied = SafetensorsFile::read(fd, path, uint64_t{1} << 30);
  FUZZ_CHECK(copied.ok() == opened.ok());
  if (!opened.ok()) {
    const StatusCode c = opened.status().code();
    FUZZ_CHECK(c == StatusCode::kCorruption || c == StatusCode::kResourceExhausted);
    FUZZ_CHECK(copied.status().code() == c);
    return 0;
  }
  const SafetensorsFile& f = *opened;
  FUZZ_CHECK(copied->tensors().size() == f.tensors().size());
  FUZZ_CHECK(copied->metadata() == f.metadata());
  for (size_t i = 0; i < f.tensors().size(); ++i) {
    const SafetensorsTensor &a = f.tensors()[i], &b = copied->tensors()[i];
    FUZZ_CHECK(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.nbytes == b.nbytes);
    FUZZ_CHECK(a.nbytes == 0 || std::memcmp(a.data, b.data, a.nbytes) == 0);
  }
  uint64_t sum = 0;
  const char* prev_end = nullptr;
  for (const SafetensorsTensor& t : f.tensors()) {
    FUZZ_CHECK(f.find(t.name) == &t);
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      FUZZ_CHECK(d >= 0);
      numel *= d;
    }
    FUZZ_CHECK(static_cast<uint64_t>(numel) * dtype_size(t.dtype) == t.nbytes);
    const char* p = static_cast<const char*>(t.data);
    if (t.nbytes > 0) {
      FUZZ_CHECK(prev_end == nullptr || p >= prev_end);  // sorted and disjoint
      prev_end = p + t.nbytes;
    }
    for (size_t i = 0; i < t.nbytes; i += 512) sum += static_cast<unsigned char>(p[i]);
    if (t.nbytes > 0) sum += static_cast<unsigned char>(p[t.nbytes - 1]);
    (void)t.view().numel();
  }
  for (const auto& [k, v] : f.metadata()) sum += k.size() + v.size();
  // Move construction and assignment keep the mapping valid.
  const size_t count = f.tensors().size();
  SafetensorsFile moved = std::move(*opened);
  FUZZ_CHECK(moved.tensors().size() == count);
  (void)sum;
  return 0;
}
