#include "toy_ranks.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace toy {
namespace {

bool send_all(int fd, const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);  // a dead peer is an error, not SIGPIPE
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= size_t(n);
  }
  return true;
}

bool recv_all(int fd, void* data, size_t bytes) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::recv(fd, p, bytes, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // 0: the peer rank exited
    p += n;
    bytes -= size_t(n);
  }
  return true;
}

// A loopback TCP port that was free a moment ago, for the group's coordinator; 0 if none.
uint16_t free_loopback_port() {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd.get() < 0 || ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    return 0;
  return ntohs(addr.sin_port);
}

// pairs[r] (r >= 1) joins rank 0 (end 0) and rank r (end 1).
std::vector<std::array<Fd, 2>> make_links(int world) {
  std::vector<std::array<Fd, 2>> pairs(static_cast<size_t>(world));
  for (int r = 1; r < world; ++r) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      std::fprintf(stderr, "train_toy: socketpair for rank %d failed: %s\n", r, std::strerror(errno));
      std::exit(1);
    }
    pairs[size_t(r)][0] = Fd(fds[0]);
    pairs[size_t(r)][1] = Fd(fds[1]);
  }
  return pairs;
}

// The links of rank r; the caller then closes every other end, so that a rank that dies shows
// up as end-of-file to its peer instead of a hang.
std::vector<Fd> take_links(std::vector<std::array<Fd, 2>>& pairs, int rank) {
  std::vector<Fd> links(pairs.size());
  if (rank == 0) {
    for (size_t r = 1; r < pairs.size(); ++r) links[r] = std::move(pairs[r][0]);
  } else {
    links[0] = std::move(pairs[size_t(rank)][1]);
  }
  return links;
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return "exited with " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by ") + strsignal(WTERMSIG(status));
  return "stopped";
}

int wait_for_ranks(std::vector<pid_t> children) {
  size_t running = children.size();
  bool failed = false;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0 && errno == EINTR) continue;
    if (pid < 0) {
      std::fprintf(stderr, "train_toy: waitpid: %s\n", std::strerror(errno));
      return 1;
    }
    size_t rank = 0;
    while (rank < children.size() && children[rank] != pid) ++rank;
    if (rank == children.size()) continue;  // not one of the ranks
    children[rank] = -1;
    --running;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
    if (!failed) {
      std::fprintf(stderr, "train_toy: rank %zu %s; stopping the other ranks\n", rank, describe_exit(status).c_str());
      for (pid_t other : children)
        if (other > 0) ::kill(other, SIGTERM);
    }
    failed = true;
  }
  return failed ? 1 : 0;
}

}  // namespace

Fd::Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

RankGroup::RankGroup(int rank, int world, uint16_t port, std::vector<Fd> links)
    : rank_(rank), world_(world), port_(port), links_(std::move(links)),
      who_("train_toy rank " + std::to_string(rank)) {}

void RankGroup::sum(std::vector<double>& v) {
  if (world_ == 1) return;
  const size_t bytes = v.size() * sizeof(double);
  bool ok = true;
  if (rank_ == 0) {
    std::vector<double> part(v.size());
    for (int r = 1; r < world_ && ok; ++r) {
      ok = recv_all(links_[r].get(), part.data(), bytes);
      for (size_t i = 0; ok && i < v.size(); ++i) v[i] += part[i];
    }
    for (int r = 1; r < world_ && ok; ++r) ok = send_all(links_[r].get(), v.data(), bytes);
  } else {
    ok = send_all(links_[0].get(), v.data(), bytes) && recv_all(links_[0].get(), v.data(), bytes);
  }
  if (!ok) {
    std::fprintf(stderr, "%s: the link to the other ranks broke (another rank failed; see its message)\n",
                 who_.c_str());
    std::exit(1);
  }
}

int launch_ranks(int world, const std::function<int(RankGroup&)>& body) {
  const uint16_t port = free_loopback_port();
  if (port == 0) {
    std::fprintf(stderr,
                 "train_toy: found no free loopback TCP port for the group's coordinator (%s); "
                 "check that 127.0.0.1 is up\n",
                 std::strerror(errno));
    return 1;
  }
  auto pairs = make_links(world);
  std::fflush(nullptr);  // or every rank would print the launcher's buffered output again
  std::vector<pid_t> children;
  const pid_t launcher = ::getpid();
  for (int r = 0; r < world; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      std::fprintf(stderr, "train_toy: fork of rank %d failed: %s\n", r, std::strerror(errno));
      for (pid_t child : children) ::kill(child, SIGTERM);
      for (pid_t child : children) ::waitpid(child, nullptr, 0);
      return 1;
    }
    if (pid == 0) {
      // A rank outliving a killed launcher would hold its group layer until the daemon's
      // collective timeout; let it die with the launcher instead.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) std::exit(1);
      RankGroup group(r, world, port, take_links(pairs, r));
      pairs.clear();
      std::exit(body(group));
    }
    children.push_back(pid);
  }
  pairs.clear();  // only the ranks hold the links now
  return wait_for_ranks(std::move(children));
}

}  // namespace toy
