// Starts the real tuteld binary on a generated config in a fresh temporary directory, and stops
// it (by its PID, SIGTERM then SIGKILL) when the test ends, whether the test passed or not.
#pragma once

#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

extern char** environ;

namespace tutel::testing {

// Runs `command` through /bin/sh: its exit code (-1 when it did not exit) and its standard
// output, with its standard error merged in when `merge_stderr`, else discarded (so JSON parses).
inline std::pair<int, std::string> run_command(const std::string& command, bool merge_stderr = true) {
  FILE* p = ::popen((command + (merge_stderr ? " 2>&1" : " 2>/dev/null")).c_str(), "r");
  if (p == nullptr) return {-1, ""};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

struct DaemonOptions {
  std::string extra_server;   // lines appended to [server]
  std::string extra_tenants;  // more [[tenant]] tables
  std::string layers;         // [[layer]] tables
  std::string cluster;        // the body of a [cluster] table; empty: none
  std::string backend = "cpu";  // [backend] kind
  int ranks = 1;
  int threads_per_rank = 1;
  bool state_dir = true;
  uint64_t default_max_memory_bytes = 0;  // the "default" tenant's quota; 0: the config's default
  int64_t default_max_sessions = 0;       // its session limit; 0: the config's default
  int64_t default_max_inflight = 0;       // its requests in flight; 0: the config's default
  std::string default_tenant_extra;       // more lines of the "default" tenant's table
};

class DaemonProcess {
 public:
  explicit DaemonProcess(const DaemonOptions& o) : options_(o) {
    char tmpl[] = "/tmp/tuteld-test-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    write_config();
  }
  // A daemon still running at the end must stop cleanly: a crash or a sanitizer's report while
  // it shuts down (both end it with a non-zero status) fails the test, even one that never
  // checks stop() itself. One the test already stopped, killed or saw exit is left as it was.
  ~DaemonProcess() {
    if (pid_ > 0) {
      const int status = stop();
      if (status != 0)
        ADD_FAILURE() << "tuteld exited with status " << status
                      << " when stopped at the end of the test; the end of its log:\n"
                      << log_tail(8192);
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  const std::string& dir() const { return dir_; }
  std::string client_socket() const { return dir_ + "/run/client.sock"; }
  std::string admin_socket() const { return dir_ + "/run/admin.sock"; }
  std::string config_path() const { return dir_ + "/tuteld.toml"; }
  std::string log() const {
    std::ifstream f(dir_ + "/tuteld.log");
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  std::string log_tail(size_t bytes) const {
    const std::string all = log();
    return all.size() <= bytes ? all : all.substr(all.size() - bytes);
  }
  pid_t pid() const { return pid_; }
  // What the running daemon holds, seen from outside through /proc: its open descriptors, its
  // threads, its resident memory (VmRSS) in MiB (-1 where /proc does not say).
  size_t open_descriptors() const { return entries("/fd"); }
  size_t threads() const { return entries("/task"); }
  int64_t resident_mib() const {
    std::ifstream status(proc_dir() + "/status");
    for (std::string line; std::getline(status, line);)
      if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) / 1024;
    return -1;
  }
  // Another config for the next start (state_dir and sockets stay).
  void reconfigure(const DaemonOptions& o) {
    options_ = o;
    write_config();
  }

  // Starts the daemon and waits (bounded) until it serves.
  ::testing::AssertionResult start() {
    auto spawned = spawn();
    if (!spawned) return spawned;
    return wait_serving(std::chrono::seconds(10));
  }

  // Starts the daemon without waiting: the daemons of a cluster serve only once all have started.
  ::testing::AssertionResult spawn() {
    const std::string log_path = dir_ + "/tuteld.log";
    log_start_ = log().size();  // a restart appends: only this start's lines say it serves
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    const std::string bin = TUTELD_BIN, cfg = config_path();
    char* argv[] = {const_cast<char*>(bin.c_str()), const_cast<char*>("--config"), const_cast<char*>(cfg.c_str()),
                    nullptr};
    // The daemon starts with SIGTERM and SIGINT at their default actions and nothing blocked,
    // whatever the test runner inherited (a background job's SIGINT is ignored, which tuteld
    // honours while it starts).
    posix_spawnattr_t attributes;
    posix_spawnattr_init(&attributes);
    sigset_t defaults, none;
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGINT);
    sigemptyset(&none);
    posix_spawnattr_setsigdefault(&attributes, &defaults);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    const int rc = posix_spawn(&pid_, bin.c_str(), &actions, &attributes, argv, environ);
    posix_spawnattr_destroy(&attributes);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) return ::testing::AssertionFailure() << "cannot spawn " << bin << ": " << strerror(rc);
    return ::testing::AssertionSuccess();
  }

  // Waits (bounded) until the daemon logs that it serves, with both sockets in place.
  ::testing::AssertionResult wait_serving(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (std::filesystem::exists(client_socket()) && std::filesystem::exists(admin_socket()) &&
          log().find("serving on", log_start_) != std::string::npos)
        return ::testing::AssertionSuccess();
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "tuteld exited during start-up:\n" << log();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return ::testing::AssertionFailure() << "tuteld did not come up within " << timeout.count() << " ms:\n" << log();
  }

  // Waits (bounded) for the daemon to exit on its own; its exit status, or -1 if it did not.
  int wait_exit(std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return exit_status_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        record(status);
        return exit_status_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }

  // SIGKILLs the daemon (a crash) and reaps it.
  void kill_hard() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    exit_status_ = 137;
    term_signal_ = SIGKILL;
  }

  // SIGTERM, then waits (bounded) for the exit; SIGKILL if it does not come. Returns the exit status.
  int stop() {
    if (pid_ <= 0) return exit_status_;
    ::kill(pid_, SIGTERM);
    int status = 0;
    for (int i = 0; i < 3000; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        record(status);
        return exit_status_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    exit_status_ = 137;
    term_signal_ = SIGKILL;
    return exit_status_;
  }

  bool alive() const { return pid_ > 0 && ::kill(pid_, 0) == 0; }
  // The signal that ended the daemon's last run (0: it exited, or still runs). exit_status
  // reads 128 + that signal, as an exit with that code would.
  int term_signal() const { return term_signal_; }

 private:
  void write_config() {
    std::ofstream f(config_path());
    f << "[server]\n"
      << "client_socket = \"run/client.sock\"\n"
      << "admin_socket = \"run/admin.sock\"\n"
      << (options_.state_dir ? "state_dir = \"state\"\n" : "")
      << "metrics_listen = \"127.0.0.1:0\"\n"
      << "log_level = \"info\"\n"
      << "arena_bytes = \"16MiB\"\n"
      << options_.extra_server << "\n"
      << "[backend]\nkind = \"" << options_.backend << "\"\nranks = " << options_.ranks << "\nthreads_per_rank = " << options_.threads_per_rank
      << "\n\n[[tenant]]\nname = \"default\"\nuids = [" << ::getuid() << "]\n"
      << (options_.default_max_memory_bytes
              ? "max_memory_bytes = " + std::to_string(options_.default_max_memory_bytes) + "\n"
              : std::string())
      << (options_.default_max_sessions
              ? "max_sessions = " + std::to_string(options_.default_max_sessions) + "\n"
              : std::string())
      << (options_.default_max_inflight
              ? "max_inflight = " + std::to_string(options_.default_max_inflight) + "\n"
              : std::string())
      << options_.default_tenant_extra << "\n"
      << (options_.cluster.empty() ? "" : "\n[cluster]\n" + options_.cluster + "\n")
      << options_.extra_tenants << "\n"
      << options_.layers << "\n";
  }

  DaemonOptions options_;
  std::string dir_;
  pid_t pid_ = -1;
  std::string proc_dir() const { return "/proc/" + std::to_string(pid_); }
  size_t entries(const char* under) const {
    size_t n = 0;
    std::error_code ec;
    for (std::filesystem::directory_iterator it(proc_dir() + under, ec), end; !ec && it != end; it.increment(ec)) ++n;
    return n;
  }
  // A waitpid status: the exit code, or 128 + the signal that ended it.
  void record(int status) {
    term_signal_ = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  int exit_status_ = -1;
  int term_signal_ = 0;
  size_t log_start_ = 0;  // the log's size when the current start began
};

}  // namespace tutel::testing
