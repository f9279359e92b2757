// The instance lock: one holder at a time, a clear refusal naming the holder, released when its
// holder goes (also by a process's death, which a test of a crashed daemon depends on).
#include "instance_lock.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

namespace tutel::daemon {
namespace {

class InstanceLockTest : public ::testing::Test {
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
  std::string dir_;
};

TEST_F(InstanceLockTest, OneHolderAtATimeAndTheRefusalNamesIt) {
  const std::string path = dir_ + "/client.sock.lock";
  std::optional<Result<InstanceLock>> first(InstanceLock::acquire(path, "client_socket x"));
  ASSERT_TRUE(first->ok()) << first->status();
  EXPECT_EQ((*first)->path(), path);
  // flock conflicts between open files even within one process, as between two daemons.
  auto second = InstanceLock::acquire(path, "client_socket x");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kAlreadyExists);
  EXPECT_NE(second.status().message().find("another tuteld (pid " + std::to_string(::getpid()) + ") is running with client_socket x"),
            std::string::npos)
      << second.status();
  first.reset();  // released
  auto third = InstanceLock::acquire(path, "client_socket x");
  EXPECT_TRUE(third.ok()) << third.status();
}

TEST_F(InstanceLockTest, ADeadHoldersLockIsFree) {
  const std::string path = dir_ + "/tuteld.lock";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto lock = InstanceLock::acquire(path, "state_dir s");
    _exit(lock.ok() ? 0 : 1);  // dies holding it, as a killed daemon does
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto lock = InstanceLock::acquire(path, "state_dir s");
  EXPECT_TRUE(lock.ok()) << lock.status();
}

TEST_F(InstanceLockTest, GarbageInTheFileOnlyLeavesThePidOut) {
  const std::string path = dir_ + "/tuteld.lock";
  auto held = InstanceLock::acquire(path, "state_dir s");
  ASSERT_TRUE(held.ok()) << held.status();
  { std::ofstream(path) << "not a pid\n"; }
  auto refused = InstanceLock::acquire(path, "state_dir s");
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("another tuteld is running with state_dir s"), std::string::npos)
      << refused.status();
}

TEST_F(InstanceLockTest, AnUnopenablePathSaysWhatToCheck) {
  auto lock = InstanceLock::acquire(dir_ + "/no/such/dir/x.lock", "client_socket y");
  ASSERT_FALSE(lock.ok());
  EXPECT_EQ(lock.status().code(), StatusCode::kIOError);
  EXPECT_NE(lock.status().message().find("check the permissions of its directory"), std::string::npos) << lock.status();
  // A symlink is not followed: a lock file replaced by a link elsewhere is refused.
  std::filesystem::create_symlink(dir_ + "/target", dir_ + "/link.lock");
  auto linked = InstanceLock::acquire(dir_ + "/link.lock", "client_socket y");
  EXPECT_FALSE(linked.ok());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/target"));
}

}  // namespace
}  // namespace tutel::daemon
