// The benchmark daemon's temporary directories: one a killed benchmark left (its bench.pid names
// no process) goes at the next benchmark's start; every other one stays.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "../../tools/bench/bench_daemon.hpp"

namespace tutel::bench {
namespace {

namespace fs = std::filesystem;

// A PID that no process has now: a child's, after it exited and was reaped.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;
}

void make_dir(const fs::path& dir, const std::string& pid_file) {
  fs::create_directories(dir);
  std::ofstream(dir / "client.sock") << "";
  if (!pid_file.empty()) std::ofstream(dir / "bench.pid") << pid_file;
}

TEST(BenchDaemon, OnlyTheDirectoriesOfBenchmarksNoLongerRunningAreRemoved) {
  char tmpl[] = "/tmp/bench-daemon-test-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const fs::path parent = tmpl;
  const std::string dead = std::to_string(dead_pid()) + "\n";
  make_dir(parent / "tutel-bench-killed", dead);
  make_dir(parent / "tutel-bench-running", std::to_string(::getpid()) + "\n");
  make_dir(parent / "tutel-bench-older", "");  // a benchmark of before bench.pid
  make_dir(parent / "tutel-bench-garbled", "pid?\n");
  make_dir(parent / "tutel-bench-zero", "0\n");
  make_dir(parent / "something-else", dead);
  fs::create_directory_symlink(parent / "something-else", parent / "tutel-bench-link");

  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 1);
  EXPECT_FALSE(fs::exists(parent / "tutel-bench-killed"));
  for (const char* kept : {"tutel-bench-running", "tutel-bench-older", "tutel-bench-garbled", "tutel-bench-zero",
                           "something-else", "tutel-bench-link"})
    EXPECT_TRUE(fs::exists(parent / kept)) << kept;
  EXPECT_TRUE(fs::exists(parent / "something-else" / "client.sock"));
  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 0);  // nothing left to remove
  EXPECT_EQ(remove_stale_bench_dirs((parent / "missing").string()), 0);
  fs::remove_all(parent);
}

}  // namespace
}  // namespace tutel::bench
