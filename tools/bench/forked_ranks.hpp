// Ranks for tutel-bench a2a: forked children that report result lines to the parent over pipes,
// and threads of one such child. Everything UCX happens in the children; the parent only reads
// lines and reaps, so it never holds UCX state.
//
// Thread-safety: ReportPipe::line() may be called from several threads of a child at once;
// run_ranks() and run_threads() are called from one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::bench {

// A child's alarm, armed at its fork and re-armed by the child at every measurement point: a
// hang becomes SIGALRM. The parent gives up on a group that sends nothing for this long plus a
// margin.
inline constexpr unsigned kPointGuardSeconds = 120;

// How a child hands a result line to the parent (newlines in `text` become spaces).
class ReportPipe {
 public:
  explicit ReportPipe(int fd) : fd_(fd) {}
  void line(std::string text) const;

 private:
  int fd_;
  mutable std::mutex mutex_;  // a line longer than PIPE_BUF takes several writes
};

// What child `index` runs; its Status decides its exit code.
using RankBody = std::function<Status(int index, const ReportPipe& report)>;

// Forks `size` children with UCX_TLS = `tls` (and UCX_NET_DEVICES=lo); child i runs body(i).
// Every line a child reports reaches on_line as it arrives. OK when every child exited 0;
// otherwise an error naming each failed child ("<member> 2 (pid 4242): ...") and what it said.
Status run_ranks(int size, const char* tls, const RankBody& body,
                 const std::function<void(const std::string&)>& on_line,
                 std::string_view member = "rank");

// Runs body(r) for r in [0, count) on `count` threads of this process and joins them. OK when
// every one returned OK; otherwise an error naming the failed ranks and why.
Status run_threads(int count, const std::function<Status(int rank)>& body);

// A loopback port that was free a moment ago (bind to port 0, read it back); 0 if none.
uint16_t free_loopback_port();

}  // namespace tutel::bench
