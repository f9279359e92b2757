// The Prometheus endpoint: GET (and HEAD) /metrics over HTTP/1.1 on a TCP port, one request per
// connection, on the daemon's event loop.
//
// Any local process may connect, and the daemon's loop ends (and its shutdown checkpoints run)
// only once every handle on it is closed. So no connection may hold the endpoint or the loop for
// long: each is closed kDeadline after it was accepted, answered or not; at most kMaxConnections
// are open, a new one closing the oldest of those still sending their request (the oldest of all
// only when every one is being answered); and close() closes every one of them.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <list>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

// The whole HTTP answer to a request whose head is `head` (its request line first, or after one
// empty line): 200 with render()'s text for GET /metrics (a query string allowed, the target in
// origin or absolute form), its headers alone for HEAD; 405 with
// the methods allowed for another method on /metrics; 404 for another path; 400 for a request
// line that is not "<method> <target> HTTP/<version>". render runs only for a 200.
std::string metrics_http_answer(std::string_view head, const std::function<std::string()>& render);

class MetricsHttpServer {
 public:
  static constexpr uint64_t kDeadlineMs = 5000;
  static constexpr size_t kMaxConnections = 32;
  static constexpr size_t kMaxRequestHead = 8192;

  // `render` gives the Prometheus text; it runs on the loop thread.
  MetricsHttpServer(uv_loop_t* loop, std::function<std::string()> render);
  ~MetricsHttpServer();  // after close() and the loop's last run: nothing may still refer to it
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Listens on `host` (an IPv4 or IPv6 literal) and `port` (0: any free port).
  Status listen(const std::string& host, int port);
  int port() const { return port_; }
  // Stops listening and closes every connection (their callbacks then run on the loop).
  void close();

 private:
  struct Connection;
  void accept();
  void close_connection(Connection* c);
  Connection* eviction_candidate() const;
  void close_expired();

  uv_loop_t* loop_;
  std::function<std::string()> render_;
  uv_tcp_t listener_{};
  uv_timer_t sweep_{};  // closes connections past their deadline
  bool listening_ = false;
  int port_ = 0;
  std::list<Connection*> open_;  // oldest first
};

}  // namespace tutel::daemon
