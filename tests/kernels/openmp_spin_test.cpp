// What the executables that compute run OpenMP with (tutel/kernels/openmp_spin.hpp): libgomp's
// idle spin bounded to kOpenmpSpinCount unless the environment chose, read back from libgomp
// itself (omp_display_env) in a probe program started under each environment.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "tutel/kernels/openmp_spin.hpp"

extern char** environ;

namespace {

struct ProbeRun {
  pid_t pid = -1;
  int status = -1;
  std::string output;  // stdout and stderr
};

// Runs the probe (by the path `program`, the probe's own by default) with `args` under the test's
// environment less GOMP_SPINCOUNT and OMP_WAIT_POLICY, plus `extra_env`; through `loader` where
// one is given.
ProbeRun run_probe(const std::vector<std::string>& extra_env, const std::vector<std::string>& args = {},
                   const std::string& loader = "", const std::string& program = OPENMP_SPIN_PROBE) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    if (kv.rfind("GOMP_SPINCOUNT=", 0) == 0 || kv.rfind("OMP_WAIT_POLICY=", 0) == 0) continue;
    env.push_back(kv);
  }
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp, argv;
  for (auto& kv : env) envp.push_back(kv.data());
  envp.push_back(nullptr);
  std::string bin = loader.empty() ? program : loader;
  std::vector<std::string> all_args{bin};
  if (!loader.empty()) all_args.push_back(program);
  all_args.insert(all_args.end(), args.begin(), args.end());
  for (auto& a : all_args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int out[2];
  EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_adddup2(&actions, out[1], 2);
  ProbeRun run;
  const int rc = ::posix_spawn(&run.pid, bin.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  EXPECT_EQ(rc, 0) << std::strerror(rc);
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    run.output.append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  if (rc == 0) ::waitpid(run.pid, &run.status, 0);
  return run;
}

// libgomp's spin count as it reports it ("  GOMP_SPINCOUNT = '10000'").
std::string libgomp_spin(const std::string& output) {
  const std::string key = "GOMP_SPINCOUNT = '";
  const size_t at = output.find(key);
  if (at == std::string::npos) return "(not reported)";
  const size_t begin = at + key.size();
  return output.substr(begin, output.find('\'', begin) - begin);
}

TEST(OpenmpSpin, WithoutAChoiceTheProgramRunsAgainWithTheBoundedSpin) {
  const ProbeRun run = run_probe({"TUTEL_PROBE_MARK=kept"}, {"two words", "", "--flag=x"});
  ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_EQ(libgomp_spin(run.output), tutel::kOpenmpSpinCount) << run.output;
  EXPECT_NE(run.output.find(std::string("env GOMP_SPINCOUNT [") + tutel::kOpenmpSpinCount + "]"), std::string::npos)
      << run.output;
  // The same process (an exec, not a child), with its arguments and the caller's environment.
  EXPECT_NE(run.output.find("pid " + std::to_string(run.pid) + "\n"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("arg [two words]\narg []\narg [--flag=x]\n"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("mark [kept]"), std::string::npos) << run.output;
  // Named after its own file, not "exe" (ps and pgrep go by this name).
  EXPECT_NE(run.output.find("comm openmp_spin_pro\n"), std::string::npos) << run.output;
  EXPECT_EQ(run.output.find("warning"), std::string::npos) << run.output;
}

// Started through a symbolic link (an operator's name for the daemon), it keeps the link's name.
TEST(OpenmpSpin, AProgramStartedThroughALinkKeepsTheLinksName) {
  char dir[] = "/tmp/tutel-spin-link-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string link = std::string(dir) + "/renamed-probe";
  ASSERT_EQ(::symlink(OPENMP_SPIN_PROBE, link.c_str()), 0) << std::strerror(errno);
  const ProbeRun run = run_probe({}, {}, "", link);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_EQ(libgomp_spin(run.output), tutel::kOpenmpSpinCount) << run.output;
  EXPECT_NE(run.output.find("comm renamed-probe\n"), std::string::npos) << run.output;
}

// Started through the dynamic loader, executing /proc/self/exe would run the loader with the
// program's arguments: it does not, says why, and runs on with libgomp's default.
// The system's loader, and a copy of it elsewhere (a bundled or private loader is what such a
// start usually uses).
TEST(OpenmpSpin, AProgramStartedThroughALoaderRunsOnAndSaysWhy) {
  const std::string system_loader = "/lib64/ld-linux-x86-64.so.2";
  if (::access(system_loader.c_str(), X_OK) != 0) GTEST_SKIP() << "no " << system_loader << " here";
  char dir[] = "/tmp/tutel-loader-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string copy = std::string(dir) + "/my-ld.so";
  std::filesystem::copy_file(system_loader, copy);
  std::filesystem::permissions(copy, std::filesystem::perms::owner_all);
  for (const std::string& loader : {system_loader, copy}) {
    SCOPED_TRACE(loader);
    const ProbeRun run = run_probe({}, {"a", "b"}, loader);
    ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
    EXPECT_NE(run.output.find("warning: cannot execute itself again to bound OpenMP's spin: it was started through a "
                              "dynamic loader; idle OpenMP threads spin for libgomp's default"),
              std::string::npos)
        << run.output;
    EXPECT_NE(run.output.find(std::string("set GOMP_SPINCOUNT=") + tutel::kOpenmpSpinCount), std::string::npos)
        << run.output;
    EXPECT_NE(run.output.find("arg [a]\narg [b]\n"), std::string::npos) << run.output;
    EXPECT_EQ(libgomp_spin(run.output), "300000") << run.output;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TEST(OpenmpSpin, AnOperatorsSpinCountStands) {
  const ProbeRun run = run_probe({"GOMP_SPINCOUNT=123"});
  ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_EQ(libgomp_spin(run.output), "123") << run.output;
}

TEST(OpenmpSpin, AnOperatorsWaitPolicyPicksLibgompsOwnSpin) {
  {
    const ProbeRun run = run_probe({"OMP_WAIT_POLICY=passive"});
    ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
    EXPECT_EQ(libgomp_spin(run.output), "0") << run.output;
    EXPECT_NE(run.output.find("env GOMP_SPINCOUNT [(unset)]"), std::string::npos) << run.output;
  }
  {
    const ProbeRun run = run_probe({"OMP_WAIT_POLICY=ACTIVE"});
    ASSERT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
    EXPECT_EQ(libgomp_spin(run.output), "30000000000") << run.output;  // libgomp's "5 minutes"
  }
}

}  // namespace
