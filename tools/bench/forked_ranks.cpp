// Forked ranks and threads of one child for tutel-bench a2a (forked_ranks.hpp). The parent
// kills only the pids it forked.
#include "forked_ranks.hpp"

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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace tutel::bench {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr auto kParentMargin = 15s;
// A failed group's report names this many of its failed ranks.
constexpr size_t kFailuresShown = 3;

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

// The forked children of one group; those not yet reaped are killed and reaped on destruction.
class ChildPids {
 public:
  ~ChildPids() {
    for (pid_t& pid : pids_) {
      if (pid <= 0) continue;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  void add(pid_t pid) { pids_.push_back(pid); }
  size_t size() const { return pids_.size(); }
  pid_t pid(size_t i) const { return pids_[i]; }
  void kill_all() const {
    for (pid_t pid : pids_)
      if (pid > 0) ::kill(pid, SIGKILL);
  }
  // Blocks until child i exits (every child runs under its alarm); returns its wait status.
  int reap(size_t i) {
    int status = 0;
    while (::waitpid(pids_[i], &status, 0) < 0 && errno == EINTR) {
    }
    pids_[i] = -1;
    return status;
  }

 private:
  std::vector<pid_t> pids_;
};

// "\n  <first>\n  <second>\n  and 2 more": the first kFailuresShown of `failures`, one a line.
std::string list_failures(const std::vector<std::string>& failures) {
  std::string text;
  for (size_t i = 0; i < failures.size() && i < kFailuresShown; ++i) text += "\n  " + failures[i];
  if (failures.size() > kFailuresShown)
    text += "\n  and " + std::to_string(failures.size() - kFailuresShown) + " more";
  return text;
}

}  // namespace

void ReportPipe::line(std::string text) const {
  std::replace(text.begin(), text.end(), '\n', ' ');
  text += '\n';
  const std::lock_guard<std::mutex> lock(mutex_);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd_, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

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

Status run_ranks(int size, const char* tls, const RankBody& body,
                 const std::function<void(const std::string&)>& on_line, std::string_view member) {
  std::fflush(stdout);  // a child must not inherit (and never flushes) unwritten output
  std::fflush(stderr);
  ChildPids children;
  std::vector<Fd> pipes;
  for (int r = 0; r < size; ++r) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
      return Status::IOError("pipe2: " + std::string(strerror(errno)));
    Fd read_end(fds[0]), write_end(fds[1]);
    const pid_t pid = ::fork();
    if (pid < 0) return Status::IOError("fork: " + std::string(strerror(errno)));
    if (pid == 0) {
      ::alarm(kPointGuardSeconds);
      for (Fd& p : pipes) p.reset();  // the siblings' read ends
      read_end.reset();
      ::setenv("UCX_NET_DEVICES", "lo", 1);
      ::setenv("UCX_TLS", tls, 1);
      const ReportPipe report(write_end.get());
      const Status st = body(r, report);
      if (!st.ok()) report.line("error " + st.to_string());
      ::_exit(st.ok() ? 0 : 1);
    }
    children.add(pid);
    pipes.push_back(std::move(read_end));
  }

  std::vector<std::string> partial(static_cast<size_t>(size)), said(static_cast<size_t>(size));
  auto deadline = Clock::now() + std::chrono::seconds(kPointGuardSeconds) + kParentMargin;
  bool stalled = false;
  for (;;) {
    std::vector<pollfd> polled;
    std::vector<size_t> rank_of;
    for (size_t r = 0; r < pipes.size(); ++r) {
      if (pipes[r].get() < 0) continue;
      polled.push_back({pipes[r].get(), POLLIN, 0});
      rank_of.push_back(r);
    }
    if (polled.empty()) break;
    if (Clock::now() > deadline) {
      stalled = true;
      children.kill_all();
      break;
    }
    if (::poll(polled.data(), polled.size(), 1000) < 0 && errno != EINTR)
      return Status::IOError("poll: " + std::string(strerror(errno)));
    for (size_t i = 0; i < polled.size(); ++i) {
      if (polled[i].revents == 0) continue;
      const size_t r = rank_of[i];
      char buf[4096];
      const ssize_t n = ::read(pipes[r].get(), buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        pipes[r].reset();
        continue;
      }
      deadline = Clock::now() + std::chrono::seconds(kPointGuardSeconds) + kParentMargin;
      partial[r].append(buf, static_cast<size_t>(n));
      size_t eol;
      while ((eol = partial[r].find('\n')) != std::string::npos) {
        std::string line = partial[r].substr(0, eol);
        partial[r].erase(0, eol + 1);
        if (line.rfind("error ", 0) == 0)
          said[r] = line.substr(6);
        else
          on_line(line);
      }
    }
  }

  // Ranks that died of a signal first: the others usually failed because of them.
  std::vector<std::string> died, erred;
  for (size_t r = 0; r < children.size(); ++r) {
    const pid_t pid = children.pid(r);
    const int status = children.reap(r);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
    std::string text =
        std::string(member) + " " + std::to_string(r) + " (pid " + std::to_string(pid) + "): ";
    if (WIFSIGNALED(status))
      text += std::string("killed by ") + strsignal(WTERMSIG(status)) +
              (WTERMSIG(status) == SIGALRM ? " (its guard alarm: it hung)" : "");
    else
      text += "exit code " + std::to_string(WEXITSTATUS(status));
    if (!said[r].empty()) text += ": " + said[r];
    (WIFSIGNALED(status) ? died : erred).push_back(std::move(text));
  }
  died.insert(died.end(), erred.begin(), erred.end());
  std::string failures = list_failures(died);
  if (stalled)
    failures += "\n  (the group reported nothing for " +
                std::to_string(kPointGuardSeconds + kParentMargin.count()) +
                " s: the children still running were killed)";
  if (failures.empty()) return Status::OK();
  return Status::Aborted(std::string(member) + (died.size() == 1 ? " failed:" : "s failed:") +
                         failures);
}

Status run_threads(int count, const std::function<Status(int rank)>& body) {
  std::vector<Status> results(static_cast<size_t>(count));
  std::vector<std::thread> threads;
  for (int r = 0; r < count; ++r)
    threads.emplace_back([&results, &body, r] { results[static_cast<size_t>(r)] = body(r); });
  for (std::thread& t : threads) t.join();
  std::vector<std::string> failed;
  for (int r = 0; r < count; ++r)
    if (!results[static_cast<size_t>(r)].ok())
      failed.push_back("rank " + std::to_string(r) + ": " +
                       results[static_cast<size_t>(r)].to_string());
  return failed.empty() ? Status::OK() : Status::Aborted("ranks failed:" + list_failures(failed));
}

}  // namespace tutel::bench
