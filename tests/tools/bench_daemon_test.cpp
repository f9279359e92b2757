// The benchmark daemon's temporary directories: one a killed benchmark left (nobody holds its
// bench.pid locked) goes at the next benchmark's start; every other one stays.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
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

void make_dir(const fs::path& dir, bool pid_file) {
  fs::create_directories(dir);
  std::ofstream(dir / "client.sock") << "";
  if (pid_file) std::ofstream(dir / "bench.pid") << "4242\n";
}

// Holds `path` flock()ed, as a running benchmark holds its bench.pid.
int lock(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  return fd;
}

TEST(BenchDaemon, OnlyTheDirectoriesOfBenchmarksNoLongerRunningAreRemoved) {
  char tmpl[] = "/tmp/bench-daemon-test-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const fs::path parent = tmpl;
  make_dir(parent / "tutel-bench-left", true);     // its benchmark is gone: nobody holds the lock
  make_dir(parent / "tutel-bench-running", true);  // held below, as by a benchmark that runs
  make_dir(parent / "tutel-bench-older", false);   // a benchmark of before bench.pid
  make_dir(parent / "something-else", true);
  fs::create_directory_symlink(parent / "something-else", parent / "tutel-bench-link");
  // A benchmark killed with SIGKILL while it held its lock: the kernel dropped the lock.
  make_dir(parent / "tutel-bench-killed", true);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    const int fd = ::open((parent / "tutel-bench-killed" / "bench.pid").c_str(), O_RDONLY);
    if (fd < 0 || ::flock(fd, LOCK_EX) != 0) ::_exit(1);
    (void)!::write(ready[1], "x", 1);
    ::pause();
    ::_exit(0);
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  const int held = lock(parent / "tutel-bench-running" / "bench.pid");
  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 1) << "only tutel-bench-left: the killed one still runs";
  EXPECT_TRUE(fs::exists(parent / "tutel-bench-killed"));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);

  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 1);
  EXPECT_FALSE(fs::exists(parent / "tutel-bench-left"));
  EXPECT_FALSE(fs::exists(parent / "tutel-bench-killed"));
  for (const char* kept : {"tutel-bench-running", "tutel-bench-older", "something-else", "tutel-bench-link"})
    EXPECT_TRUE(fs::exists(parent / kept)) << kept;
  EXPECT_TRUE(fs::exists(parent / "something-else" / "client.sock"));
  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 0);  // nothing left to remove
  ::close(held);
  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 1);  // the running one, once it let go
  EXPECT_EQ(remove_stale_bench_dirs((parent / "missing").string()), 0);
  ::close(ready[0]);
  ::close(ready[1]);
  fs::remove_all(parent);
}

// What a BenchDaemon takes for its directory: a lock the sweep respects while held, and only then.
TEST(BenchDaemon, ABenchmarksOwnLockKeepsItsDirectoryUntilReleased) {
  char tmpl[] = "/tmp/bench-daemon-test-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const fs::path parent = tmpl;
  const fs::path dir = parent / "tutel-bench-mine";
  fs::create_directories(dir);
  {
    auto lock = lock_bench_dir(dir.string());
    ASSERT_TRUE(lock.ok()) << lock.status();
    EXPECT_TRUE(fs::exists(dir / "bench.pid"));
    EXPECT_FALSE(fs::exists(dir / "bench.pid.new"));
    std::ifstream pid_file(dir / "bench.pid");
    pid_t pid = 0;
    pid_file >> pid;
    EXPECT_EQ(pid, ::getpid()) << "bench.pid names the benchmark";
    EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 0);
    EXPECT_TRUE(fs::exists(dir));
  }
  EXPECT_EQ(remove_stale_bench_dirs(parent.string()), 1);
  EXPECT_FALSE(fs::exists(dir));
  fs::remove_all(parent);
}

}  // namespace
}  // namespace tutel::bench
