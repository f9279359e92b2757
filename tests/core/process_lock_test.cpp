// The process lock: one holder at a time, a clear refusal naming the holder, released when its
// holder goes (also by a process's death, which a crashed daemon's restart and the benchmark's
// sweep of dead benchmarks' directories depend on).
#include "tutel/core/process_lock.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

namespace tutel {
namespace {

class ProcessLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tutel-lock-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  static std::string contents(const std::string& path) {
    std::ifstream f(path);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  std::string dir_;
};

TEST_F(ProcessLockTest, OneHolderAtATimeAndTheRefusalNamesIt) {
  const std::string path = dir_ + "/client.sock.lock";
  std::optional<Result<ProcessLock>> first(ProcessLock::acquire(path));
  ASSERT_TRUE(first->ok()) << first->status();
  EXPECT_EQ((*first)->path(), path);
  EXPECT_EQ(contents(path), std::to_string(::getpid()) + "\n");
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // flock conflicts between open files even within one process, as between two processes.
  auto second = ProcessLock::acquire(path);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(second.status().message(), path + " is locked by another process (pid " + std::to_string(::getpid()) + ")");
  auto existing_only = ProcessLock::acquire(path, ProcessLock::Create::kNever);
  EXPECT_EQ(existing_only.status().code(), StatusCode::kAlreadyExists) << existing_only.status();
  first.reset();  // released
  auto third = ProcessLock::acquire(path, ProcessLock::Create::kNever);
  EXPECT_TRUE(third.ok()) << third.status();
  EXPECT_TRUE(std::filesystem::exists(path)) << "a released lock's file stays";
}

TEST_F(ProcessLockTest, ADeadHoldersLockIsFree) {
  const std::string path = dir_ + "/tuteld.lock";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto lock = ProcessLock::acquire(path);
    _exit(lock.ok() ? 0 : 1);  // dies holding it, as a killed daemon does
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto lock = ProcessLock::acquire(path, ProcessLock::Create::kNever);
  EXPECT_TRUE(lock.ok()) << lock.status();
  EXPECT_EQ(contents(path), std::to_string(::getpid()) + "\n") << "the dead holder's pid is replaced";
}

TEST_F(ProcessLockTest, GarbageInTheFileOnlyLeavesThePidOut) {
  const std::string path = dir_ + "/tuteld.lock";
  auto held = ProcessLock::acquire(path);
  ASSERT_TRUE(held.ok()) << held.status();
  for (const char* garbage : {"not a pid\n", "", "12 34\n", "0\n", "-5\n", "4294967297\n", "99999999999999999999999999999999999999999\n"}) {
    { std::ofstream(path) << garbage; }
    auto refused = ProcessLock::acquire(path);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().message(), path + " is locked by another process") << "file: " << garbage;
  }
}

TEST_F(ProcessLockTest, MissingUnopenableAndLinkedPathsAreRefusedAndNothingIsCreated) {
  auto missing = ProcessLock::acquire(dir_ + "/absent.lock", ProcessLock::Create::kNever);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound) << missing.status();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/absent.lock"));
  auto lock = ProcessLock::acquire(dir_ + "/no/such/dir/x.lock");
  ASSERT_FALSE(lock.ok());
  EXPECT_EQ(lock.status().code(), StatusCode::kIOError);
  EXPECT_NE(lock.status().message().find("check the permissions of its directory"), std::string::npos) << lock.status();
  // A symlink is not followed: a lock file replaced by a link elsewhere is refused.
  std::filesystem::create_symlink(dir_ + "/target", dir_ + "/link.lock");
  for (auto create : {ProcessLock::Create::kIfMissing, ProcessLock::Create::kNever}) {
    auto linked = ProcessLock::acquire(dir_ + "/link.lock", create);
    EXPECT_FALSE(linked.ok());
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/target"));
  }
}

// A held lock survives a rename of its file (the lock is on the file, not the name): the
// benchmark creates its lock under a temporary name and renames it into place, so a sweep never
// finds the lock file before it is locked.
TEST_F(ProcessLockTest, TheLockFollowsItsFileThroughARename) {
  auto held = ProcessLock::acquire(dir_ + "/bench.pid.new");
  ASSERT_TRUE(held.ok()) << held.status();
  std::filesystem::rename(dir_ + "/bench.pid.new", dir_ + "/bench.pid");
  auto probe = ProcessLock::acquire(dir_ + "/bench.pid", ProcessLock::Create::kNever);
  EXPECT_EQ(probe.status().code(), StatusCode::kAlreadyExists) << probe.status();
}

}  // namespace
}  // namespace tutel
