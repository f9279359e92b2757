// The daemon's signal thread: refused where the signals are not blocked; once handed to a loop,
// every signal reaches the loop's callback in order, and stop() ends the thread.
#include "signal_watcher.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <string>
#include <vector>

namespace tutel::daemon {
namespace {

TEST(SignalWatcher, IsRefusedWhereTheSignalsAreNotBlocked) {
  sigset_t current;
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, nullptr, &current), 0);
  ASSERT_FALSE(sigismember(&current, SIGTERM)) << "the test's thread should not block SIGTERM";
  auto watcher = SignalWatcher::start();
  ASSERT_FALSE(watcher.ok());
  EXPECT_NE(watcher.status().message().find("SIGTERM is not blocked"), std::string::npos) << watcher.status();
  EXPECT_NE(watcher.status().message().find("block_termination_signals"), std::string::npos) << watcher.status();
}

// In a child: the mask and the signals are the process's.
TEST(SignalWatcher, HandsEverySignalToTheLoopInOrder) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::alarm(60);  // a hang ends the child
    block_termination_signals();
    auto watcher = SignalWatcher::start();
    if (!watcher.ok()) ::_exit(10);
    uv_loop_t loop;
    uv_loop_init(&loop);
    std::vector<int> seen;
    (*watcher)->hand_to_loop(&loop, [&](int signum) {
      seen.push_back(signum);
      if (seen.size() == 1) {
        // Sent one at a time: two pending SIGTERMs would merge into one.
        ::kill(::getpid(), SIGINT);
      } else if (seen.size() == 2) {
        ::kill(::getpid(), SIGTERM);
      } else {
        (*watcher)->unref();  // the loop may end now
      }
    });
    ::kill(::getpid(), SIGTERM);
    uv_run(&loop, UV_RUN_DEFAULT);
    (*watcher)->stop();
    uv_walk(&loop, [](uv_handle_t* h, void*) { uv_close(h, nullptr); }, nullptr);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) ::_exit(11);
    ::_exit(seen == std::vector<int>{SIGTERM, SIGINT, SIGTERM} ? 0 : 12);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10: not started, 11: the loop did not close, 12: wrong signals";
}

// Before it is handed to a loop (the daemon still starting), a signal ends the process as its
// default action would.
TEST(SignalWatcher, BeforeTheLoopASignalKillsTheProcess) {
  for (int signum : {SIGTERM, SIGINT}) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::alarm(60);
      block_termination_signals();
      auto watcher = SignalWatcher::start();
      if (!watcher.ok()) ::_exit(10);
      ::kill(::getpid(), signum);
      ::pause();  // SIGALRM ends it if the signal does not
      ::_exit(12);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status)) << "exited with " << WEXITSTATUS(status);
    EXPECT_EQ(WTERMSIG(status), signum);
  }
}

}  // namespace
}  // namespace tutel::daemon
