// Helpers for the comm tests: free loopback ports, forked rank processes with a result pipe and
// a parent<->child handshake, and the data patterns the collectives are checked against.
//
// Every test that touches UCX runs it in forked children only, so the test process itself never
// holds UCX state (or its threads) when it forks the next group.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "../common/sanitizers.hpp"
#include "tutel/comm/bootstrap.hpp"

namespace tutel::comm::testing {

using namespace std::chrono_literals;

// UCX must stay on loopback in every test process and its children.
inline void use_loopback_only() { ::setenv("UCX_NET_DEVICES", "lo", 1); }

// A loopback port below the ephemeral range, free a moment ago (tests/common/loopback.hpp says
// why not bind(0)).
inline uint16_t free_port() { return tutel::testing::free_port(); }

inline BootstrapOptions loopback_options(uint16_t port, int rank, int size, int local_size,
                                         std::chrono::milliseconds collective_timeout = 20s) {
  BootstrapOptions o;
  o.coordinator_host = "127.0.0.1";
  o.coordinator_port = port;
  o.rank = rank;
  o.size = size;
  o.local_size = local_size;
  o.timeout = 20s;
  o.collective_timeout = collective_timeout;
  return o;
}

// The byte rank `src` sends to rank `dst` at offset i (of a given exchange `seed`).
inline uint8_t pattern(int src, int dst, size_t i, uint32_t seed = 0) {
  const uint64_t x = (uint64_t(src) * 1000003u) ^ (uint64_t(dst) * 7919u) ^ (i * 2654435761u) ^
                     (uint64_t(seed) * 97u) ^ (i >> 11);
  return static_cast<uint8_t>(x ^ (x >> 8) ^ (x >> 17));
}

// Failure text collected in a child (gtest assertions would stay in the child's copy of gtest).
class Failures {
 public:
  template <typename... Args>
  void add(Args&&... args) {
    std::ostringstream os;
    (os << ... << args);
    if (text_.size() < 8000) text_ += os.str() + "\n";
  }
  bool ok() const { return text_.empty(); }
  const std::string& text() const { return text_; }
  void merge(const std::string& prefix, const std::string& other) {
    if (!other.empty()) text_ += prefix + other;
  }

 private:
  std::string text_;
};

// The child's side of the handshake with the parent.
class ChildChannel {
 public:
  ChildChannel(int up, int down) : up_(up), down_(down) {}
  // Tells the parent this child reached a point.
  void notify() const {
    const char c = 'r';
    (void)!::write(up_, &c, 1);
  }
  // Waits until the parent releases this child.
  void await_release() const {
    char c;
    while (::read(down_, &c, 1) < 0 && errno == EINTR) {
    }
  }

 private:
  int up_, down_;
};

struct ChildOutcome {
  int rank = -1;
  pid_t pid = -1;
  bool exited = false;
  int exit_code = -1;
  int signal = 0;
  std::string text;  // what the child reported
};

// `size` forked children; child r runs body(r, channel) and reports its returned text (empty: ok).
// Each child ends itself with SIGALRM after `guard_seconds` (times kSanitizerSlowdown).
class ProcessGroup {
 public:
  using Body = std::function<std::string(int rank, const ChildChannel&)>;

  ProcessGroup(int size, const Body& body, unsigned guard_seconds = 90) {
    use_loopback_only();
    for (int r = 0; r < size; ++r) {
      int result[2], up[2], down[2];
      if (::pipe2(result, O_CLOEXEC) != 0 || ::pipe2(up, O_CLOEXEC) != 0 ||
          ::pipe2(down, O_CLOEXEC) != 0)
        std::abort();
      const pid_t pid = ::fork();
      if (pid == 0) {
        ::close(result[0]);
        ::close(up[0]);
        ::close(down[1]);
        for (const Child& c : children_) {  // not our siblings' pipes
          ::close(c.result);
          ::close(c.up);
          ::close(c.down);
        }
        ::alarm(guard_seconds * tutel::testing::kSanitizerSlowdown);  // a hang becomes SIGALRM, reported by the parent
        std::string text = body(r, ChildChannel(up[1], down[0]));
        if (text.size() > 16000) text.resize(16000);
        (void)!::write(result[1], text.data(), text.size());
        ::_exit(text.empty() ? 0 : 1);
      }
      ::close(result[1]);
      ::close(up[1]);
      ::close(down[0]);
      children_.push_back({pid, result[0], up[0], down[1]});
    }
  }

  ~ProcessGroup() {
    for (const Child& c : children_) {
      if (!c.reaped) {
        ::kill(c.pid, SIGKILL);
        ::waitpid(c.pid, nullptr, 0);
      }
      ::close(c.result);
      ::close(c.up);
      ::close(c.down);
    }
  }

  pid_t pid(int rank) const { return children_[rank].pid; }

  // Waits until child `rank` notified, or `timeout`.
  bool wait_notified(int rank, std::chrono::milliseconds timeout) const {
    pollfd p{children_[rank].up, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    char c;
    return ::read(children_[rank].up, &c, 1) == 1;
  }

  void release(int rank) const {
    const char c = 'g';
    (void)!::write(children_[rank].down, &c, 1);
  }

  // SIGKILLs one of our children and reaps it.
  void kill_child(int rank) {
    Child& c = children_[rank];
    ::kill(c.pid, SIGKILL);
    int status = 0;
    ::waitpid(c.pid, &status, 0);
    c.reaped = true;
    c.status = status;
  }

  // Waits for every child (killing the ones still running after `timeout`, which stretches under
  // the sanitizers as the children's guard alarm does).
  std::vector<ChildOutcome> wait_all(std::chrono::seconds timeout = 120s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout * tutel::testing::kSanitizerSlowdown;
    for (;;) {
      bool all = true;
      for (Child& c : children_) {
        if (c.reaped) continue;
        int status = 0;
        if (::waitpid(c.pid, &status, WNOHANG) == c.pid) {
          c.reaped = true;
          c.status = status;
        } else {
          all = false;
        }
      }
      if (all) break;
      if (std::chrono::steady_clock::now() >= deadline) {
        for (Child& c : children_) {
          if (c.reaped) continue;
          ::kill(c.pid, SIGKILL);
          ::waitpid(c.pid, &c.status, 0);
          c.reaped = true;
        }
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    std::vector<ChildOutcome> out;
    for (size_t r = 0; r < children_.size(); ++r) {
      const Child& c = children_[r];
      ChildOutcome o;
      o.rank = static_cast<int>(r);
      o.pid = c.pid;
      o.exited = WIFEXITED(c.status);
      o.exit_code = o.exited ? WEXITSTATUS(c.status) : -1;
      o.signal = WIFSIGNALED(c.status) ? WTERMSIG(c.status) : 0;
      char buf[4096];
      ssize_t n;
      ::fcntl(c.result, F_SETFL, O_NONBLOCK);
      while ((n = ::read(c.result, buf, sizeof buf)) > 0)
        o.text.append(buf, static_cast<size_t>(n));
      out.push_back(std::move(o));
    }
    return out;
  }

 private:
  struct Child {
    pid_t pid;
    int result, up, down;
    bool reaped = false;
    int status = 0;
  };
  std::vector<Child> children_;
};

// "" when every outcome but those in `skip` exited 0; otherwise a report per failing child.
inline std::string describe_failures(const std::vector<ChildOutcome>& outcomes,
                                     const std::vector<int>& skip = {}) {
  std::string report;
  for (const ChildOutcome& o : outcomes) {
    bool skipped = false;
    for (int s : skip) skipped |= s == o.rank;
    if (skipped) continue;
    if (o.exited && o.exit_code == 0) continue;
    report += "rank " + std::to_string(o.rank) + " (pid " + std::to_string(o.pid) + "): ";
    if (o.signal != 0)
      report += std::string("killed by signal ") + strsignal(o.signal) +
                (o.signal == SIGALRM ? " (the child's guard alarm: it hung)" : "");
    else
      report += "exit code " + std::to_string(o.exit_code);
    report += "\n" + o.text;
  }
  return report;
}

// A raw loopback TCP connection to a coordinator or the rendezvous service, for tests that
// speak the bootstrap's wire themselves; closed on destruction. `retry_for`: keep connecting
// that long while nothing listens yet (a coordinator about to); fd stays -1 if it never did.
struct RawClient {
  int fd = -1;
  explicit RawClient(uint16_t port, std::chrono::milliseconds retry_for = 0ms) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    const auto deadline = std::chrono::steady_clock::now() + retry_for;
    for (;;) {
      fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return;
      ::close(fd);
      fd = -1;
      if (std::chrono::steady_clock::now() >= deadline) return;
      std::this_thread::sleep_for(10ms);
    }
  }
  ~RawClient() {
    if (fd >= 0) ::close(fd);
  }
  void send(const std::string& bytes) const { (void)!::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL); }
  // At most `bytes` of what the server sends, until it closes or `wait` passes.
  std::string read(size_t bytes, std::chrono::milliseconds wait = 3000ms) const {
    std::string out;
    const auto deadline = std::chrono::steady_clock::now() + wait;
    while (out.size() < bytes) {
      pollfd p{fd, POLLIN, 0};
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline -
                                                                              std::chrono::steady_clock::now())
                            .count();
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
      char buf[4096];
      const ssize_t n = ::recv(fd, buf, std::min(sizeof buf, bytes - out.size()), 0);
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }
  // Everything the server sends until it closes, or until `wait` passes.
  std::string read_all(std::chrono::milliseconds wait = 3000ms) const { return read(SIZE_MAX, wait); }
};

}  // namespace tutel::comm::testing
