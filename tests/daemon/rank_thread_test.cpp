// RankThread: a CPU rank's one thread for its ops (the process's one OpenMP master per rank), and
// the layer's steps handed to it whole. A compute op of the rank found on another thread (a
// session's worker, a pool thread) would make that thread an OpenMP master with a team of its
// own, and enough of them make libgomp stop spinning for every region.
#include "rank_thread.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "rank_thread_backend.hpp"
#include "registry.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::daemon {
namespace {

using std::chrono::microseconds;

TEST(RankThread, RunsClosuresOnItsThreadAndNestedOnesInline) {
  RankThread thread("test-rank", microseconds(50));
  EXPECT_FALSE(thread.on_thread());
  std::thread::id ran_on;
  const int got = thread.run([&] {
    ran_on = std::this_thread::get_id();
    EXPECT_TRUE(thread.on_thread());
    // Called on the thread itself: inline (handed over, it would wait for itself).
    return thread.run([&] { return 41; }) + 1;
  });
  EXPECT_EQ(got, 42);
  EXPECT_NE(ran_on, std::this_thread::get_id());
  EXPECT_EQ(thread.handed_over(), 1u);
  thread.run([] {});  // void closures too
  EXPECT_EQ(thread.handed_over(), 2u);
}

TEST(RankThread, RethrowsWhatAClosureThrewAndServesOn) {
  RankThread thread("test-rank", microseconds(0));
  EXPECT_THROW(thread.run([]() -> int { throw std::runtime_error("boom"); }), std::runtime_error);
  EXPECT_EQ(thread.run([] { return 7; }), 7);
  try {
    thread.run([] { throw std::bad_alloc(); });
    ADD_FAILURE() << "nothing was thrown";
  } catch (const std::bad_alloc&) {
  }
  EXPECT_EQ(thread.run([] { return 8; }), 8);
}

// Callers on many threads are served one at a time, each closure whole, every one of them; with
// and without the thread's spin (so that both of its ways to wait are taken).
TEST(RankThread, CallersOnManyThreadsAreServedOneAtATime) {
  for (const microseconds spin : {microseconds(0), microseconds(50)}) {
    RankThread thread("test-rank", spin);
    constexpr int kCallers = 4, kRuns = 500;
    int total = 0;  // not atomic: only the rank thread writes it
    std::atomic<int> inside{0}, most_inside{0};
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c)
      callers.emplace_back([&, c] {
        std::mt19937 rng(c);
        for (int i = 0; i < kRuns; ++i) {
          thread.run([&] {
            most_inside = std::max(most_inside.load(), ++inside);
            ++total;
            --inside;
          });
          // Now and then a pause, so that the thread falls asleep between closures.
          if (rng() % 50 == 0) std::this_thread::sleep_for(microseconds(200));
        }
      });
    for (auto& t : callers) t.join();
    EXPECT_EQ(total, kCallers * kRuns);
    EXPECT_EQ(most_inside.load(), 1);
    EXPECT_EQ(thread.handed_over(), uint64_t{kCallers * kRuns});
  }
}

// The CPU backend, recording the thread every compute op ran on.
class ThreadRecorder final : public ForwardingBackend {
 public:
  explicit ThreadRecorder(std::unique_ptr<Backend> cpu) : ForwardingBackend(std::move(cpu)) {}
  std::set<std::thread::id> threads() const {
    std::lock_guard lock(mutex_);
    return threads_;
  }
  Status fill_zero(TensorView t) override { return note(ForwardingBackend::fill_zero(t)); }
  Status gate_forward(const GateForwardArgs& a) override { return note(ForwardingBackend::gate_forward(a)); }
  Status encode(const EncodeArgs& a) override { return note(ForwardingBackend::encode(a)); }
  Status decode(const DecodeArgs& a) override { return note(ForwardingBackend::decode(a)); }
  Status expert_forward(const ExpertForwardArgs& a) override { return note(ForwardingBackend::expert_forward(a)); }
  Status expert_backward(const ExpertBackwardArgs& a) override {
    return note(ForwardingBackend::expert_backward(a));
  }
  Status gate_backward(const GateBackwardArgs& a) override { return note(ForwardingBackend::gate_backward(a)); }
  Status sgd_step(const SgdArgs& a) override { return note(ForwardingBackend::sgd_step(a)); }
  Status add_sum_squares(TensorView src, TensorView dst) override {
    return note(ForwardingBackend::add_sum_squares(src, dst));
  }
  Status scale(TensorView t, float factor) override { return note(ForwardingBackend::scale(t, factor)); }

 private:
  Status note(Status st) {
    std::lock_guard lock(mutex_);
    threads_.insert(std::this_thread::get_id());
    return st;
  }
  mutable std::mutex mutex_;
  std::set<std::thread::id> threads_;
};

// A layer created, trained and stepped from threads other than the rank's (as sessions' workers
// and pool threads call it) computes on the rank's thread alone; a step's ops go there with the
// step (ServedLayer::on_rank), not one by one, so forwards, backwards and the optimizer's calls
// hand no single op over.
TEST(RankThread, ALayersOpsAllRunOnItsRanksThread) {
  std::vector<std::unique_ptr<Rank>> ranks;
  auto rank = std::make_unique<Rank>();
  rank->thread = std::make_unique<RankThread>("test-rank", microseconds(50));
  auto cpu = make_backend("cpu", BackendOptions{.threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto recorder = std::make_unique<ThreadRecorder>(std::move(cpu).value());
  ThreadRecorder& recorded = *recorder;
  auto on_thread = std::make_unique<RankThreadBackend>(std::move(recorder), *rank->thread);
  RankThreadBackend& backend = *on_thread;
  rank->backend = std::move(on_thread);
  Rank& r = *rank;
  ranks.push_back(std::move(rank));
  TenantConfig tenant;
  tenant.name = "a";
  Registry registry({tenant}, ranks);
  const std::string spec = "name = \"l\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 3\n"
                           "[optimizer]\nkind = \"sgd\"\nlr = 0.1\n";
  auto def = parse_layer_spec(spec, "test");
  ASSERT_TRUE(def.ok()) << def.status();
  Result<LayerRef> created = Status::Internal("not run");
  std::thread([&] { created = registry.create("a", *def, spec); }).join();  // as a pool thread does
  ASSERT_TRUE(created.ok()) << created.status();
  ServedLayer& layer = *created->layer;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(24 * 16), y(24 * 16), dx(24 * 16);
  for (float& v : x) v = normal(rng);
  const uint64_t created_with = backend.ops_handed_over();
  auto train = [&](uint64_t sequence) {
    ASSERT_TRUE(layer.forward(x.data(), 24, y.data(), /*training=*/true, 1, sequence).ok());
    ASSERT_TRUE(layer.backward(y.data(), 24, 0.5f, dx.data(), 1, sequence).ok());
    ASSERT_TRUE(layer.forward(x.data(), 24, y.data(), /*training=*/false, 1, 0).ok());
    ASSERT_TRUE(layer.grad_norm().ok());
    ASSERT_TRUE(layer.scale_grads(0.5).ok());
    ASSERT_TRUE(layer.step().ok());
    ASSERT_TRUE(layer.zero_grad(/*set_to_none=*/false).ok());
  };
  std::thread first([&] { train(1); });  // as one session's worker
  first.join();
  std::thread second([&] { train(2); });  // and another's
  second.join();
  EXPECT_EQ(backend.ops_handed_over(), created_with) << "a step's op was handed over alone";
  EXPECT_EQ(recorded.threads(), std::set<std::thread::id>{[&] { return r.thread->run([] {
              return std::this_thread::get_id(); }); }()});
  EXPECT_GT(r.thread->handed_over(), 0u);
}

}  // namespace
}  // namespace tutel::daemon
