#include "process_stats.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <charconv>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

namespace tutel::daemon {
namespace {

Result<uint64_t> number(std::string_view field, std::string_view what) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (ec != std::errc() || end != field.data() + field.size() || field.empty())
    return Status::Corruption(std::string(what) + ": '" + std::string(field.substr(0, 32)) +
                              "' is not an unsigned integer");
  return v;
}

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::Unavailable("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

Result<ProcStat> parse_proc_stat(std::string_view text) {
  const size_t name_end = text.rfind(')');
  if (name_end == std::string_view::npos || text.find('(') == std::string_view::npos)
    return Status::Corruption("/proc stat: no command name in parentheses");
  // Fields after the name, numbered as in proc(5): 3 is the state.
  std::vector<std::string_view> fields;
  std::string_view rest = text.substr(name_end + 1);
  while (!rest.empty()) {
    const size_t begin = rest.find_first_not_of(" \n");
    if (begin == std::string_view::npos) break;
    rest.remove_prefix(begin);
    const size_t end = rest.find_first_of(" \n");
    fields.push_back(rest.substr(0, end));
    rest.remove_prefix(end == std::string_view::npos ? rest.size() : end);
  }
  auto field = [&](size_t n) -> Result<uint64_t> {  // n as proc(5) numbers it
    if (n - 3 >= fields.size())
      return Status::Corruption("/proc stat: " + std::to_string(fields.size() + 2) + " fields, field " +
                                std::to_string(n) + " missing");
    return number(fields[n - 3], "/proc stat field " + std::to_string(n));
  };
  ProcStat s;
  TUTEL_ASSIGN_OR_RETURN(s.utime_ticks, field(14));
  TUTEL_ASSIGN_OR_RETURN(s.stime_ticks, field(15));
  TUTEL_ASSIGN_OR_RETURN(s.threads, field(20));
  TUTEL_ASSIGN_OR_RETURN(s.start_ticks, field(22));
  TUTEL_ASSIGN_OR_RETURN(s.virtual_bytes, field(23));
  TUTEL_ASSIGN_OR_RETURN(s.resident_pages, field(24));
  return s;
}

Result<uint64_t> parse_boot_time(std::string_view text) {
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find('\n', at);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(at, end - at);
    if (line.rfind("btime ", 0) == 0) return number(line.substr(6), "/proc/stat btime");
    at = end + 1;
  }
  return Status::Corruption("/proc/stat: no btime line");
}

Result<ProcessStats> read_process_stats() {
  TUTEL_ASSIGN_OR_RETURN(const std::string stat_text, read_file("/proc/self/stat"));
  TUTEL_ASSIGN_OR_RETURN(const ProcStat stat, parse_proc_stat(stat_text));
  TUTEL_ASSIGN_OR_RETURN(const std::string system_text, read_file("/proc/stat"));
  TUTEL_ASSIGN_OR_RETURN(const uint64_t boot, parse_boot_time(system_text));
  const long ticks = ::sysconf(_SC_CLK_TCK), page = ::sysconf(_SC_PAGESIZE);
  if (ticks <= 0 || page <= 0) return Status::Internal("sysconf gives no clock tick or page size");
  ProcessStats out;
  out.cpu_seconds = static_cast<double>(stat.utime_ticks + stat.stime_ticks) / static_cast<double>(ticks);
  out.start_time_seconds = static_cast<double>(boot) + static_cast<double>(stat.start_ticks) / static_cast<double>(ticks);
  out.virtual_bytes = stat.virtual_bytes;
  out.resident_bytes = stat.resident_pages * static_cast<uint64_t>(page);
  out.threads = stat.threads;
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/proc/self/fd", ec), end; !ec && it != end; it.increment(ec))
    ++out.open_fds;
  if (ec) return Status::Unavailable("cannot list /proc/self/fd: " + ec.message());
  if (out.open_fds > 0) --out.open_fds;  // the listing's own descriptor
  if (rlimit files{}; ::getrlimit(RLIMIT_NOFILE, &files) == 0) out.max_fds = files.rlim_cur;
  return out;
}

}  // namespace tutel::daemon
