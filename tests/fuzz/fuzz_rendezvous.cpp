// libFuzzer target: the rendezvous service (comm/src/rendezvous.cpp) that node 0's daemon runs
// for its whole life, open to every host that can reach its port.
//
// One service runs on 127.0.0.1 (an ephemeral port) for the whole fuzzing session; each input
// is a script of operations on up to four TCP connections to it:
//   ctl & 3           the connection
//   (ctl >> 2) & 3    0: send raw bytes (next byte: length), 1: send a well-formed join built
//                     from the next bytes (group, rank, size, local_size, timeout, payload
//                     length; one of four group keys unique to this input), 2: close it,
//                     3: wait up to 2 ms for its answer and read it
// Every connection still open is closed at the end. The service keeps state across inputs
// (groups waiting for their deadline), as in production; its crashes are reported from its
// own thread.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "../../comm/src/bootstrap_wire.hpp"
#include "tutel/comm/rendezvous.hpp"
#include "tutel/core/logging.hpp"

using namespace tutel;
using namespace tutel::comm;

namespace {

std::unique_ptr<RendezvousService> g_service;
uint64_t g_iteration = 0;

struct Reader {
  const uint8_t* p;
  size_t n;
  size_t pos = 0;
  uint8_t byte() { return pos < n ? p[pos++] : 0; }
  size_t left() const { return n - pos; }
};

int connect_service() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(g_service->port());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void send_bytes(int fd, const void* data, size_t n) {
  (void)!::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_log_level(LogLevel::kError);
  RendezvousOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.join_timeout = std::chrono::milliseconds(2000);
  auto s = RendezvousService::start(o);
  if (!s.ok()) {
    std::fprintf(stderr, "cannot start the rendezvous service: %s\n", std::string(s.status().message()).c_str());
    std::abort();
  }
  g_service = std::move(*s);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ++g_iteration;
  int conns[4] = {-1, -1, -1, -1};
  Reader in{data, size};
  int ops = 0;
  while (in.left() > 0 && ops++ < 64) {
    const uint8_t ctl = in.byte();
    int& fd = conns[ctl & 3];
    const int kind = (ctl >> 2) & 3;
    if (kind == 2) {
      if (fd >= 0) ::close(fd);
      fd = -1;
      continue;
    }
    if (fd < 0) fd = connect_service();
    if (fd < 0) continue;
    if (kind == 0) {
      const size_t n = std::min<size_t>(in.byte(), in.left());
      send_bytes(fd, in.p + in.pos, n);
      in.pos += n;
    } else if (kind == 1) {
      wire::Header h;
      h.kind = wire::kJoin;
      const uint8_t group = in.byte();
      h.rank = in.byte() % 9;
      h.size = in.byte() % 9;
      h.local_size = in.byte() % 9;
      h.pid = 1000 + (ctl & 3);
      const uint32_t timeout_ms = (in.byte() % 30 + 1) * 50u;
      const size_t payload = std::min<size_t>(in.byte(), in.left());
      std::string body;
      wire::put_u32(body, timeout_ms);
      body.append(reinterpret_cast<const char*>(in.p + in.pos), payload);
      in.pos += payload;
      const std::string key = "r" + std::to_string(group >> 2) + "@g" + std::to_string(group & 3) + "-" +
                              std::to_string(g_iteration);
      const std::string msg = wire::encode(h, key, body);
      send_bytes(fd, msg.data(), msg.size());
    } else {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 2) > 0) {
        char buf[4096];
        (void)!::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      }
    }
  }
  for (int& fd : conns)
    if (fd >= 0) ::close(fd);
  return 0;
}
