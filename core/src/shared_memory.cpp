#include "tutel/core/shared_memory.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace tutel {
namespace {

// Linux ≥ 6.3 warns about memfds created without an exec policy; older kernels reject the flag.
constexpr unsigned kMfdNoexecSeal = 0x0008U;
constexpr int kRequiredSeals = F_SEAL_SHRINK | F_SEAL_GROW;

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) reset(o.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0 && fd_ != fd) ::close(fd_);
  fd_ = fd;
}

int UniqueFd::close() {
  const int fd = release();
  return (fd >= 0 && ::close(fd) != 0) ? errno : 0;
}

size_t page_bytes() {
  static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

SharedMemory& SharedMemory::operator=(SharedMemory&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = std::move(o.fd_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

SharedMemory::~SharedMemory() { unmap(); }

void SharedMemory::discard_pages() {
  // MADV_REMOVE punches the pages out of the file (the mapping is shared and writable), as
  // fallocate(PUNCH_HOLE) would through a descriptor this side may no longer hold.
  if (data_ != nullptr) (void)::madvise(data_, bytes_, MADV_REMOVE);
}

void SharedMemory::unmap() noexcept {
  if (data_ == nullptr) return;
  ::munmap(data_, bytes_);
  data_ = nullptr;
  bytes_ = 0;
}

Result<UniqueFd> create_memfd(std::string_view what) {
  const std::string name(what);
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING | kMfdNoexecSeal));
  if (!fd.valid() && errno == EINVAL) fd.reset(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Status::IOError("memfd_create for the " + name + ": " + errno_text(errno));
  return fd;
}

Result<SharedMemory> SharedMemory::create(size_t bytes, std::string_view what) {
  const std::string name(what);
  if (bytes == 0) return Status::InvalidArgument(name + " must not be empty");
  const size_t page = page_bytes();
  if (bytes > (size_t{1} << 46)) return Status::InvalidArgument(name + " of " + std::to_string(bytes) + " bytes is too large");
  const size_t size = (bytes + page - 1) / page * page;
  TUTEL_ASSIGN_OR_RETURN(UniqueFd fd, create_memfd(what));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return Status::ResourceExhausted("cannot size the " + name + " to " + std::to_string(size) + " bytes: " + errno_text(errno));
  // F_SEAL_SEAL stops the receiver from adding seals of its own (e.g. F_SEAL_FUTURE_WRITE).
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return Status::IOError("sealing the " + name + ": " + errno_text(errno));
  return map(std::move(fd), size, "the " + name);
}

Status check_memory_file(int fd, std::string_view what) {
  const std::string name(what);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::InvalidArgument(name + ": " + errno_text(errno));
  struct statfs fs {};
  if (!S_ISREG(st.st_mode) || ::fstatfs(fd, &fs) != 0 || fs.f_type != TMPFS_MAGIC)
    return Status::InvalidArgument(name + " is not a memfd (a regular file in memory, tmpfs; not hugetlb): " +
                                   "make one with memfd_create");
  return Status::OK();
}

Result<uint64_t> first_hole(int fd) {
  const off_t at = ::lseek(fd, 0, SEEK_CUR);
  if (at < 0) return Status::InvalidArgument(std::string("cannot look for holes: ") + errno_text(errno));
  const off_t hole = ::lseek(fd, 0, SEEK_HOLE);
  const int err = errno;
  (void)::lseek(fd, at, SEEK_SET);  // the offset is shared with whoever sent the descriptor
  if (hole < 0) return Status::InvalidArgument(std::string("cannot look for holes: ") + errno_text(err));
  return static_cast<uint64_t>(hole);
}

Result<SharedMemory> SharedMemory::attach(UniqueFd fd, std::string_view what, size_t expected_bytes) {
  const std::string name(what);
  if (!fd.valid()) return Status::InvalidArgument(name + " is not a valid descriptor");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::IOError("fstat on " + name + ": " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(name + " is not a memfd (not a regular file)");
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0)
    return Status::InvalidArgument(name + " does not support seals (not a memfd): " + errno_text(errno));
  if ((seals & kRequiredSeals) != kRequiredSeals) {
    return Status::PermissionDenied(name + " is not sealed against shrink and grow; refusing to map it (the peer "
                                    "could truncate it and crash this process with SIGBUS)");
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size != expected_bytes)
    return Status::InvalidArgument(name + " holds " + std::to_string(size) + " bytes, not the " +
                                   std::to_string(expected_bytes) + " announced; refusing to map it");
  if (size == 0 || size % page_bytes() != 0)
    return Status::InvalidArgument(name + " holds " + std::to_string(size) + " bytes, not a whole number of " +
                                   std::to_string(page_bytes()) + "-byte pages");
  return map(std::move(fd), size, name);
}

Result<SharedMemory> SharedMemory::map(UniqueFd fd, size_t size, const std::string& what) {
  // MAP_POPULATE faults every page in now, once, instead of on the data path: a request that
  // touches fresh pages would otherwise pay a page fault per 4 KiB.
  void* data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (data == MAP_FAILED)
    return Status::ResourceExhausted("mapping " + what + " of " + std::to_string(size) + " bytes: " + errno_text(errno));
  SharedMemory m;
  m.fd_ = std::move(fd);
  m.data_ = static_cast<uint8_t*>(data);
  m.bytes_ = size;
  return m;
}

}  // namespace tutel
