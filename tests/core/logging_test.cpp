#include "tutel/core/logging.hpp"

#include <gtest/gtest.h>

#include <cstddef>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace tutel {
namespace {

// Restores the process-wide level, so tests don't leak it into each other.
class LoggingTest : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = log_level(); }
  void TearDown() override { set_log_level(saved_); }

 private:
  LogLevel saved_ = LogLevel::kInfo;
};

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

const std::regex& line_pattern() {
  static const std::regex pattern(
      R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z (DEBUG|INFO|WARN|ERROR) \d+ )"
      R"(logging_test\.cpp:\d+\] (.*))");
  return pattern;
}

TEST_F(LoggingTest, ParsesLevelNames) {
  EXPECT_EQ(parse_log_level("debug"), LogLevel::kDebug);
  EXPECT_EQ(parse_log_level("INFO"), LogLevel::kInfo);
  EXPECT_EQ(parse_log_level("Warn"), LogLevel::kWarn);
  EXPECT_EQ(parse_log_level("warning"), LogLevel::kWarn);
  EXPECT_EQ(parse_log_level("error"), LogLevel::kError);
  EXPECT_FALSE(parse_log_level("").has_value());
  EXPECT_FALSE(parse_log_level("verbose").has_value());
  EXPECT_FALSE(parse_log_level("info ").has_value());
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError})
    EXPECT_EQ(parse_log_level(log_level_name(l)), l);
}

TEST_F(LoggingTest, SetLevelIsVisible) {
  set_log_level(LogLevel::kError);
  EXPECT_EQ(log_level(), LogLevel::kError);
  set_log_level(LogLevel::kDebug);
  EXPECT_EQ(log_level(), LogLevel::kDebug);
}

TEST_F(LoggingTest, WritesOneFormattedLine) {
  set_log_level(LogLevel::kInfo);
  testing::internal::CaptureStderr();
  const int line = __LINE__ + 1;
  TUTEL_LOG(WARN) << "expert " << 3 << " is " << 1.5 << "x over capacity";
  const std::string out = testing::internal::GetCapturedStderr();
  const std::vector<std::string> lines = split_lines(out);
  ASSERT_EQ(lines.size(), 1u) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_match(lines[0], m, line_pattern())) << lines[0];
  EXPECT_EQ(m[1], "WARN");
  EXPECT_EQ(m[2], "expert 3 is 1.5x over capacity");
  EXPECT_NE(lines[0].find("logging_test.cpp:" + std::to_string(line) + "]"), std::string::npos);
  EXPECT_EQ(out.back(), '\n');
}

TEST_F(LoggingTest, DisabledLevelsWriteNothingAndSkipOperands) {
  set_log_level(LogLevel::kWarn);
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  testing::internal::CaptureStderr();
  TUTEL_LOG(DEBUG) << count();
  TUTEL_LOG(INFO) << count();
  TUTEL_LOG(WARN) << count();
  TUTEL_LOG(ERROR) << count();
  const std::vector<std::string> lines = split_lines(testing::internal::GetCapturedStderr());
  EXPECT_EQ(evaluated, 2);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_NE(lines[0].find(" WARN "), std::string::npos);
  EXPECT_NE(lines[1].find(" ERROR "), std::string::npos);
}

TEST_F(LoggingTest, MacroIsOneStatementInsideIfElse) {
  set_log_level(LogLevel::kInfo);
  testing::internal::CaptureStderr();
  for (const bool flag : {true, false})
    if (flag)
      TUTEL_LOG(INFO) << "then";
    else
      TUTEL_LOG(INFO) << "else";
  const std::vector<std::string> lines = split_lines(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(lines[0].ends_with("] then"));
  EXPECT_TRUE(lines[1].ends_with("] else"));
}

TEST_F(LoggingTest, ConcurrentLinesStayWhole) {
  set_log_level(LogLevel::kInfo);
  constexpr int kThreads = 4;
  constexpr int kLinesPerThread = 250;
  const std::string padding(200, 'x');
  testing::internal::CaptureStderr();
  {
    std::vector<std::jthread> threads;
    threads.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([t, &padding] {
        for (int i = 0; i < kLinesPerThread; ++i)
          TUTEL_LOG(INFO) << "thread " << t << " line " << i << ' ' << padding;
      });
  }
  const std::vector<std::string> lines = split_lines(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kLinesPerThread));
  std::set<std::pair<int, int>> seen;
  const std::regex payload(R"(thread (\d+) line (\d+) (x+))");
  for (const std::string& line : lines) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, line_pattern())) << line;
    const std::string text = m[2];
    std::smatch p;
    ASSERT_TRUE(std::regex_match(text, p, payload)) << line;
    EXPECT_EQ(p[3].length(), padding.size());
    seen.emplace(std::stoi(p[1]), std::stoi(p[2]));
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kThreads * kLinesPerThread));
}

TEST_F(LoggingTest, PassingCheckSkipsItsMessage) {
  int evaluated = 0;
  TUTEL_CHECK(1 + 1 == 2) << ++evaluated;
  EXPECT_EQ(evaluated, 0);
}

TEST(LoggingDeathTest, FailedCheckAbortsWithLocationAndMessage) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const int limit = 4;
  EXPECT_DEATH(TUTEL_CHECK(limit > 10) << "limit was " << limit,
               R"(FATAL [0-9]+ logging_test\.cpp:[0-9]+\] Check failed: limit > 10 limit was 4)");
}

// Text from outside the process cannot forge a log line or end a quoted value early; the rest,
// UTF-8 included, reads as it was.
TEST(EscapeText, EscapesControlCharactersBackslashAndTheQuoteOnly) {
  EXPECT_EQ(escape_text("plain name-1.safetensors"), "plain name-1.safetensors");
  EXPECT_EQ(escape_text("a\nb\tc\x7f"), "a\\x0ab\\x09c\\x7f");
  EXPECT_EQ(escape_text(std::string("nul\0cut", 7)), "nul\\x00cut");
  EXPECT_EQ(escape_text("back\\slash \"q\""), "back\\\\slash \"q\"");
  EXPECT_EQ(escape_text("back\\slash \"q\"", '"'), "back\\\\slash \\\"q\\\"");
  EXPECT_EQ(escape_text("caf\xc3\xa9"), "caf\xc3\xa9");
  EXPECT_EQ(escape_text(""), "");
}

// What a terminal would obey or that reorders a line is escaped too: C1 controls (U+009B is CSI
// to some terminals) and Unicode's bidirectional and invisible formatting controls; neighbours
// of them in UTF-8 (U+00A0, U+2010, U+202F, U+2065) are kept, and a cut sequence is kept as bytes.
TEST(EscapeText, EscapesC1AndBidirectionalControls) {
  EXPECT_EQ(escape_text("\xc2\x9b" "2J"), "\\u009b2J");
  EXPECT_EQ(escape_text("\xc2\x80|\xc2\x9f|\xc2\xa0"), "\\u0080|\\u009f|\xc2\xa0");
  EXPECT_EQ(escape_text("\xe2\x80\xae" "evil"), "\\u202eevil");
  EXPECT_EQ(escape_text("\xe2\x80\x8b|\xe2\x80\x8f|\xe2\x80\xaa|\xe2\x81\xa6|\xe2\x81\xa9"),
            "\\u200b|\\u200f|\\u202a|\\u2066|\\u2069");
  EXPECT_EQ(escape_text("\xe2\x80\x90|\xe2\x80\xaf|\xe2\x81\xa5"), "\xe2\x80\x90|\xe2\x80\xaf|\xe2\x81\xa5");
  EXPECT_EQ(escape_text("\xe2\x80"), "\xe2\x80");
  EXPECT_EQ(escape_text("\xc2"), "\xc2");
  EXPECT_EQ(escape_text("\x1b]0;title\x07"), "\\x1b]0;title\\x07");
}

// quote_text: escape_text between quotes, cut at a character's start with "..." past the limit.
TEST(QuoteText, QuotesEscapesAndCutsAtACharactersStart) {
  EXPECT_EQ(quote_text("w"), "'w'");
  EXPECT_EQ(quote_text(""), "''");
  EXPECT_EQ(quote_text("it's\n"), "'it\\'s\\x0a'");
  EXPECT_EQ(quote_text("say \"x\"", '"'), "\"say \\\"x\\\"\"");
  EXPECT_EQ(quote_text("abcdef", '\'', 6), "'abcdef'");
  EXPECT_EQ(quote_text("abcdefg", '\'', 6), "'abcdef...'");
  // "caf\xc3\xa9" cut at 4 bytes would end inside the é: the cut moves to its start.
  EXPECT_EQ(quote_text("caf\xc3\xa9s", '\'', 4), "'caf...'");
  EXPECT_EQ(quote_text("caf\xc3\xa9s", '\'', 5), "'caf\xc3\xa9...'");
  // A control cut in half is not left as a stray byte either.
  EXPECT_EQ(quote_text("ab\xe2\x80\xae", '\'', 4), "'ab...'");
  EXPECT_EQ(quote_text(std::string(1000, 'x'), '\'', 0), "'...'");
}

}  // namespace
}  // namespace tutel
