#include "instance_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace tutel::daemon {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

// The pid the holder wrote, or "" when the file says nothing usable.
std::string holder_pid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return "";
  std::string text(buf, static_cast<size_t>(n));
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) return "";
  return text;
}

}  // namespace

Result<InstanceLock> InstanceLock::acquire(const std::string& path, const std::string& what) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd.valid())
    return Status::IOError("cannot open the lock file " + path + " (for " + what + "): " + errno_text(errno) +
                           "; check the permissions of its directory");
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno != EWOULDBLOCK)
      return Status::IOError("cannot lock " + path + " (for " + what + "): " + errno_text(errno));
    const std::string pid = holder_pid(fd.get());
    return Status::AlreadyExists("another tuteld" + (pid.empty() ? std::string() : " (pid " + pid + ")") +
                                 " is running with " + what + " (it holds " + path +
                                 "); stop it, or give this one other paths");
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  // For the next daemon's message only: a failure here costs nothing but that.
  if (::ftruncate(fd.get(), 0) == 0) (void)!::pwrite(fd.get(), pid.data(), pid.size(), 0);
  InstanceLock lock;
  lock.fd_ = std::move(fd);
  lock.path_ = path;
  return lock;
}

}  // namespace tutel::daemon
