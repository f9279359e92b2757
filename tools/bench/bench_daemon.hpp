// A tuteld for a benchmark: started from the bench's own bin/ directory on a throwaway config
// in a fresh temporary directory, stopped by its PID when the object dies.
#pragma once

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <thread>

extern char** environ;

namespace tutel::bench {

class BenchDaemon {
 public:
  // `state_dir`: the daemon gets one (clients may save and load; it checkpoints its layers when
  // it stops).
  BenchDaemon(const std::string& self, const std::string& backend, int threads, const std::string& arena,
              int spin_us = -1, bool state_dir = false) {
    char tmpl[] = "/tmp/tutel-bench-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    std::ofstream(dir_ + "/tuteld.toml")
        << "[server]\nclient_socket = \"client.sock\"\nadmin_socket = \"admin.sock\"\n"
        << "metrics_listen = \"\"\nlog_level = \"warn\"\narena_bytes = \"" << arena << "\"\n"
        << (spin_us >= 0 ? "spin_us = " + std::to_string(spin_us) + "\n" : "")
        << (state_dir ? "state_dir = \"state\"\n" : "")
        << "[backend]\nkind = \"" << backend << "\"\nranks = 1\nthreads_per_rank = " << threads << "\n"
        << "[[tenant]]\nname = \"bench\"\nuids = [" << ::getuid() << "]\n";
    const std::string bin = (std::filesystem::path(self).parent_path() / "tuteld").string();
    const std::string cfg = dir_ + "/tuteld.toml";
    char* argv[] = {const_cast<char*>(bin.c_str()), const_cast<char*>("--config"), const_cast<char*>(cfg.c_str()), nullptr};
    if (posix_spawn(&pid_, bin.c_str(), nullptr, nullptr, argv, environ) != 0) {
      pid_ = -1;
      return;
    }
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
    std::filesystem::remove_all(dir_, ec);
  }
  std::string socket() const { return dir_ + "/client.sock"; }
  bool running() const { return pid_ > 0 && std::filesystem::exists(socket()); }

 private:
  std::string dir_;
  pid_t pid_ = -1;
};

}  // namespace tutel::bench
