// The daemon's signal thread: refused where the signals are not blocked; what a signal does in
// each part of the daemon's life (signal_watcher.hpp). Each case runs in a child: the mask and
// the signals are the process's.
#include "signal_watcher.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <functional>
#include <string>
#include <vector>

#include "tutel/daemon/daemon.hpp"

namespace tutel::daemon {
namespace {

// In a forked child: a guard against hangs, the signals blocked, the watcher started (the child
// exits with 10 if it cannot be).
std::unique_ptr<SignalWatcher> watcher_in_child() {
  ::alarm(60);
  block_termination_signals();
  auto watcher = SignalWatcher::start();
  if (!watcher.ok()) ::_exit(10);
  return std::move(*watcher);
}

TEST(SignalWatcher, IsRefusedWhereTheSignalsAreNotBlocked) {
  sigset_t current;
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, nullptr, &current), 0);
  ASSERT_FALSE(sigismember(&current, SIGTERM)) << "the test's thread should not block SIGTERM";
  auto watcher = SignalWatcher::start();
  ASSERT_FALSE(watcher.ok());
  EXPECT_NE(watcher.status().message().find("SIGTERM is not blocked"), std::string::npos) << watcher.status();
  EXPECT_NE(watcher.status().message().find("block_termination_signals"), std::string::npos) << watcher.status();
}

TEST(SignalWatcher, HandsEverySignalToTheLoopInOrder) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::unique_ptr<SignalWatcher> watcher = watcher_in_child();
    uv_loop_t loop;
    uv_loop_init(&loop);
    std::vector<int> seen;
    watcher->hand_to_loop(&loop, [&](int signum) {
      seen.push_back(signum);
      if (seen.size() == 1) {
        // Sent one at a time: two pending SIGTERMs would merge into one.
        ::kill(::getpid(), SIGINT);
      } else if (seen.size() == 2) {
        ::kill(::getpid(), SIGTERM);
      } else {
        watcher->unref();  // the loop may end now
      }
    });
    ::kill(::getpid(), SIGTERM);
    uv_run(&loop, UV_RUN_DEFAULT);
    watcher->release_loop();
    uv_walk(&loop, [](uv_handle_t* h, void*) { uv_close(h, nullptr); }, nullptr);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) ::_exit(11);
    watcher.reset();  // ends its thread
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
      std::unique_ptr<SignalWatcher> watcher = watcher_in_child();
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

// A child that says on `ready` when it got past a signal that must not end it, then takes a
// SIGTERM that must; `setup` runs first, with the watcher started.
void expect_survives_then_dies(const std::function<void(SignalWatcher&, uv_loop_t&)>& setup, int survived_signal) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::unique_ptr<SignalWatcher> watcher = watcher_in_child();
    uv_loop_t loop;
    uv_loop_init(&loop);
    setup(*watcher, loop);
    ::kill(::getpid(), survived_signal);
    ::usleep(200 * 1000);  // time for the signal thread to act on it
    (void)!::write(ready[1], "s", 1);
    watcher->release_loop();
    ::kill(::getpid(), SIGTERM);
    ::pause();
    ::_exit(12);
  }
  ::close(ready[1]);
  char byte = 0;
  EXPECT_EQ(::read(ready[0], &byte, 1), 1) << "the first signal ended the child";
  ::close(ready[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTERM) << "the teardown's signal should end it";
}

// While the exit checkpoints are written (the loop has ended), a signal is logged, not acted on;
// once the loop is released (the teardown), one ends the process again.
TEST(SignalWatcher, AfterTheLoopEndedASignalIsOnlyLoggedUntilTheTeardown) {
  expect_survives_then_dies(
      [](SignalWatcher& watcher, uv_loop_t& loop) {
        watcher.hand_to_loop(&loop, [](int) { ::_exit(13); });  // the loop never runs again
        watcher.loop_ended();
      },
      SIGTERM);
}

// A signal the process was started ignoring (a background job's SIGINT) does not end it while
// it starts, as it did not before the daemon blocked it.
TEST(SignalWatcher, ASignalStartedIgnoredIsDroppedWhileStarting) {
  expect_survives_then_dies(
      [](SignalWatcher&, uv_loop_t&) {
        struct sigaction ignore {};
        ignore.sa_handler = SIG_IGN;
        ::sigaction(SIGINT, &ignore, nullptr);
      },
      SIGINT);
}

}  // namespace
}  // namespace tutel::daemon
