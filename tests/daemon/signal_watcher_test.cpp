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
#include <optional>
#include <string>
#include <vector>

#include "tutel/daemon/daemon.hpp"

namespace tutel::daemon {
namespace {

// In a forked child: a guard against hangs, the signals blocked, the watcher started (the child
// exits with 10 if it cannot be).
std::unique_ptr<SignalWatcher> watcher_in_child() {
  ::alarm(60);
  // The default actions, whatever the test runner inherited (a background job's SIGINT is
  // ignored, which the watcher honours).
  for (int signum : {SIGTERM, SIGINT}) ::signal(signum, SIG_DFL);
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
        ::kill(::getpid(), SIGUSR1);  // logged and ignored: never handed to the loop
        ::kill(::getpid(), SIGTERM);
      } else {
        watcher->unref();  // the loop may end now
      }
    });
    ::kill(::getpid(), SIGTERM);
    uv_run(&loop, UV_RUN_DEFAULT);
    watcher->release_loop(std::nullopt);
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

// How a child ended, and what it wrote to stderr (the watcher's log lines).
struct ChildEnd {
  int status = 0;
  std::string stderr_text;
  bool survived_first = false;  // it got past the signal that must not end it
};

// A child that gets past a signal that must not end it (saying so on a pipe), is then released
// with `exit_code` (release_loop) and takes a SIGTERM that must end it; `setup` runs first, with
// the watcher started. Its stderr comes back.
ChildEnd survive_then_release(const std::function<void(SignalWatcher&, uv_loop_t&)>& setup, int survived_signal,
                              std::optional<int> exit_code) {
  ChildEnd end;
  int ready[2], err[2];
  if (::pipe(ready) != 0 || ::pipe(err) != 0) return end;
  const pid_t child = ::fork();
  if (child < 0) return end;
  if (child == 0) {
    ::dup2(err[1], 2);
    std::unique_ptr<SignalWatcher> watcher = watcher_in_child();
    uv_loop_t loop;
    uv_loop_init(&loop);
    setup(*watcher, loop);
    ::kill(::getpid(), survived_signal);
    ::usleep(200 * 1000);  // time for the signal thread to act on it
    (void)!::write(ready[1], "s", 1);
    watcher->release_loop(exit_code);
    ::kill(::getpid(), SIGTERM);
    ::pause();
    ::_exit(12);
  }
  ::close(ready[1]);
  ::close(err[1]);
  char byte = 0;
  end.survived_first = ::read(ready[0], &byte, 1) == 1;
  ::close(ready[0]);
  ::waitpid(child, &end.status, 0);
  char buf[4096];
  ssize_t n;
  while ((n = ::read(err[0], buf, sizeof buf)) > 0) end.stderr_text.append(buf, static_cast<size_t>(n));
  ::close(err[0]);
  return end;
}

// A stray SIGUSR1 or SIGUSR2 (a log rotation's) is logged and ignored, whatever the daemon's part
// of its life: its default action ended the daemon without its exit checkpoints.
TEST(SignalWatcher, AStraySignalIsLoggedAndIgnored) {
  for (int signum : {SIGUSR1, SIGUSR2}) {
    const ChildEnd end = survive_then_release([](SignalWatcher&, uv_loop_t&) {}, signum, std::nullopt);
    EXPECT_TRUE(end.survived_first) << end.stderr_text;
    const std::string said = "(SIGUSR" + std::to_string(signum == SIGUSR1 ? 1 : 2) + ") from pid ";
    EXPECT_NE(end.stderr_text.find(said), std::string::npos) << end.stderr_text;
    EXPECT_NE(end.stderr_text.find("ignored: tuteld stops at SIGTERM or SIGINT"), std::string::npos)
        << end.stderr_text;
    ASSERT_TRUE(WIFSIGNALED(end.status)) << "exited with " << WEXITSTATUS(end.status);
    EXPECT_EQ(WTERMSIG(end.status), SIGTERM);
  }
}

// While the exit checkpoints are written (the loop has ended), a signal is logged, not acted on;
// once the loop is released for a daemon that never served, one ends the process by its default
// action.
TEST(SignalWatcher, AfterTheLoopEndedASignalIsOnlyLoggedUntilTheTeardown) {
  const ChildEnd end = survive_then_release(
      [](SignalWatcher& watcher, uv_loop_t& loop) {
        watcher.hand_to_loop(&loop, [](int) { ::_exit(13); });  // the loop never runs again
        watcher.loop_ended();
      },
      SIGTERM, std::nullopt);
  EXPECT_TRUE(end.survived_first) << end.stderr_text;
  EXPECT_NE(end.stderr_text.find("signal 15: already shutting down (the exit checkpoints are being written"),
            std::string::npos)
      << end.stderr_text;
  ASSERT_TRUE(WIFSIGNALED(end.status)) << "exited with " << WEXITSTATUS(end.status);
  EXPECT_EQ(WTERMSIG(end.status), SIGTERM);
}

// In the teardown of a daemon that ran, a signal ends the process with the daemon's exit code:
// 75 (an exit checkpoint failed) must not become a death by SIGTERM, which a service manager
// reads as a clean stop.
TEST(SignalWatcher, InTheTeardownASignalKeepsTheDaemonsExitCode) {
  const ChildEnd end = survive_then_release(
      [](SignalWatcher& watcher, uv_loop_t& loop) {
        watcher.hand_to_loop(&loop, [](int) { ::_exit(13); });
        watcher.loop_ended();
      },
      SIGINT, kExitCheckpointFailed);
  EXPECT_TRUE(end.survived_first) << end.stderr_text;
  ASSERT_TRUE(WIFEXITED(end.status)) << "killed by " << WTERMSIG(end.status);
  EXPECT_EQ(WEXITSTATUS(end.status), kExitCheckpointFailed);
  EXPECT_NE(end.stderr_text.find("signal 15 during the teardown: exiting now with 75"), std::string::npos)
      << end.stderr_text;
}

// A signal the process was started ignoring (a background job's SIGINT) does not end it while
// it starts, as it did not before the daemon blocked it.
TEST(SignalWatcher, ASignalStartedIgnoredIsDroppedWhileStarting) {
  const ChildEnd end = survive_then_release(
      [](SignalWatcher&, uv_loop_t&) {
        struct sigaction ignore {};
        ignore.sa_handler = SIG_IGN;
        ::sigaction(SIGINT, &ignore, nullptr);
      },
      SIGINT, std::nullopt);
  EXPECT_TRUE(end.survived_first) << end.stderr_text;
  EXPECT_NE(end.stderr_text.find("signal 2 ignored: tuteld was started ignoring it"), std::string::npos)
      << end.stderr_text;
  ASSERT_TRUE(WIFSIGNALED(end.status)) << "exited with " << WEXITSTATUS(end.status);
  EXPECT_EQ(WTERMSIG(end.status), SIGTERM);
}

}  // namespace
}  // namespace tutel::daemon
