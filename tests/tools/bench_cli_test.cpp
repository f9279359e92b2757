// tutel-bench's command line: usage errors exit 2 before anything runs, and a thread count past
// the machine's CPUs is run but said.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <utility>

namespace {

// Runs tutel-bench with `args` (stdout and stderr together); its exit status and output.
std::pair<int, std::string> bench(const std::string& args) {
  FILE* p = ::popen((std::string(TUTEL_BENCH_BIN) + " " + args + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(TutelBenchCli, UsageErrorsExitTwoBeforeMeasuring) {
  for (const char* args : {"grads --threads 5000", "grads --threads -1", "layer --threads 5000",
                           "grads --floats 0", "layer --backend nope", "no-such-subcommand", "grads --repeats x"}) {
    const auto [code, out] = bench(args);
    EXPECT_EQ(code, 2) << args << ":\n" << out;
    EXPECT_EQ(out.find("median"), std::string::npos) << args << " measured:\n" << out;
  }
}

TEST(TutelBenchCli, MoreThreadsThanCpusAreRunAndSaid) {
  cpu_set_t allowed;
  ASSERT_EQ(::sched_getaffinity(0, sizeof allowed, &allowed), 0);
  const int cpus = CPU_COUNT(&allowed);
  ASSERT_GT(cpus, 0);
  const auto [over, said] = bench("grads --floats 1000 --repeats 1 --threads " + std::to_string(cpus + 1));
  EXPECT_EQ(over, 0) << said;
  EXPECT_NE(said.find("--threads " + std::to_string(cpus + 1) + " is more than the " + std::to_string(cpus) +
                      " CPUs this process may use"),
            std::string::npos)
      << said;
  EXPECT_NE(said.find("median of 1"), std::string::npos) << said;
  const auto [within, quiet] = bench("grads --floats 1000 --repeats 1 --threads 1");
  EXPECT_EQ(within, 0) << quiet;
  EXPECT_EQ(quiet.find("is more than"), std::string::npos) << quiet;
}

}  // namespace
