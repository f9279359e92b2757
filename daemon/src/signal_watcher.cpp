#include "signal_watcher.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <optional>
#include <string>

#include "tutel/core/logging.hpp"
#include "tutel/daemon/daemon.hpp"

namespace tutel::daemon {
namespace {

// Whether the process was started with `signum` ignored (nobody in tuteld sets SIG_IGN on it):
// blocked, such a signal is queued instead of dropped, and must not take the default action.
bool started_ignoring(int signum) {
  struct sigaction current {};
  return ::sigaction(signum, nullptr, &current) == 0 && !(current.sa_flags & SA_SIGINFO) &&
         current.sa_handler == SIG_IGN;
}

// Signals whose default action would end the daemon without its exit checkpoints, which a
// careless operator sends (a log rotation's SIGUSR1): logged and ignored.
bool is_stray(int signum) { return signum == SIGUSR1 || signum == SIGUSR2; }

// The signals the watcher takes: the termination signals and the stray ones. (Not SIGHUP: UCX
// installs its own handler for it before main, so whether tuteld was started ignoring it, as
// nohup does, cannot be seen; docs/decisions.md.)
sigset_t watched_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int signum : {SIGTERM, SIGINT, SIGUSR1, SIGUSR2}) sigaddset(&set, signum);
  return set;
}

void log_already_shutting_down(int signum) {
  TUTEL_LOG(WARN) << "signal " << signum << ": already shutting down (the exit checkpoints are being "
                  << "written; SIGKILL loses what is not written yet)";
}

// Ends the process by `signum`'s default action, as if it had never been blocked: a service
// manager sees a process killed by SIGTERM, not an exit code.
[[noreturn]] void die_by(int signum) {
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  ::sigaction(signum, &default_action, nullptr);
  sigset_t only;
  sigemptyset(&only);
  sigaddset(&only, signum);
  ::pthread_kill(::pthread_self(), signum);  // pending for this thread, which now unblocks it
  ::pthread_sigmask(SIG_UNBLOCK, &only, nullptr);
  ::_exit(128 + signum);  // not reached
}

}  // namespace

void block_termination_signals() {
  const sigset_t set = watched_signals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

Result<std::unique_ptr<SignalWatcher>> SignalWatcher::start() {
  sigset_t current;
  ::pthread_sigmask(SIG_BLOCK, nullptr, &current);
  for (int signum : {SIGTERM, SIGINT})
    if (!sigismember(&current, signum))
      return Status::Internal(std::string(signum == SIGTERM ? "SIGTERM" : "SIGINT") +
                              " is not blocked in the thread that starts the daemon: block SIGTERM and SIGINT "
                              "(block_termination_signals) first thing in main, before any thread starts, so that "
                              "every thread inherits the mask and only the daemon's signal thread takes them");
  std::unique_ptr<SignalWatcher> watcher(new SignalWatcher());
  watcher->thread_ = std::thread([w = watcher.get()] { w->wait_for_signals(); });
  return watcher;
}

SignalWatcher::~SignalWatcher() {
  if (!thread_.joinable()) return;  // its start threw
  stopping_.store(true, std::memory_order_release);
  ::pthread_kill(thread_.native_handle(), SIGTERM);  // wakes its sigwaitinfo, for this thread alone
  thread_.join();
}

void SignalWatcher::wait_for_signals() {
  // Named for ps and /proc: while it waits, the kernel shows the signals unblocked in this thread
  // alone (sigwaitinfo takes them off its blocked set for the wait).
  ::pthread_setname_np(::pthread_self(), "tuteld-signals");
  const sigset_t set = watched_signals();
  for (;;) {
    siginfo_t info{};
    const int signum = ::sigwaitinfo(&set, &info);
    if (stopping_.load(std::memory_order_acquire)) return;
    if (signum < 0) {
      assert(errno == EINTR);  // the set is valid: nothing else can fail
      continue;
    }
    if (is_stray(signum)) {
      TUTEL_LOG(WARN) << "signal " << signum << " (SIGUSR" << (signum == SIGUSR1 ? 1 : 2) << ") from pid "
                      << info.si_pid << " ignored: tuteld stops at SIGTERM or SIGINT";
      continue;
    }
    // Decided under the lock, done after it: a log line may block on a stalled stderr, and the
    // loop's thread takes the lock to change modes.
    Mode mode;
    std::optional<int> exit_code;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      mode = mode_;
      exit_code = exit_code_;
      if (mode == Mode::kToLoop) {
        queued_.push_back(signum);
        uv_async_send(&wake_loop_);
      }
    }
    switch (mode) {
      case Mode::kEndProcess:
        if (started_ignoring(signum)) {
          TUTEL_LOG(INFO) << "signal " << signum << " ignored: tuteld was started ignoring it";
          break;
        }
        if (exit_code) {  // the daemon ran: its exit code stands (75 says a checkpoint was lost)
          TUTEL_LOG(WARN) << "signal " << signum << " during the teardown: exiting now with " << *exit_code;
          ::_exit(*exit_code);
        }
        die_by(signum);
      case Mode::kToLoop:
        break;
      case Mode::kLogOnly:
        log_already_shutting_down(signum);
        break;
    }
  }
}

void SignalWatcher::hand_to_loop(uv_loop_t* loop, std::function<void(int)> on_signal) {
  on_signal_ = std::move(on_signal);
  uv_async_init(loop, &wake_loop_, [](uv_async_t* h) { static_cast<SignalWatcher*>(h->data)->deliver_queued(); });
  wake_loop_.data = this;
  wake_loop_ready_ = true;
  std::lock_guard<std::mutex> lock(mutex_);
  mode_ = Mode::kToLoop;
}

void SignalWatcher::deliver_queued() {
  std::vector<int> signals;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    signals.swap(queued_);
  }
  for (int signum : signals) on_signal_(signum);
}

void SignalWatcher::unref() {
  if (wake_loop_ready_) uv_unref(reinterpret_cast<uv_handle_t*>(&wake_loop_));
}

void SignalWatcher::loop_ended() {
  std::vector<int> unread;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    unread.swap(queued_);
    mode_ = Mode::kLogOnly;
  }
  // Signals queued for the loop that will not run again: said as any later one is.
  for (int signum : unread) log_already_shutting_down(signum);
}

void SignalWatcher::release_loop(std::optional<int> exit_code) {
  std::lock_guard<std::mutex> lock(mutex_);
  mode_ = Mode::kEndProcess;
  exit_code_ = exit_code;
}

}  // namespace tutel::daemon
