// A tuteld for a benchmark: started from the bench's own bin/ directory on a throwaway config
// in a fresh temporary directory, stopped by its PID when the object dies, and by the kernel
// (SIGTERM, PR_SET_PDEATHSIG) when the benchmark dies without running its destructors (a
// SIGTERM left it running before). The temporary directory stays in that case; the next
// benchmark's daemon removes it (remove_stale_bench_dirs): its bench.pid, which names the
// benchmark's PID for a reader, is a ProcessLock held for the benchmark's life, and the kernel
// drops the lock when the process dies, however it dies.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "tutel/core/process_lock.hpp"

namespace tutel::bench {

inline constexpr const char* kBenchDirPrefix = "tutel-bench-";
inline constexpr const char* kBenchLockName = "bench.pid";

// Removes the directories under `parent` that BenchDaemons of benchmarks no longer running left
// (killed before their destructors ran): those whose bench.pid nobody holds locked. A lock, not
// the PID: a PID may be reused, and a benchmark in another PID namespace sharing /tmp looks dead
// to kill(). A directory without that file, or one this user cannot open, stays. Returns how
// many it removed.
inline int remove_stale_bench_dirs(const std::string& parent = "/tmp") {
  int removed = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(parent, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kBenchDirPrefix, 0) != 0 || !entry.is_directory(ec) || entry.is_symlink(ec)) continue;
    // Held while the directory goes, so that no benchmark can take it meanwhile.
    auto owner_gone = ProcessLock::acquire((entry.path() / kBenchLockName).string(), ProcessLock::Create::kNever);
    if (!owner_gone.ok()) continue;
    std::error_code removing;
    if (std::filesystem::remove_all(entry.path(), removing) > 0 && !removing) ++removed;
  }
  return removed;
}

// Marks `dir` as a running benchmark's for as long as the lock is held. The lock is taken under
// a temporary name and renamed into place (the lock stays with the file), so a sweep never finds
// a bench.pid that is not yet locked and removes the directory of a benchmark starting.
inline Result<ProcessLock> lock_bench_dir(const std::string& dir) {
  const std::string taking = dir + "/" + kBenchLockName + ".new";
  TUTEL_ASSIGN_OR_RETURN(ProcessLock lock, ProcessLock::acquire(taking));
  std::error_code ec;
  std::filesystem::rename(taking, dir + "/" + kBenchLockName, ec);
  if (ec) return Status::IOError("cannot rename " + taking + ": " + ec.message());
  return lock;
}

class BenchDaemon {
 public:
  // `state_dir`: the daemon gets one (clients may save and load; it checkpoints its layers when
  // it stops).
  BenchDaemon(const std::string& self, const std::string& backend, int threads, const std::string& arena,
              int spin_us = -1, bool state_dir = false) {
    remove_stale_bench_dirs();
    std::string tmpl = std::string("/tmp/") + kBenchDirPrefix + "XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) return;  // not running(): the benchmark says it could not start
    dir_ = tmpl;
    if (auto lock = lock_bench_dir(dir_); lock.ok()) lock_.emplace(std::move(*lock));  // else: left for good if killed
    std::ofstream(dir_ + "/tuteld.toml")
        << "[server]\nclient_socket = \"client.sock\"\nadmin_socket = \"admin.sock\"\n"
        << "metrics_listen = \"\"\nlog_level = \"warn\"\narena_bytes = \"" << arena << "\"\n"
        << (spin_us >= 0 ? "spin_us = " + std::to_string(spin_us) + "\n" : "")
        << (state_dir ? "state_dir = \"state\"\n" : "")
        << "[backend]\nkind = \"" << backend << "\"\nranks = 1\nthreads_per_rank = " << threads << "\n"
        << "[[tenant]]\nname = \"bench\"\nuids = [" << ::getuid() << "]\n";
    // Beside this executable: /proc/self/exe, since argv[0] (`self`) holds no directory when
    // the benchmark was found through PATH.
    std::error_code ec;
    std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (ec) exe = self;
    const std::string bin = (exe.parent_path() / "tuteld").string();
    const std::string cfg = dir_ + "/tuteld.toml";
    char* argv[] = {const_cast<char*>(bin.c_str()), const_cast<char*>("--config"), const_cast<char*>(cfg.c_str()), nullptr};
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {  // only async-signal-safe calls until exec
      if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || ::getppid() != parent) ::_exit(127);
      ::execv(bin.c_str(), argv);
      ::_exit(127);
    }
    if (pid_ < 0) return;
    for (int i = 0; i < 500 && !std::filesystem::exists(socket()); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ~BenchDaemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status;
      ::waitpid(pid_, &status, 0);
    }
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  std::string socket() const { return dir_ + "/client.sock"; }
  bool running() const { return pid_ > 0 && !dir_.empty() && std::filesystem::exists(socket()); }
  pid_t pid() const { return pid_; }

 private:
  std::string dir_;
  std::optional<ProcessLock> lock_;  // dir_/bench.pid, held while this benchmark runs
  pid_t pid_ = -1;
};

}  // namespace tutel::bench
