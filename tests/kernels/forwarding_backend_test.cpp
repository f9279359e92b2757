// ForwardingBackend passes the optional calls too (they have do-nothing defaults, so a wrapper
// that forgot one would compile and silently answer for the inner backend): a daemon's plans run
// on its ActivationBackend, and the CUDA graph plan asks it for the native stream, the scratch
// epoch and the join of forked work.
#include <gtest/gtest.h>

#include <memory>

#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::testing {
namespace {

// A CPU backend that answers the optional calls itself and counts them.
class ProbeBackend final : public ForwardingBackend {
 public:
  explicit ProbeBackend(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  Status register_host(void*, size_t) override {
    ++registers;
    return Status::OK();
  }
  Status unregister_host(void*) override {
    ++unregisters;
    return Status::OK();
  }
  void* native_stream() const override { return const_cast<int*>(&stream_marker); }
  uint64_t scratch_epoch() const override { return 41; }
  Status join_forked_work() override {
    ++joins;
    return Status::OK();
  }

  std::string describe() const override { return "probe: " + ForwardingBackend::describe(); }

  int registers = 0, unregisters = 0, joins = 0;
  const int stream_marker = 0;
};

class Wrapper final : public ForwardingBackend {
 public:
  explicit Wrapper(Backend& inner) : ForwardingBackend(inner) {}
};

TEST(ForwardingBackend, PassesTheOptionalCallsToTheInnerBackend) {
  auto cpu = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ProbeBackend probe(std::move(cpu).value());
  Wrapper outer(probe);
  int host = 0;
  EXPECT_TRUE(outer.register_host(&host, sizeof host).ok());
  EXPECT_TRUE(outer.unregister_host(&host).ok());
  EXPECT_TRUE(outer.join_forked_work().ok());
  EXPECT_EQ(probe.registers, 1);
  EXPECT_EQ(probe.unregisters, 1);
  EXPECT_EQ(probe.joins, 1);
  EXPECT_EQ(outer.native_stream(), probe.native_stream());
  EXPECT_EQ(outer.scratch_epoch(), 41u);
  EXPECT_EQ(outer.name(), "cpu");
  EXPECT_EQ(outer.describe(), probe.describe());
  EXPECT_EQ(outer.describe().rfind("probe: cpu: 1 thread, ", 0), 0u) << outer.describe();
}

}  // namespace
}  // namespace tutel::testing
