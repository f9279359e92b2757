// The metrics endpoint keeps at most kMaxConnections open: which one a new connection closes.
// The server runs on a libuv loop of its own thread, as on the daemon's; the clients are raw
// loopback sockets.
#include "metrics_http.hpp"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <future>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace tutel::daemon {
namespace {

// A MetricsHttpServer on 127.0.0.1 (any port) whose every answer is `body`.
class ServerThread {
 public:
  explicit ServerThread(std::string body) : body_(std::move(body)) {
    std::promise<int> port;
    auto bound = port.get_future();
    thread_ = std::thread([this, &port] {
      uv_loop_init(&loop_);
      MetricsHttpServer server(&loop_, [this] { return body_; });
      // Before the port is known: the destructor may send it as soon as the constructor returns.
      uv_async_init(&loop_, &stop_, [](uv_async_t* a) {
        static_cast<MetricsHttpServer*>(a->data)->close();
        uv_close(reinterpret_cast<uv_handle_t*>(a), nullptr);
      });
      stop_.data = &server;
      const Status listening = server.listen("127.0.0.1", 0);
      if (!listening.ok()) uv_close(reinterpret_cast<uv_handle_t*>(&stop_), nullptr);
      port.set_value(listening.ok() ? server.port() : -1);
      uv_run(&loop_, UV_RUN_DEFAULT);
      uv_loop_close(&loop_);
    });
    port_ = bound.get();
  }
  ~ServerThread() {
    if (port_ > 0) uv_async_send(&stop_);
    thread_.join();
  }
  int port() const { return port_; }

 private:
  std::string body_;
  uv_loop_t loop_{};
  uv_async_t stop_{};
  std::thread thread_;
  int port_ = -1;
};

// A connected loopback socket; `receive_buffer` > 0 shrinks its receive buffer first, so that an
// answer it does not read stays in the server's hands.
int connect_to(int port, int receive_buffer = 0) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (receive_buffer > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{10, 0};  // a read that hangs fails the test instead
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

// Reads until the server closes; false on a timeout or error.
bool read_all(int fd, std::string* out) {
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) return true;
    if (n < 0) return errno == ECONNRESET;
    out->append(buf, static_cast<size_t>(n));
  }
}

// A scraper reading a large answer slowly keeps it while new connections come and go: each new
// connection past the limit closes the oldest connection that has not sent its request.
TEST(MetricsHttp, ANewConnectionClosesTheOldestIdleOneNotAnAnswerInProgress) {
  const std::string body(8 << 20, 'm');  // far more than the sockets buffer: the answer stays pending
  ServerThread server(body);
  ASSERT_GT(server.port(), 0);
  const int scraper = connect_to(server.port(), 4096);
  ASSERT_GE(scraper, 0);
  const std::string request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  ASSERT_EQ(::write(scraper, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  char first[15];
  ASSERT_EQ(::read(scraper, first, sizeof first), static_cast<ssize_t>(sizeof first));  // being answered
  ASSERT_EQ(std::string(first, sizeof first), "HTTP/1.1 200 OK");

  std::vector<int> idle;
  const size_t fill = MetricsHttpServer::kMaxConnections - 1;  // with the scraper: the limit
  for (size_t i = 0; i < fill + 3; ++i) {  // the last three each close one
    idle.push_back(connect_to(server.port()));
    ASSERT_GE(idle.back(), 0);
  }
  // The three oldest idle connections were closed, without a byte.
  for (size_t i = 0; i < 3; ++i) {
    std::string got;
    EXPECT_TRUE(read_all(idle[i], &got)) << "idle connection " << i << " should have been closed";
    EXPECT_EQ(got, "");
  }
  // The scraper gets its whole answer.
  std::string answer(first, sizeof first);
  EXPECT_TRUE(read_all(scraper, &answer));
  const size_t head_end = answer.find("\r\n\r\n");
  ASSERT_NE(head_end, std::string::npos);
  EXPECT_NE(answer.find("Content-Length: " + std::to_string(body.size())), std::string::npos);
  EXPECT_EQ(answer.size() - head_end - 4, body.size()) << "the answer in progress was cut";
  // The newer idle connections are still open: no data, no close yet (their deadline is seconds).
  const int newest = idle.back();
  timeval tv{0, 200000};
  ::setsockopt(newest, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char byte;
  EXPECT_EQ(::read(newest, &byte, 1), -1);
  EXPECT_TRUE(errno == EAGAIN || errno == EWOULDBLOCK) << errno;
  ::close(scraper);
  for (int fd : idle) ::close(fd);
}

// What each request gets: the text for GET /metrics (with or without a query string, a CRLF or
// a bare LF ending the line), the same headers without the body for HEAD, 405 naming the
// allowed methods for another method, 404 for another path, 400 for a malformed request line;
// the metrics are rendered only for a 200.
TEST(MetricsHttp, EachRequestGetsItsAnswer) {
  int renders = 0;
  auto render = [&] {
    ++renders;
    return std::string("tuteld_up 1\n");
  };
  auto answer = [&](std::string_view head) { return metrics_http_answer(head, render); };
  const std::string get = answer("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(get,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 12\r\n"
            "Connection: close\r\n\r\ntuteld_up 1\n");
  EXPECT_EQ(answer("GET /metrics?name[]=x HTTP/1.0\n\n"), get);
  EXPECT_EQ(answer("GET http://127.0.0.1:9464/metrics HTTP/1.1\r\n\r\n"), get);  // the absolute form
  EXPECT_EQ(answer("\r\nGET /metrics HTTP/1.1\r\n\r\n"), get);  // one empty line first
  EXPECT_EQ(answer("HEAD /metrics HTTP/1.1\r\n\r\n"), get.substr(0, get.size() - 12));
  EXPECT_EQ(renders, 5);
  for (const char* other : {"POST /metrics HTTP/1.1\r\n\r\n", "DELETE /metrics?x HTTP/1.1\n\n",
                            "get /metrics HTTP/1.1\r\n\r\n"}) {
    const std::string a = answer(other);
    EXPECT_EQ(a.rfind("HTTP/1.1 405 Method Not Allowed\r\n", 0), 0u) << other << a;
    EXPECT_NE(a.find("\r\nAllow: GET, HEAD\r\n"), std::string::npos) << a;
  }
  for (const char* other : {"GET / HTTP/1.1\r\n\r\n", "GET /metricsx HTTP/1.1\r\n\r\n",
                            "HEAD /metrics/ HTTP/1.1\r\n\r\n", "GET http://127.0.0.1/ HTTP/1.1\r\n\r\n",
                            "GET http://127.0.0.1 HTTP/1.1\r\n\r\n", "GET http://127.0.0.1/x/metrics HTTP/1.1\r\n\r\n"})
    EXPECT_EQ(answer(other).rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u) << other;
  for (const char* malformed : {"\r\n\r\n", "GET\r\n\r\n", "GET /metrics\r\n\r\n", "GET  /metrics HTTP/1.1\r\n\r\n",
                                "GET /metrics FTP/1\r\n\r\n", "GET /metrics HTTP/1.1 extra\r\n\r\n"})
    EXPECT_EQ(answer(malformed).rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u) << malformed;
  EXPECT_EQ(renders, 5) << "only a 200 renders the metrics";
}

}  // namespace
}  // namespace tutel::daemon
