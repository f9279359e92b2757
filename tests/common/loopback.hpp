// Loopback helpers shared by the multi-process and multi-daemon tests.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>

namespace tutel::testing {

// A loopback TCP port for a coordinator or a listener a test starts later: free a moment ago,
// and *below the kernel's ephemeral range*. Ports from bind(0) come from that range, which is
// also where every outgoing connection (UCX's among them, in tests running beside this one) takes
// its local port, so such a port can be taken between this call and the listener's bind, and
// stay taken for the connection's life. Below the range only another test's listener can collide,
// and the port is checked free and drawn at random.
inline uint16_t free_port() {
  int lo = 32768;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    int a = 0, b = 0;
    if (std::fscanf(f, "%d %d", &a, &b) == 2 && a > 2048) lo = a;
    std::fclose(f);
  }
  const int first = lo > 12000 ? 10000 : 1025;  // leave the well-known and registered low ports alone
  std::mt19937 rng(static_cast<uint32_t>(::getpid()) ^
                   static_cast<uint32_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  std::uniform_int_distribution<int> pick(first, lo - 1);
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const uint16_t port = static_cast<uint16_t>(pick(rng));
    addr.sin_port = htons(port);
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (free) return port;
  }
  return 0;
}

}  // namespace tutel::testing
