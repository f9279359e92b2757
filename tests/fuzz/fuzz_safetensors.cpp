// libFuzzer target: the safetensors reader (core/src/safetensors.cpp), which reads weights files
// named in configs and requests, checkpoints a client asks to load, and state_dir on restart.
//
// SafetensorsFile::open only reads paths, so each input is written to one memfd and opened as
// /proc/self/fd/N (a regular file to fstat and mmap); SafetensorsFile::read copies the same memfd
// through its descriptor, and SafetensorsFile::map_sealed maps a sealed copy of it: both must
// agree with open() on every input.
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
  // A sealed memfd (ImportState's other path) is mapped in place; its own descriptor each time,
  // since a sealed memfd cannot be truncated for the next input.
  const int sealed = ::memfd_create("fuzz.sealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  FUZZ_CHECK(sealed >= 0);
  FUZZ_CHECK(::pwrite(sealed, file.data(), file.size(), 0) == static_cast<ssize_t>(file.size()));
  FUZZ_CHECK(::fcntl(sealed, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) == 0);
  Result<SafetensorsFile> mapped = SafetensorsFile::map_sealed(sealed, path, uint64_t{1} << 30);
  ::close(sealed);  // a mapping outlives its descriptor
  for (const Result<SafetensorsFile>* other : {&copied, &mapped}) {
    FUZZ_CHECK(other->ok() == opened.ok());
    if (!opened.ok()) {
      FUZZ_CHECK(other->status().code() == opened.status().code());
      continue;
    }
    const SafetensorsFile& f = *opened;
    FUZZ_CHECK((*other)->tensors().size() == f.tensors().size());
    FUZZ_CHECK((*other)->metadata() == f.metadata());
    for (size_t i = 0; i < f.tensors().size(); ++i) {
      const SafetensorsTensor &a = f.tensors()[i], &b = (*other)->tensors()[i];
      FUZZ_CHECK(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.nbytes == b.nbytes);
      FUZZ_CHECK(a.nbytes == 0 || std::memcmp(a.data, b.data, a.nbytes) == 0);
    }
  }
  if (!opened.ok()) {
    const StatusCode c = opened.status().code();
    FUZZ_CHECK(c == StatusCode::kCorruption || c == StatusCode::kResourceExhausted);
    return 0;
  }
  const SafetensorsFile& f = *opened;
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
