#include "tutel/core/process_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

namespace tutel {
namespace {

// The pid the holder wrote, or "" when the file says nothing usable (a pid is a positive int).
std::string holder_pid(int fd) {
  char buf[16] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf, 0);
  if (n <= 0 || n == static_cast<ssize_t>(sizeof buf)) return "";  // empty, or longer than any pid
  std::string text(buf, static_cast<size_t>(n));
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  if (text.empty() || text.size() > 10 || text.find_first_not_of("0123456789") != std::string::npos) return "";
  const long long pid = std::stoll(text);
  if (pid <= 0 || pid > std::numeric_limits<int>::max()) return "";
  return std::to_string(pid);
}

}  // namespace

Result<ProcessLock> ProcessLock::acquire(const std::string& path, Create create) {
  const int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create == Create::kIfMissing ? O_CREAT : 0);
  UniqueFd fd(::open(path.c_str(), flags, 0600));
  if (!fd.valid()) {
    const int err = errno;
    if (err == ENOENT && create == Create::kNever) return Status::NotFound("no lock file " + path);
    return Status::IOError("cannot open the lock file " + path + ": " + std::strerror(err) +
                           "; check the permissions of its directory");
  }
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno != EWOULDBLOCK) return Status::IOError("cannot lock " + path + ": " + std::strerror(errno));
    const std::string pid = holder_pid(fd.get());
    return Status::AlreadyExists(path + " is locked by another process" +
                                 (pid.empty() ? std::string() : " (pid " + pid + ")"));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  // For the next process's message only: a failure here costs nothing but that.
  if (::ftruncate(fd.get(), 0) == 0) (void)!::pwrite(fd.get(), pid.data(), pid.size(), 0);
  ProcessLock lock;
  lock.fd_ = std::move(fd);
  lock.path_ = path;
  return lock;
}

}  // namespace tutel
