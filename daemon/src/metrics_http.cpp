#include "metrics_http.hpp"

#include <algorithm>
#include <cassert>
#include <memory>
#include <utility>

namespace tutel::daemon {

struct MetricsHttpServer::Connection {
  uv_tcp_t tcp{};
  uv_write_t write{};
  MetricsHttpServer* server = nullptr;
  std::list<Connection*>::iterator position;  // in server->open_ while not closing
  uint64_t accepted_ms = 0;                   // uv_now at accept
  std::string request, response;  // response: empty until the request is read
  // Its request is read and its answer being written (every answer has a head: never empty).
  bool answering() const { return !response.empty(); }
};

namespace {

// Prometheus' text exposition format.
const std::string kContentType = "text/plain; version=0.0.4";

// `extra_headers`: whole lines, each ending in CRLF. `with_body` false: a HEAD's answer, the
// headers of the body without it.
std::string http_response(int code, const char* reason, const std::string& content_type, const std::string& body,
                          const std::string& extra_headers = "", bool with_body = true) {
  return "HTTP/1.1 " + std::to_string(code) + " " + reason + "\r\nContent-Type: " + content_type +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + extra_headers +
         "Connection: close\r\n\r\n" + (with_body ? body : std::string());
}

uv_handle_t* handle(uv_tcp_t* tcp) { return reinterpret_cast<uv_handle_t*>(tcp); }
uv_stream_t* stream(uv_tcp_t* tcp) { return reinterpret_cast<uv_stream_t*>(tcp); }

}  // namespace

std::string metrics_http_answer(std::string_view head, const std::function<std::string()>& render) {
  // An empty line before the request line is ignored (RFC 9112 §2.2).
  if (head.starts_with("\r\n")) head.remove_prefix(2);
  else if (head.starts_with("\n")) head.remove_prefix(1);
  std::string_view line = head.substr(0, head.find('\n'));
  if (line.ends_with('\r')) line.remove_suffix(1);
  const size_t first = line.find(' '), second = first == line.npos ? line.npos : line.find(' ', first + 1);
  const std::string_view method = line.substr(0, first);
  const std::string_view target = second == line.npos ? std::string_view() : line.substr(first + 1, second - first - 1);
  const std::string_view version = second == line.npos ? std::string_view() : line.substr(second + 1);
  if (method.empty() || target.empty() || !version.starts_with("HTTP/") || version.find(' ') != version.npos)
    return http_response(400, "Bad Request", "text/plain",
                         "expected a request line \"GET /metrics HTTP/1.1\"\n");
  // The absolute form ("http://127.0.0.1:9464/metrics"), which a server must accept (RFC 9112
  // §3.2.2): its path.
  std::string_view path = target.substr(0, target.find('?'));
  for (std::string_view scheme : {"http://", "https://"})
    if (path.starts_with(scheme)) {
      const size_t slash = path.find('/', scheme.size());
      path = slash == path.npos ? std::string_view("/") : path.substr(slash);
    }
  if (path != "/metrics")
    return http_response(404, "Not Found", "text/plain", "only /metrics is served here\n");
  if (method == "GET") return http_response(200, "OK", kContentType, render());
  if (method == "HEAD") return http_response(200, "OK", kContentType, render(), "", /*with_body=*/false);
  return http_response(405, "Method Not Allowed", "text/plain", "/metrics answers GET and HEAD\n",
                       "Allow: GET, HEAD\r\n");
}

MetricsHttpServer::MetricsHttpServer(uv_loop_t* loop, std::function<std::string()> render)
    : loop_(loop), render_(std::move(render)) {}

MetricsHttpServer::~MetricsHttpServer() { assert(!listening_ && open_.empty() && "close() it and run the loop first"); }

Status MetricsHttpServer::listen(const std::string& host, int port) {
  assert(!listening_);
  uv_tcp_init(loop_, &listener_);
  listener_.data = this;
  sockaddr_storage addr{};
  int rc = host.find(':') != std::string::npos
               ? uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&addr))
               : uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&addr));
  if (rc == 0) rc = uv_tcp_bind(&listener_, reinterpret_cast<const sockaddr*>(&addr), 0);
  if (rc == 0) {
    rc = uv_listen(stream(&listener_), 16, [](uv_stream_t* server, int status) {
      if (status == 0) static_cast<MetricsHttpServer*>(server->data)->accept();
    });
  }
  if (rc != 0) {
    uv_close(handle(&listener_), nullptr);
    return Status::Unavailable(std::string(uv_strerror(rc)));
  }
  // The port actually bound: the configured one, or the one chosen for port 0.
  sockaddr_storage bound{};
  int len = sizeof(bound);
  uv_tcp_getsockname(&listener_, reinterpret_cast<sockaddr*>(&bound), &len);
  port_ = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  uv_timer_init(loop_, &sweep_);
  sweep_.data = this;
  // A sweep every second closes connections within a second past their deadline.
  uv_timer_start(
      &sweep_, [](uv_timer_t* t) { static_cast<MetricsHttpServer*>(t->data)->close_expired(); }, 1000, 1000);
  uv_unref(reinterpret_cast<uv_handle_t*>(&sweep_));  // the loop's life is the listener's, not the sweep's
  listening_ = true;
  return Status::OK();
}

void MetricsHttpServer::close() {
  if (!listening_) return;
  listening_ = false;
  uv_close(handle(&listener_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&sweep_), nullptr);
  while (!open_.empty()) close_connection(open_.front());
}

void MetricsHttpServer::close_connection(Connection* c) {
  if (uv_is_closing(handle(&c->tcp))) return;  // a write cancelled by the close calls back here
  open_.erase(c->position);
  uv_close(handle(&c->tcp), [](uv_handle_t* h) { delete static_cast<Connection*>(h->data); });
}

void MetricsHttpServer::close_expired() {
  const uint64_t now = uv_now(loop_);
  while (!open_.empty() && now - open_.front()->accepted_ms >= kDeadlineMs) close_connection(open_.front());
}

// The oldest connection still sending its request (an idle one, or a slow or stuck client);
// only when every one is being answered, the oldest answer. A scraper reading a large answer
// slowly keeps it through a burst of new connections.
MetricsHttpServer::Connection* MetricsHttpServer::eviction_candidate() const {
  assert(!open_.empty());
  const auto reading = std::find_if(open_.begin(), open_.end(), [](const Connection* c) { return !c->answering(); });
  return reading != open_.end() ? *reading : open_.front();
}

void MetricsHttpServer::accept() {
  auto owned = std::make_unique<Connection>();
  Connection* c = owned.get();
  c->server = this;
  uv_tcp_init(loop_, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(stream(&listener_), stream(&c->tcp)) != 0) {
    uv_close(handle(&c->tcp), [](uv_handle_t* h) { delete static_cast<Connection*>(h->data); });
    owned.release();
    return;
  }
  if (open_.size() >= kMaxConnections) close_connection(eviction_candidate());
  c->accepted_ms = uv_now(loop_);
  c->position = open_.insert(open_.end(), owned.release());
  uv_read_start(
      stream(&c->tcp),
      [](uv_handle_t*, size_t suggested, uv_buf_t* buf) {
        buf->base = new char[suggested];
        buf->len = suggested;
      },
      [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
        auto* c = static_cast<Connection*>(s->data);
        if (n > 0) c->request.append(buf->base, static_cast<size_t>(n));
        delete[] buf->base;
        if (n < 0) return c->server->close_connection(c);
        // The head ends at an empty line; a bare LF ends lines too (RFC 9112 allows it: a request
        // typed by hand, printf | nc).
        // Where it ends, not how much has arrived, decides whether it is too long: the same
        // request must get the same answer however TCP splits it.
        const size_t crlf = c->request.find("\r\n\r\n"), lf = c->request.find("\n\n");
        const size_t head_end = std::min(crlf == std::string::npos ? crlf : crlf + 4, lf == std::string::npos ? lf : lf + 2);
        const bool complete = head_end != std::string::npos && head_end <= kMaxRequestHead;
        if (head_end == std::string::npos && c->request.size() < kMaxRequestHead) return;
        uv_read_stop(s);
        if (!complete)
          c->response = http_response(431, "Request Header Fields Too Large", "text/plain", "request head too large\n");
        else
          c->response = metrics_http_answer(c->request, c->server->render_);
        uv_buf_t out = uv_buf_init(c->response.data(), static_cast<unsigned>(c->response.size()));
        c->write.data = c;
        if (uv_write(&c->write, s, &out, 1, [](uv_write_t* w, int) {
              auto* c = static_cast<Connection*>(w->data);
              c->server->close_connection(c);
            }) != 0)
          c->server->close_connection(c);
      });
}

}  // namespace tutel::daemon
