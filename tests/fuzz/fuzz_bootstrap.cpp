// libFuzzer target: the bootstrap wire format between daemons and ranks (comm/src/bootstrap.cpp,
// comm/src/bootstrap_wire.hpp): what a coordinator reads from ranks, and what a rank reads back
// from a coordinator or a rendezvous service. All of it arrives over TCP from other hosts.
//
// bootstrap.cpp is compiled into this file so that its internal decoders (decode_table, the
// coordinator's read_hello) can be called directly.
// Mode (first byte % 3):
//   0  decode_table(body, size) on the rest, size = second byte + 1.
//   1  Coordinator::read_hello: the rest is what up to three connecting peers send to rank 0's
//      coordinator of a group of `size` (a socketpair per peer, fed in chunks).
//   2  A rank's whole client side (coordinator_exchange with rank 1, or with a rendezvous group)
//      against a fake coordinator on 127.0.0.1 that answers the hello with the rest of the input.
//      Group size is taken from the input (up to 2^20, validate()'s limit): the answer's body
//      length is trusted up to (1 MiB + 4 KiB) * size before any byte of it arrives
//      (FUZZ_MAX_GROUP=<n> in the environment caps the size).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "socket_util.hpp"
#include "fuzz_check.hpp"
#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/core/status.hpp"
#include "bootstrap_wire.hpp"

#define private public
#include "bootstrap.cpp"  // NOLINT(bugprone-suspicious-include)
#undef private

using namespace tutel;
using namespace tutel::comm;

namespace {

void run_decode_table(const uint8_t* data, size_t size) {
  if (size < 1) return;
  const int ranks = data[0] + 1;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  Result<BootstrapTable> t = decode_table(body, ranks);
  if (!t.ok()) return;
  FUZZ_CHECK(t->payloads.size() == static_cast<size_t>(ranks));
  FUZZ_CHECK(t->addresses.size() == static_cast<size_t>(ranks));
  size_t total = 0;
  for (int r = 0; r < ranks; ++r) total += 8 + t->payloads[r].size() + t->addresses[r].size();
  FUZZ_CHECK(total <= body.size());
}

void run_read_hello(const uint8_t* data, size_t size) {
  if (size < 1) return;
  BootstrapOptions o;
  o.size = data[0] % 7 + 2;
  o.local_size = 1;
  o.coordinator_port = 1;
  Coordinator coord(o, "ucx", tutel::comm::detail::Clock::now() + std::chrono::seconds(1));
  const size_t n = static_cast<size_t>(o.size);
  coord.table_.payloads.assign(n, {});
  coord.table_.addresses.assign(n, {});
  coord.arrived_.assign(n, false);
  coord.arrived_[0] = true;
  int count = 1;
  size_t pos = 1;
  for (int peer = 0; peer < 3 && pos < size; ++peer) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) return;
    tutel::comm::detail::Fd other(sv[1]);
    coord.conns_.push_back(Conn{tutel::comm::detail::Fd(sv[0]), {}, -1, false});
    const size_t index = coord.conns_.size() - 1;
    while (pos < size) {
      const uint8_t ctl = data[pos++];
      if (ctl == 0xff) break;  // next peer
      const size_t chunk = std::min<size_t>(size - pos, (ctl & 0x7f) * ((ctl & 0x80) ? 37 : 1) + 1);
      (void)!::send(other.get(), data + pos, chunk, MSG_NOSIGNAL | MSG_DONTWAIT);
      pos += chunk;
      Conn& c = coord.conns_[index];
      if (c.dead || c.rank >= 0) break;
      const Status st = coord.read_hello(c, &count);
      if (!st.ok()) {
        FUZZ_CHECK(c.rank == 0);  // a fatal mistake answers this connection too
        return;
      }
      FUZZ_CHECK(count >= 1 && count <= o.size);
      if (c.dead || c.rank >= 0) break;
    }
    if (count == o.size) return;
  }
}

// ---- mode 2: a fake coordinator -----------------------------------------------------------

struct FakeCoordinator {
  int listener = -1;
  uint16_t port = 0;
  std::mutex mu;
  std::string reply;
  std::thread thread;

  FakeCoordinator() {
    listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listener, 64) != 0)
      std::abort();
    socklen_t len = sizeof addr;
    ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    thread = std::thread([this] { serve(); });
    thread.detach();
  }

  void serve() {
    for (;;) {
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      timeval tv{2, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      // Read the whole hello first, so closing never resets the connection.
      char head[wire::kHeaderBytes];
      size_t got = 0;
      while (got < sizeof head) {
        const ssize_t r = ::recv(fd, head + got, sizeof head - got, 0);
        if (r <= 0) break;
        got += static_cast<size_t>(r);
      }
      if (got == sizeof head) {
        const wire::Header h = wire::decode_header(head);
        size_t rest = size_t{h.round_len} + h.body_len;
        char sink[4096];
        while (rest > 0) {
          const ssize_t r = ::recv(fd, sink, std::min(rest, sizeof sink), 0);
          if (r <= 0) break;
          rest -= static_cast<size_t>(r);
        }
      }
      std::string out;
      {
        std::lock_guard lock(mu);
        out = reply;
      }
      size_t sent = 0;
      while (sent < out.size()) {
        const ssize_t w = ::send(fd, out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
        if (w <= 0) break;
        sent += static_cast<size_t>(w);
      }
      ::shutdown(fd, SHUT_WR);
      char sink[4096];
      while (::recv(fd, sink, sizeof sink, 0) > 0) {
      }
      ::close(fd);
    }
  }
};

void run_client(const uint8_t* data, size_t size) {
  if (size < 6) return;
  static FakeCoordinator* server = new FakeCoordinator();
  uint32_t group_size = 0;
  std::memcpy(&group_size, data, 4);
  const bool join = data[4] & 1;
  const std::string reply(reinterpret_cast<const char*>(data) + 5, size - 5);
  {
    std::lock_guard lock(server->mu);
    server->reply = reply;
  }
  BootstrapOptions o;
  o.coordinator_port = server->port;
  // FUZZ_MAX_GROUP caps the group size, to look past the large-allocation finding.
  static const uint32_t max_group = [] {
    const char* env = std::getenv("FUZZ_MAX_GROUP");
    return env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : (1u << 20);
  }();
  o.size = static_cast<int>(group_size % std::max(max_group, 2u)) + 1;
  if (o.size < 2) o.size = 2;
  o.rank = 1;
  o.local_size = 1;
  o.timeout = std::chrono::milliseconds(3000);
  if (join) o.rendezvous_group = "fuzz/group";
  Result<BootstrapTable> t = coordinator_exchange(o, "ucx", "payload");
  if (t.ok()) {
    FUZZ_CHECK(t->payloads.size() == static_cast<size_t>(o.size));
    FUZZ_CHECK(t->addresses.size() == static_cast<size_t>(o.size));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tutel::set_log_level(tutel::LogLevel::kError);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  switch (data[0] % 3) {
    case 0: run_decode_table(data + 1, size - 1); break;
    case 1: run_read_hello(data + 1, size - 1); break;
    case 2: run_client(data + 1, size - 1); break;
  }
  return 0;
}
