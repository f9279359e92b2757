#include "tutel/ipc/ring.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <ctime>

namespace tutel::ipc {
namespace {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t),
              "the futex word must be a plain 32-bit integer in shared memory");

uint32_t* futex_word(std::atomic<uint32_t>* word) { return reinterpret_cast<uint32_t*>(word); }

}  // namespace

void futex_wake_all(std::atomic<uint32_t>* word) {
  // Not FUTEX_WAKE_PRIVATE: the sleeper is usually in the other process.
  ::syscall(SYS_futex, futex_word(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::milliseconds timeout) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout.count() >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1000);
    ts.tv_nsec = static_cast<long>((timeout.count() % 1000) * 1000000);
    tsp = &ts;
  }
  // EAGAIN (the word already changed), EINTR and ETIMEDOUT all mean "look again": callers loop.
  ::syscall(SYS_futex, futex_word(word), FUTEX_WAIT, expected, tsp, nullptr, 0);
}

}  // namespace tutel::ipc
