// memcpy between two threads' buffers: the ceiling of the `memory` transport (memcpy_ceiling.hpp).
#include "memcpy_ceiling.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

namespace tutel::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kCacheLine = 64;

// Two (or more) threads meet here. It spins, since a sleeping waiter would add its wake-up
// (~20 us) to the run it times, but yields after a while: on a busy machine both threads may
// share one core, and a waiter that kept spinning would hold it for a whole time slice.
class SpinBarrier {
 public:
  explicit SpinBarrier(int count) : count_(count) {}
  void arrive_and_wait() {
    const uint64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpinsBeforeYield = 4096;
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
};

// Reads one byte per cache line of `sweep`: the lines it loads evict whatever was cached.
// (Stores could bypass the cache: glibc's memset streams large sizes.)
void evict_caches(const std::vector<uint8_t>& sweep) {
  uint8_t sum = 0;
  for (size_t i = 0; i < sweep.size(); i += kCacheLine) sum ^= sweep[i];
  asm volatile("" : : "r"(sum) : "memory");
}

// "32768K" / "32M" / "1048576".
size_t parse_cache_size(const std::string& text) {
  size_t value = 0, i = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9')
    value = value * 10 + (text[i++] - '0');
  if (i < text.size() && (text[i] == 'K' || text[i] == 'k')) value <<= 10;
  if (i < text.size() && (text[i] == 'M' || text[i] == 'm')) value <<= 20;
  if (i < text.size() && (text[i] == 'G' || text[i] == 'g')) value <<= 30;
  return value;
}

std::string read_line(const std::string& path) {
  char buf[64] = {};
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return "";
  if (std::fgets(buf, sizeof buf, f) == nullptr) buf[0] = '\0';
  std::fclose(f);
  std::string line(buf);
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
  return line;
}

int64_t median(std::vector<int64_t> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

size_t last_level_cache_bytes(size_t fallback) {
  // /sys first: in a VM, sysconf may report the host's L3 rather than what this guest gets.
  int best_level = 0;
  size_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    const std::string level = read_line(dir + "/level"), type = read_line(dir + "/type");
    if (level.empty()) break;
    const size_t bytes = parse_cache_size(read_line(dir + "/size"));
    if (type == "Instruction" || bytes == 0) continue;
    if (std::stoi(level) >= best_level) {
      best_level = std::stoi(level);
      best = bytes;
    }
  }
  if (best > 0) return best;
  for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
    const long bytes = ::sysconf(name);
    if (bytes > 0) return static_cast<size_t>(bytes);
  }
  return fallback;
}

Result<CopyCeiling> measure_copy_ceiling(size_t size, int repeats, size_t llc_bytes) {
  CopyCeiling result;
  result.cold = size > llc_bytes;
  const size_t copies =
      result.cold ? 1 : std::clamp<size_t>(kCopyBytesPerRun / size, 1, kCopiesPerRun);
  result.bytes_per_run = copies * size;

  struct Buffers {
    std::vector<uint8_t> source, destination;
  };
  Buffers buffers[2];
  std::vector<uint8_t> sweep(result.cold ? 2 * llc_bytes : 0, 1);
  SpinBarrier barrier(2);
  std::binary_semaphore one_way_done(0);
  std::vector<int64_t> times[2];  // [both ways], thread 0's

  // `copies` copies of `from` into `to`; returns their time.
  auto copy = [&](const uint8_t* from, uint8_t* to) -> int64_t {
    const auto t0 = Clock::now();
    for (size_t c = 0; c < copies; ++c) {
      std::memcpy(to, from, size);
      asm volatile("" : : "r"(to) : "memory");  // every copy happens, none is merged
    }
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  };
  auto body = [&](int id) {
    Buffers& own = buffers[id];
    own.source.assign(size, static_cast<uint8_t>(id + 1));  // first touched by its owner
    own.destination.assign(size, 0);
    barrier.arrive_and_wait();  // both threads' buffers exist
    const uint8_t* from = own.source.data();
    uint8_t* to = buffers[1 - id].destination.data();
    // One way: thread 0 alone, while thread 1 sleeps (on a busy machine it would take a core).
    if (id == 0) {
      for (int i = 0; i < 1 + repeats; ++i) {  // the first run warms up
        if (result.cold) evict_caches(sweep);
        const int64_t ns = copy(from, to);
        if (i > 0) times[0].push_back(ns);
      }
      one_way_done.release();
    } else {
      one_way_done.acquire();
    }
    // Both ways: each run starts when both threads leave the barrier, ends when both are back.
    for (int i = 0; i < 1 + repeats; ++i) {
      if (id == 0 && result.cold) evict_caches(sweep);
      barrier.arrive_and_wait();
      const auto t0 = Clock::now();
      copy(from, to);
      barrier.arrive_and_wait();
      if (id == 0 && i > 0)
        times[1].push_back(
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
    }
  };
  std::thread helper(body, 1);
  body(0);
  helper.join();

  for (int id = 0; id < 2; ++id) {
    const uint8_t want = static_cast<uint8_t>(2 - id);  // the other thread's source
    const std::vector<uint8_t>& got = buffers[id].destination;
    if (!std::all_of(got.begin(), got.end(), [want](uint8_t b) { return b == want; }))
      return Status::Corruption("memcpy ceiling: thread " + std::to_string(id) +
                                "'s buffer does not hold what thread " + std::to_string(1 - id) +
                                " copied into it");
  }
  result.one_way_ns = median(times[0]);
  result.both_ways_ns = median(times[1]);
  return result;
}

}  // namespace tutel::bench
