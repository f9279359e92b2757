#include "tutel/ipc/ring.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "ipc_test_util.hpp"
#include "tutel/ipc/arena.hpp"

namespace tutel::ipc {
namespace {

using namespace std::chrono_literals;
using testing::Child;

constexpr uint64_t kArenaBytes = 1 << 20;
constexpr uint64_t kCount = 100000;
// Hang guards, not timing assertions: a stalled peer fails the test instead of blocking ctest.
constexpr auto kHangGuard = 60s;

RequestDescriptor request(uint64_t i) {
  RequestDescriptor d{};
  d.request_id = i;
  d.op = static_cast<uint32_t>(i % 2 == 0 ? Op::kForward : Op::kBackward);
  d.flags = kFlagTraining;
  d.layer_handle = 7;
  d.sequence = i / 2;
  d.tokens = static_cast<int64_t>(i % 1000);
  d.input_offset = 4096 + i * 4;
  d.input_bytes = i * 8;
  d.output_offset = ~i;
  d.output_bytes = i * 16;
  d.dl_aux = static_cast<float>(i % 97);
  return d;
}

bool same(const RequestDescriptor& a, const RequestDescriptor& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

CompletionDescriptor completion(uint64_t i) {
  CompletionDescriptor c{};
  c.request_id = i;
  c.status_code = static_cast<int32_t>(i % 3 == 0 ? 0 : 4);
  c.l_aux = static_cast<float>(i % 101);
  c.capacity = static_cast<int64_t>(i % 513);
  c.dropped = static_cast<int64_t>(i % 7);
  std::snprintf(c.message, sizeof c.message, "request %llu", static_cast<unsigned long long>(i));
  return c;
}

bool same(const CompletionDescriptor& a, const CompletionDescriptor& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

template <typename D>
bool push_until(RingProducer<D>& p, const D& d, std::chrono::steady_clock::time_point deadline) {
  while (!p.try_push(d)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

class RingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<Arena> r = Arena::create(kArenaBytes);
    ASSERT_TRUE(r.ok()) << r.status();
    arena_ = std::move(*r);
  }
  RingProducer<RequestDescriptor> producer() {
    return {arena_.request_control(), arena_.request_slots()};
  }
  RingConsumer<RequestDescriptor> consumer() {
    return {arena_.request_control(), arena_.request_slots()};
  }
  Arena arena_;
};

TEST_F(RingTest, FifoAndFull) {
  auto p = producer();
  auto c = consumer();
  RequestDescriptor out{};
  EXPECT_EQ(c.try_pop(&out), PopResult::kEmpty);
  for (uint64_t i = 0; i < kRingSlots; ++i) ASSERT_TRUE(p.try_push(request(i)));
  EXPECT_FALSE(p.try_push(request(kRingSlots)));  // full
  ASSERT_EQ(c.try_pop(&out), PopResult::kItem);
  EXPECT_TRUE(same(out, request(0)));
  EXPECT_TRUE(p.try_push(request(kRingSlots)));
  for (uint64_t i = 1; i <= kRingSlots; ++i) {
    ASSERT_EQ(c.try_pop(&out), PopResult::kItem);
    EXPECT_TRUE(same(out, request(i)));
  }
  EXPECT_EQ(c.try_pop(&out), PopResult::kEmpty);
}

TEST_F(RingTest, CorruptIndicesAreDetected) {
  auto p = producer();
  auto c = consumer();
  RingControl* ctl = arena_.request_control();
  RequestDescriptor out{};
  ctl->tail.store(1000);
  ctl->head.store(1000 + kRingSlots + 1);  // a hostile producer
  EXPECT_EQ(c.try_pop(&out), PopResult::kCorrupt);
  EXPECT_EQ(ctl->tail.load(), 1000u);  // nothing consumed
  EXPECT_EQ(c.pop_wait(&out, WaitPolicy{}, [] { return false; }), PopResult::kCorrupt);

  ctl->head.store(5);
  ctl->tail.store(9);  // a hostile consumer: tail ahead of head
  EXPECT_EQ(c.try_pop(&out), PopResult::kCorrupt);
  EXPECT_FALSE(p.try_push(request(0)));

  ctl->head.store(kRingSlots);  // exactly full is fine
  ctl->tail.store(0);
  EXPECT_EQ(c.try_pop(&out), PopResult::kItem);
}

TEST_F(RingTest, IndicesKeepWorkingAcrossWraparound) {
  RingControl* ctl = arena_.request_control();
  const uint64_t start = UINT64_MAX - 5;
  ctl->head.store(start);
  ctl->tail.store(start);
  auto p = producer();
  auto c = consumer();
  RequestDescriptor out{};
  for (uint64_t i = 0; i < 20; ++i) {
    ASSERT_TRUE(p.try_push(request(i)));
    ASSERT_EQ(c.try_pop(&out), PopResult::kItem);
    EXPECT_TRUE(same(out, request(i)));
  }
}

TEST_F(RingTest, DeadlinePassedReturnsEmpty) {
  auto c = consumer();
  RequestDescriptor out{};
  EXPECT_EQ(c.pop_wait(
                &out, WaitPolicy{}, [] { return false; }, std::chrono::steady_clock::now()),
            PopResult::kEmpty);
}

TEST_F(RingTest, TwoThreadsPassManyDescriptorsInOrder) {
  auto p = producer();
  auto c = consumer();
  std::atomic<bool> producer_ok{true};
  std::thread t([&] {
    const auto deadline = std::chrono::steady_clock::now() + kHangGuard;
    for (uint64_t i = 0; i < kCount; ++i) {
      if (!push_until(p, request(i), deadline)) {
        producer_ok = false;
        return;
      }
    }
  });
  const WaitPolicy policy{10us, 100ms};
  const auto deadline = std::chrono::steady_clock::now() + kHangGuard;
  uint64_t mismatches = 0;
  uint64_t i = 0;
  for (; i < kCount; ++i) {
    RequestDescriptor out{};
    const PopResult r = c.pop_wait(
        &out, policy, [] { return false; }, deadline);
    if (r != PopResult::kItem) break;
    if (!same(out, request(i))) ++mismatches;
  }
  t.join();
  EXPECT_TRUE(producer_ok);
  EXPECT_EQ(i, kCount);
  EXPECT_EQ(mismatches, 0u);
  RequestDescriptor extra{};
  EXPECT_EQ(c.try_pop(&extra), PopResult::kEmpty);
}

// A client process submits requests while the "daemon" (this process) answers each with a
// completion, both rings busy at once, both sides in their own mapping.
TEST_F(RingTest, TwoProcessesEchoManyDescriptorsInOrder) {
  const int arena_fd = arena_.fd();
  const uint64_t arena_bytes = arena_.layout().arena_bytes;
  Child client([arena_fd, arena_bytes]() -> int {
    Result<Arena> mine = Arena::attach(UniqueFd(::dup(arena_fd)), arena_bytes);
    if (!mine.ok()) return 2;
    RingProducer<RequestDescriptor> requests(mine->request_control(), mine->request_slots());
    RingConsumer<CompletionDescriptor> completions(mine->completion_control(),
                                                   mine->completion_slots());
    std::atomic<bool> push_ok{true};
    std::thread submitter([&] {
      const auto deadline = std::chrono::steady_clock::now() + kHangGuard;
      for (uint64_t i = 0; i < kCount; ++i) {
        if (!push_until(requests, request(i), deadline)) {
          push_ok = false;
          return;
        }
      }
    });
    const auto deadline = std::chrono::steady_clock::now() + kHangGuard;
    int code = 0;
    for (uint64_t i = 0; i < kCount && code == 0; ++i) {
      CompletionDescriptor c{};
      const PopResult r = completions.pop_wait(
          &c, WaitPolicy{20us, 100ms}, [] { return false; }, deadline);
      if (r != PopResult::kItem)
        code = 3;
      else if (!same(c, completion(i)))
        code = 4;
    }
    submitter.join();
    if (!push_ok) return 5;
    return code;
  });
  ASSERT_TRUE(client.started());

  RingConsumer<RequestDescriptor> requests(arena_.request_control(), arena_.request_slots());
  RingProducer<CompletionDescriptor> completions(arena_.completion_control(),
                                                 arena_.completion_slots());
  const auto deadline = std::chrono::steady_clock::now() + kHangGuard;
  for (uint64_t i = 0; i < kCount; ++i) {
    RequestDescriptor d{};
    ASSERT_EQ(requests.pop_wait(
                  &d, WaitPolicy{20us, 100ms}, [] { return false; }, deadline),
              PopResult::kItem)
        << "at request " << i;
    ASSERT_TRUE(same(d, request(i))) << "at request " << i;
    ASSERT_TRUE(push_until(completions, completion(d.request_id), deadline)) << "at request " << i;
  }
  EXPECT_EQ(client.wait_for(kHangGuard), 0);
}

// Runs pop_wait with no spin and unbounded sleeps on another thread; `act` runs once the
// consumer has announced it is going to sleep. Returns what pop_wait returned, or nullopt when
// it never returned (after which the consumer is stopped).
template <typename Act>
std::optional<PopResult> sleep_then(RingConsumer<RequestDescriptor>& c, RingControl* ctl,
                                    std::atomic<bool>& stop, RequestDescriptor* out, Act act) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  PopResult result = PopResult::kEmpty;
  std::thread t([&] {
    const PopResult r = c.pop_wait(out, WaitPolicy{0us, -1ms}, [&] { return stop.load(); });
    std::lock_guard<std::mutex> lock(m);
    result = r;
    done = true;
    cv.notify_all();
  });
  while (ctl->consumer_waiting.load() == 0) std::this_thread::yield();
  act();
  std::unique_lock<std::mutex> lock(m);
  const bool returned = cv.wait_for(lock, kHangGuard, [&] { return done; });
  lock.unlock();
  if (!returned) {
    stop = true;
    c.wake();
  }
  t.join();
  if (!returned) return std::nullopt;
  return result;
}

TEST_F(RingTest, SleepingConsumerIsWokenByAPush) {
  auto p = producer();
  auto c = consumer();
  std::atomic<bool> stop{false};
  RequestDescriptor out{};
  const auto r = sleep_then(c, arena_.request_control(), stop, &out,
                            [&] { ASSERT_TRUE(p.try_push(request(42))); });
  ASSERT_TRUE(r.has_value()) << "the consumer slept through a push";
  EXPECT_EQ(*r, PopResult::kItem);
  EXPECT_TRUE(same(out, request(42)));
  EXPECT_EQ(arena_.request_control()->consumer_waiting.load(), 0u);
}

TEST_F(RingTest, StopIsHonouredWhenWoken) {
  auto c = consumer();
  std::atomic<bool> stop{false};
  RequestDescriptor out{};
  const auto r = sleep_then(c, arena_.request_control(), stop, &out, [&] {
    stop = true;
    c.wake();
  });
  ASSERT_TRUE(r.has_value()) << "wake() did not wake the consumer";
  EXPECT_EQ(*r, PopResult::kEmpty);
}

TEST_F(RingTest, ConsumerInAnotherProcessIsWokenByAPush) {
  const int arena_fd = arena_.fd();
  const uint64_t arena_bytes = arena_.layout().arena_bytes;
  Child daemon([arena_fd, arena_bytes]() -> int {
    Result<Arena> mine = Arena::attach(UniqueFd(::dup(arena_fd)), arena_bytes);
    if (!mine.ok()) return 2;
    RingConsumer<RequestDescriptor> c(mine->request_control(), mine->request_slots());
    RequestDescriptor out{};
    // Unbounded sleeps: only a cross-process FUTEX_WAKE brings it back.
    if (c.pop_wait(&out, WaitPolicy{0us, -1ms}, [] { return false; }) != PopResult::kItem) return 3;
    return same(out, request(9)) ? 0 : 4;
  });
  ASSERT_TRUE(daemon.started());
  RingControl* ctl = arena_.request_control();
  while (ctl->consumer_waiting.load() == 0) std::this_thread::yield();
  auto p = producer();
  ASSERT_TRUE(p.try_push(request(9)));
  EXPECT_EQ(daemon.wait_for(kHangGuard), 0) << "-2: the consumer slept through the push";
}

}  // namespace
}  // namespace tutel::ipc
