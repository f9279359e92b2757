// The process's own resources for the metrics: /proc/<pid>/stat and /proc/stat parsed, well formed
// or not, and this test process's own numbers read.
#include "process_stats.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

namespace tutel::daemon {
namespace {

// A stat line of proc(5)'s layout: fields 1 (pid), 2 (comm), then 3.. as given, 52 in all.
std::string stat_line(const std::string& comm, std::vector<std::string> fields = {}) {
  if (fields.empty()) {
    for (int n = 3; n <= 52; ++n) fields.push_back(std::to_string(n * 10));
    fields[0] = "S";
  }
  std::string line = "4242 (" + comm + ")";
  for (const std::string& f : fields) line += " " + f;
  return line + "\n";
}

TEST(ProcStat, TakesTheFieldsByTheirNumbers) {
  auto s = parse_proc_stat(stat_line("tuteld"));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->utime_ticks, 140u);
  EXPECT_EQ(s->stime_ticks, 150u);
  EXPECT_EQ(s->threads, 200u);
  EXPECT_EQ(s->start_ticks, 220u);
  EXPECT_EQ(s->virtual_bytes, 230u);
  EXPECT_EQ(s->resident_pages, 240u);
}

// A command name is the program's to choose (prctl PR_SET_NAME): spaces and parentheses in it
// must not shift the fields.
TEST(ProcStat, ACommandNameWithSpacesAndParenthesesShiftsNothing) {
  for (const std::string comm : {"a b", "x) 1 2 (y", "))", "(", ""}) {
    auto s = parse_proc_stat(stat_line(comm));
    ASSERT_TRUE(s.ok()) << "'" << comm << "': " << s.status();
    EXPECT_EQ(s->utime_ticks, 140u) << comm;
    EXPECT_EQ(s->resident_pages, 240u) << comm;
  }
}

TEST(ProcStat, MalformedTextIsACorruptionNamingWhat) {
  std::vector<std::string> short_fields = {"S", "1", "2"};
  std::vector<std::string> bad_number;
  for (int n = 3; n <= 52; ++n) bad_number.push_back(std::to_string(n));
  bad_number[14 - 3] = "-5";
  std::vector<std::string> huge = bad_number;
  huge[14 - 3] = "99999999999999999999999";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "no command name"},
      {"4242 tuteld S 1 2 3", "no command name"},
      {stat_line("tuteld", short_fields), "field 14 missing"},
      {stat_line("tuteld", bad_number), "field 14"},
      {stat_line("tuteld", huge), "field 14"},
      {std::string("4242 (t) S ") + std::string(100, '1') + "x", "field"},
  };
  for (const auto& [text, says] : cases) {
    auto s = parse_proc_stat(text);
    ASSERT_FALSE(s.ok()) << "'" << text << "'";
    EXPECT_EQ(s.status().code(), StatusCode::kCorruption) << s.status();
    EXPECT_NE(s.status().message().find(says), std::string_view::npos) << s.status();
  }
}

TEST(ProcBootTime, ReadsTheBtimeLineAndRefusesOthers) {
  auto t = parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1764633600\nprocesses 7\n");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, 1764633600u);
  EXPECT_EQ(*parse_boot_time("btime 12"), 12u);  // no trailing newline
  for (const char* bad : {"", "cpu 1\n", "btime\n", "btime x\n", "btime 12 13\n", "xbtime 5\n", "btime -1\n"}) {
    auto r = parse_boot_time(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "'";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status();
    }
  }
}

// This process, against what it can see of itself otherwise.
TEST(ProcessStats, ReadsThisProcess) {
  auto s = read_process_stats();
  ASSERT_TRUE(s.ok()) << s.status();
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_LE(s->start_time_seconds, now + 1);
  EXPECT_GT(s->start_time_seconds, now - 24 * 3600) << "a test process started within the day";
  EXPECT_GE(s->cpu_seconds, 0.0);
  EXPECT_GT(s->resident_bytes, uint64_t{1} << 20);
  EXPECT_GE(s->virtual_bytes, s->resident_bytes);
  EXPECT_GE(s->threads, 1u);
  // Open descriptors: stdin/out/err at least, and one more when this test opens one.
  EXPECT_GE(s->open_fds, 3u);
  EXPECT_GE(s->max_fds, s->open_fds);
  const int fd = ::dup(1);
  ASSERT_GE(fd, 0);
  auto more = read_process_stats();
  ::close(fd);
  ASSERT_TRUE(more.ok()) << more.status();
  EXPECT_EQ(more->open_fds, s->open_fds + 1);
}

}  // namespace
}  // namespace tutel::daemon
