#include "socket_util.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tutel::comm::detail {

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int poll_timeout_ms(Clock::time_point deadline, const std::atomic<bool>* cancel) {
  const auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  const int64_t most = cancel != nullptr ? kCancelCheck.count() : 1'000'000;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return ms > most ? static_cast<int>(most) : static_cast<int>(ms);
}

std::string errno_text(int err) {
  char buf[128];
  return std::string(strerror_r(err, buf, sizeof buf));
}

static Status wait_fd(int fd, short events, Clock::time_point deadline, const std::atomic<bool>* cancel,
                      const char* what) {
  for (;;) {
    if (cancelled(cancel)) return Status::Aborted(std::string("cancelled while ") + what);
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, poll_timeout_ms(deadline, cancel));
    if (r > 0) return Status::OK();
    if (r == 0 && Clock::now() >= deadline) return Status::Timeout(std::string("timed out while ") + what);
    if (r < 0 && errno != EINTR) return Status::IOError(std::string("poll: ") + errno_text(errno));
  }
}

Status send_all(int fd, const void* data, size_t n, Clock::time_point deadline, const std::atomic<bool>* cancel) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      TUTEL_RETURN_IF_ERROR(wait_fd(fd, POLLOUT, deadline, cancel, "sending"));
      continue;
    }
    return Status::IOError("send: " + errno_text(errno));
  }
  return Status::OK();
}

Status recv_exact(int fd, void* data, size_t n, Clock::time_point deadline, bool* closed_early,
                  const std::atomic<bool>* cancel) {
  char* p = static_cast<char*>(data);
  size_t got = 0;
  if (closed_early != nullptr) *closed_early = false;
  while (got < n) {
    const ssize_t r = ::recv(fd, p + got, n - got, MSG_DONTWAIT);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE))) {
      if (got == 0 && closed_early != nullptr) *closed_early = true;
      return Status::Unavailable("connection closed by the peer");
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      TUTEL_RETURN_IF_ERROR(wait_fd(fd, POLLIN, deadline, cancel, "receiving"));
      continue;
    }
    return Status::IOError("recv: " + errno_text(errno));
  }
  return Status::OK();
}

std::string peer_ip(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "?";
  char buf[INET_ADDRSTRLEN] = {};
  if (::inet_ntop(AF_INET, &addr.sin_addr, buf, sizeof buf) == nullptr) return "?";
  return buf;
}

void enable_keepalive(int fd) {
  // Best effort: a socket that refuses these options is served all the same.
  const int on = 1, idle_s = 60, interval_s = 10, probes = 3;
  (void)::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s);
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof interval_s);
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
}

Result<bool> send_some(int fd, std::string_view message, std::string_view mac, size_t* pos) {
  const size_t total = message.size() + mac.size();
  while (*pos < total) {
    const bool in_message = *pos < message.size();
    const char* from = in_message ? message.data() + *pos : mac.data() + (*pos - message.size());
    const size_t left = in_message ? message.size() - *pos : total - *pos;
    const ssize_t w = ::send(fd, from, left, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      *pos += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
    return Status::IOError("send: " + errno_text(w < 0 ? errno : EPIPE));
  }
  return true;
}

}  // namespace tutel::comm::detail
