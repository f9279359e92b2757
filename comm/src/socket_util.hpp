// Small POSIX socket helpers for the bootstrap: an owning fd and deadline-bounded I/O.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>

#include "tutel/core/status.hpp"

namespace tutel::comm::detail {

using Clock = std::chrono::steady_clock;

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset();

 private:
  int fd_ = -1;
};

// A wait given a `cancel` flag (may be null: nothing cancels it) looks at it at least this often,
// and gives up with kAborted once another thread raised it.
inline constexpr std::chrono::milliseconds kCancelCheck{100};
inline bool cancelled(const std::atomic<bool>* cancel) {
  return cancel != nullptr && cancel->load(std::memory_order_acquire);
}

// Milliseconds left until `deadline` for poll(2): 0 when past, rounded up otherwise; at most
// kCancelCheck when there is a `cancel` flag to look at.
int poll_timeout_ms(Clock::time_point deadline, const std::atomic<bool>* cancel = nullptr);

// Writes all of `data` (MSG_NOSIGNAL) or fails at `deadline` (or once `cancel` is raised).
Status send_all(int fd, const void* data, size_t n, Clock::time_point deadline,
                const std::atomic<bool>* cancel = nullptr);

// Reads exactly `n` bytes or fails at `deadline` (or once `cancel` is raised). `*closed_early`
// (if given) tells whether the peer closed or reset the connection before the first byte.
Status recv_exact(int fd, void* data, size_t n, Clock::time_point deadline,
                  bool* closed_early = nullptr, const std::atomic<bool>* cancel = nullptr);

// accept(2) failed for want of descriptors or memory: the listener stays readable, so a loop
// polling it must pause accepting for kAcceptPause instead of spinning.
inline bool out_of_descriptors(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}
inline constexpr std::chrono::milliseconds kAcceptPause{100};

// "127.0.0.1" for the remote end of a connected socket.
std::string peer_ip(int fd);

// Has the kernel probe an idle accepted connection (after 60 s idle, every 10 s, 3 times): a peer
// whose machine died without closing its end (power lost, a cable pulled) is then seen gone in
// about 90 s instead of holding its place until its deadline, up to an hour. Not shorter: a rank
// waits silently, and a network cut for longer than this takes it out of its group (it would
// have to join again), where a shorter cut heals unseen.
void enable_keepalive(int fd);

std::string errno_text(int err);

// Sends what a non-blocking socket takes of `message` and then `mac` (an answer and its
// authentication), from byte *pos of the two on, advancing *pos: true once all is sent, false
// where the socket is full for now, or an IOError naming the send's failure.
Result<bool> send_some(int fd, std::string_view message, std::string_view mac, size_t* pos);

}  // namespace tutel::comm::detail
