#include "signal_watcher.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <string>

namespace tutel::daemon {
namespace {

sigset_t termination_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
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
  const sigset_t set = termination_signals();
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

SignalWatcher::~SignalWatcher() { stop(); }

void SignalWatcher::wait_for_signals() {
  // Named for ps and /proc: while it waits, the kernel shows the signals unblocked in this thread
  // alone (sigwaitinfo takes them off its blocked set for the wait).
  ::pthread_setname_np(::pthread_self(), "tuteld-signals");
  const sigset_t set = termination_signals();
  for (;;) {
    siginfo_t info{};
    const int signum = ::sigwaitinfo(&set, &info);
    if (stopping_.load(std::memory_order_acquire)) return;
    if (signum < 0) {
      assert(errno == EINTR);  // the set is valid: nothing else can fail
      continue;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (!handed_) die_by(signum);
    queued_.push_back(signum);
    uv_async_send(&wake_loop_);
  }
}

void SignalWatcher::hand_to_loop(uv_loop_t* loop, std::function<void(int)> on_signal) {
  on_signal_ = std::move(on_signal);
  uv_async_init(loop, &wake_loop_, [](uv_async_t* h) { static_cast<SignalWatcher*>(h->data)->deliver_queued(); });
  wake_loop_.data = this;
  wake_loop_ready_ = true;
  std::lock_guard<std::mutex> lock(mutex_);
  handed_ = true;
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

void SignalWatcher::stop() {
  if (!thread_.joinable()) return;
  stopping_.store(true, std::memory_order_release);
  ::pthread_kill(thread_.native_handle(), SIGTERM);  // wakes its sigwaitinfo, for this thread alone
  thread_.join();
}

}  // namespace tutel::daemon
