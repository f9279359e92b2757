#include "tutel/core/logging.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace tutel {

namespace detail {
std::atomic<int> g_min_log_level{static_cast<int>(LogLevel::kInfo)};
}  // namespace detail

void set_log_level(LogLevel level) {
  detail::g_min_log_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel log_level() {
  return static_cast<LogLevel>(detail::g_min_log_level.load(std::memory_order_relaxed));
}

std::string_view log_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarn:
      return "WARN";
    case LogLevel::kError:
      return "ERROR";
  }
  return "?";
}

std::optional<LogLevel> parse_log_level(std::string_view name) {
  std::string lower(name);
  for (char& c : lower)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warn" || lower == "warning") return LogLevel::kWarn;
  if (lower == "error") return LogLevel::kError;
  return std::nullopt;
}

namespace detail {
namespace {

// Full paths from __FILE__ make lines long without telling more than the file name does.
const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

// "2025-01-31T12:34:56.123456Z"
void append_timestamp(std::string& out) {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  tm utc{};
  gmtime_r(&now.tv_sec, &utc);
  char buf[40];
  const int n = std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ",
                              utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour,
                              utc.tm_min, utc.tm_sec, static_cast<long>(now.tv_nsec / 1000));
  if (n > 0) out.append(buf, std::min(static_cast<size_t>(n), sizeof(buf) - 1));
}

std::string format_line(std::string_view level, const char* file, int line, std::string_view text) {
  std::string out;
  out.reserve(64 + text.size());
  append_timestamp(out);
  out += ' ';
  out += level;
  out += ' ';
  out += std::to_string(static_cast<long>(syscall(SYS_gettid)));
  out += ' ';
  out += base_name(file);
  out += ':';
  out += std::to_string(line);
  out += "] ";
  out += text;
  if (out.back() != '\n') out += '\n';
  return out;
}

// One write(2) per line is what keeps concurrent lines whole; the loop only finishes a
// line the kernel cut short (a signal, a full pipe).
void write_stderr(std::string_view line) {
  while (!line.empty()) {
    const ssize_t n = ::write(STDERR_FILENO, line.data(), line.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // Nowhere left to report a failing stderr.
    }
    line.remove_prefix(static_cast<size_t>(n));
  }
}

}  // namespace

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level), file_(file), line_(line) {}

LogMessage::~LogMessage() {
  write_stderr(format_line(log_level_name(level_), file_, line_, stream_.str()));
}

CheckFailure::CheckFailure(const char* condition, const char* file, int line)
    : file_(file), line_(line) {
  stream_ << "Check failed: " << condition << ' ';
}

CheckFailure::~CheckFailure() {
  write_stderr(format_line("FATAL", file_, line_, stream_.str()));
  std::abort();
}

}  // namespace detail

namespace {

// The bytes of the control character that starts at text[i], 0 where none does: 1 for a C0
// control or DEL; 2 or 3 for the UTF-8 of a C1 control (U+0080..U+009F: 0xC2 0x80..0x9F; some
// terminals obey U+009B as CSI) or of a bidirectional or invisible formatting control
// (U+200B..U+200F, U+202A..U+202E, U+2066..U+2069: E2 80 8B..8F, E2 80 AA..AE, E2 81 A6..A9),
// which can make a line read as something else.
size_t control_bytes(std::string_view text, size_t i) {
  const auto at = [&](size_t k) { return i + k < text.size() ? static_cast<unsigned char>(text[i + k]) : 0; };
  const unsigned char c = at(0);
  if (c < 0x20 || c == 0x7f) return 1;
  if (c == 0xC2 && at(1) >= 0x80 && at(1) <= 0x9F) return 2;
  if (c == 0xE2 && ((at(1) == 0x80 && ((at(2) >= 0x8B && at(2) <= 0x8F) || (at(2) >= 0xAA && at(2) <= 0xAE))) ||
                    (at(1) == 0x81 && at(2) >= 0xA6 && at(2) <= 0xA9)))
    return 3;
  return 0;
}

}  // namespace

bool has_control_characters(std::string_view text) {
  for (size_t i = 0; i < text.size(); ++i)
    if (control_bytes(text, i) > 0) return true;
  return false;
}

std::string escape_text(std::string_view text, char quote) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    const auto c = static_cast<unsigned char>(ch);
    char buf[16];
    switch (control_bytes(text, i)) {
      case 1:  // \xNN
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
        out += buf;
        continue;
      case 2:  // \u followed by the code point
        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned char>(text[i + 1]));
        out += buf;
        i += 1;
        continue;
      case 3:
        std::snprintf(buf, sizeof buf, "\\u%04x",
                      0x2000 + ((text[i + 1] & 0x3F) << 6) + (text[i + 2] & 0x3F));
        out += buf;
        i += 2;
        continue;
    }
    if (ch == '\\' || (quote != 0 && ch == quote)) out += '\\';
    out += ch;
  }
  return out;
}

std::string quote_text(std::string_view text, char quote, size_t limit) {
  size_t kept = std::min(limit, text.size());
  // Not into a multi-byte character: back to its first byte, so the cut leaves no stray bytes.
  if (kept < text.size())
    while (kept > 0 && (static_cast<unsigned char>(text[kept]) & 0xC0) == 0x80) --kept;
  std::string out(1, quote);  // built by appending (GCC 12's -Wrestrict misfires on "'" + ...)
  out += escape_text(text.substr(0, kept), quote);
  if (kept < text.size()) out += "...";
  out += quote;
  return out;
}

}  // namespace tutel
