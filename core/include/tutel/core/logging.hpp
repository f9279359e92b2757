// A small leveled logger and an always-on invariant check.
//
//   TUTEL_LOG(INFO) << "loaded " << n << " experts";
//   TUTEL_CHECK(offset <= size) << "offset " << offset;
//
// Each message becomes one line on stderr: UTC timestamp, level, thread id, file:line and
// the text. A disabled level costs one relaxed atomic load; the streamed operands are not
// evaluated. TUTEL_CHECK is active in every build type: it guards broken invariants, not
// expected failures (those are a Status).
//
// Thread-safety: every function and macro may be used from any thread. A line is formatted
// privately and handed to the kernel in one write(2), so concurrent lines never interleave
// (for a pipe, lines up to PIPE_BUF = 4096 bytes).
#pragma once

#include <atomic>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

namespace tutel {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Messages below `level` are dropped. The default is kInfo.
void set_log_level(LogLevel level);
LogLevel log_level();
// "DEBUG", "INFO", "WARN", "ERROR".
std::string_view log_level_name(LogLevel level);
// Accepts debug | info | warn | warning | error, in any letter case.
std::optional<LogLevel> parse_log_level(std::string_view name);

// `text` from outside the process (a client's name or path, a config file's key), safe to put
// in a log line, a message or a terminal: backslash, `quote` (when not 0) and control characters
// escaped as \\, \" and \xNN, so a newline cannot forge a log line; C1 controls and Unicode's
// bidirectional and invisible formatting controls as \uXXXX, so no terminal obeys them nor
// reorders the line; every other byte, UTF-8 included, kept.
std::string escape_text(std::string_view text, char quote = 0);
// `text` escaped as escape_text does, between two `quote` characters and cut to its first
// `limit` bytes (at a UTF-8 character's start) with "..." after it where it is longer: a name
// read from a file or sent by a client, shown in a message whatever it holds and however long.
std::string quote_text(std::string_view text, char quote = '\'', size_t limit = 200);
// Whether `text` holds a character escape_text escapes as a control (backslashes and quotes
// aside): text that does not can be shown as it is.
bool has_control_characters(std::string_view text);

namespace detail {

// The logger's only state: the minimum level, read on every TUTEL_LOG.
extern std::atomic<int> g_min_log_level;

inline bool log_enabled(LogLevel level) {
  return static_cast<int>(level) >= g_min_log_level.load(std::memory_order_relaxed);
}

// Collects one message; the destructor writes the line.
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

// Collects the message of a failed TUTEL_CHECK; the destructor writes it and aborts.
class CheckFailure {
 public:
  CheckFailure(const char* condition, const char* file, int line);
  [[noreturn]] ~CheckFailure();
  CheckFailure(const CheckFailure&) = delete;
  CheckFailure& operator=(const CheckFailure&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

// Turns `stream << ...` into void so both arms of the macros' conditional have one type.
// `&` binds looser than `<<`, so the whole chain is built first.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace detail
}  // namespace tutel

#define TUTEL_LOG_LEVEL_DEBUG ::tutel::LogLevel::kDebug
#define TUTEL_LOG_LEVEL_INFO ::tutel::LogLevel::kInfo
#define TUTEL_LOG_LEVEL_WARN ::tutel::LogLevel::kWarn
#define TUTEL_LOG_LEVEL_ERROR ::tutel::LogLevel::kError

// The macros end in a stream the caller continues with <<, so they cannot be parenthesised.
// NOLINTBEGIN(bugprone-macro-parentheses)

// TUTEL_LOG(DEBUG | INFO | WARN | ERROR) << ...;
#define TUTEL_LOG(severity)                                 \
  !::tutel::detail::log_enabled(TUTEL_LOG_LEVEL_##severity) \
      ? (void)0                                             \
      : ::tutel::detail::LogVoidify() &                     \
            ::tutel::detail::LogMessage(TUTEL_LOG_LEVEL_##severity, __FILE__, __LINE__).stream()

// Aborts with file:line, the condition and the streamed message when `condition` is false.
#define TUTEL_CHECK(condition)                      \
  __builtin_expect(static_cast<bool>(condition), 1) \
      ? (void)0                                     \
      : ::tutel::detail::LogVoidify() &             \
            ::tutel::detail::CheckFailure(#condition, __FILE__, __LINE__).stream()
// NOLINTEND(bugprone-macro-parentheses)
