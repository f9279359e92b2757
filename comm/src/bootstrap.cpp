// The TCP coordinator behind every bootstrap (see bootstrap.hpp).
//
// Wire format (little-endian): a 32-byte header {magic, kind, rank, size, local_size, pid,
// round_len, body_len}, then `round` and the body. A hello's body is the rank's payload; a
// table's body is, per rank, {u32 len, payload, u32 len, address}; an error's body is the
// message and its `rank` field carries the StatusCode.
#include "tutel/comm/bootstrap.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "socket_util.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::comm {
namespace {

using detail::Clock;
using detail::Fd;

constexpr uint32_t kMagic = 0x31424354;  // "TCB1"
constexpr uint32_t kHello = 1, kTable = 2, kError = 3;
constexpr size_t kHeaderBytes = 32;
constexpr size_t kMaxPayload = size_t{1} << 20;
constexpr size_t kMaxRound = 64;
// After its hello is sent, a rank waits this much past its own deadline for the coordinator's
// verdict, so it hears which ranks are missing rather than a bare timeout of its own.
constexpr auto kVerdictGrace = std::chrono::milliseconds(2000);

struct Header {
  uint32_t magic = kMagic, kind = 0, rank = 0, size = 0, local_size = 0, pid = 0, round_len = 0,
           body_len = 0;
};

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}

std::string encode(const Header& h, std::string_view round, std::string_view body) {
  std::string out;
  out.reserve(kHeaderBytes + round.size() + body.size());
  for (uint32_t v : {h.magic, h.kind, h.rank, h.size, h.local_size, h.pid,
                     static_cast<uint32_t>(round.size()), static_cast<uint32_t>(body.size())})
    put_u32(out, v);
  out.append(round);
  out.append(body);
  return out;
}

Header decode_header(const char* p) {
  Header h;
  h.magic = get_u32(p);
  h.kind = get_u32(p + 4);
  h.rank = get_u32(p + 8);
  h.size = get_u32(p + 12);
  h.local_size = get_u32(p + 16);
  h.pid = get_u32(p + 20);
  h.round_len = get_u32(p + 24);
  h.body_len = get_u32(p + 28);
  return h;
}

std::string endpoint_name(const BootstrapOptions& o) {
  return o.coordinator_host + ":" + std::to_string(o.coordinator_port);
}

std::string address_of(const std::string& ip, uint32_t pid) {
  return ip + ", pid " + std::to_string(pid);
}

Result<sockaddr_in> coordinator_sockaddr(const BootstrapOptions& o) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(o.coordinator_port);
  if (::inet_pton(AF_INET, o.coordinator_host.c_str(), &addr.sin_addr) != 1)
    return Status::InvalidArgument("coordinator host '" + o.coordinator_host +
                                   "' is not a numeric IPv4 address");
  return addr;
}

std::string encode_table(const BootstrapTable& t) {
  std::string body;
  for (size_t r = 0; r < t.payloads.size(); ++r) {
    put_u32(body, static_cast<uint32_t>(t.payloads[r].size()));
    body.append(t.payloads[r]);
    put_u32(body, static_cast<uint32_t>(t.addresses[r].size()));
    body.append(t.addresses[r]);
  }
  return body;
}

Result<BootstrapTable> decode_table(std::string_view body, int size) {
  BootstrapTable t;
  size_t pos = 0;
  auto take = [&](std::string& out) {
    if (body.size() - pos < 4) return false;
    const uint32_t n = get_u32(body.data() + pos);
    pos += 4;
    if (body.size() - pos < n) return false;
    out.assign(body.substr(pos, n));
    pos += n;
    return true;
  };
  t.payloads.resize(static_cast<size_t>(size));
  t.addresses.resize(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) {
    if (!take(t.payloads[r]) || !take(t.addresses[r]))
      return Status::Corruption("bootstrap: malformed table from the coordinator");
  }
  return t;
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i == 16) return s + ", ... (" + std::to_string(ranks.size()) + " in all)";
    if (i > 0) s += ", ";
    s += std::to_string(ranks[i]);
  }
  return s;
}

// ---- rank 0: the coordinator -------------------------------------------------------------

struct Conn {
  Fd fd;
  std::string in;
  int rank = -1;  // set once its hello is accepted
  bool dead = false;
};

class Coordinator {
 public:
  Coordinator(const BootstrapOptions& o, std::string_view round, Clock::time_point deadline)
      : o_(o), round_(round), deadline_(deadline) {}

  Result<BootstrapTable> run(std::string_view payload) {
    TUTEL_ASSIGN_OR_RETURN(Fd listener, listen());
    const size_t n = static_cast<size_t>(o_.size);
    table_.payloads.assign(n, {});
    table_.addresses.assign(n, {});
    arrived_.assign(n, false);
    table_.payloads[0] = std::string(payload);
    table_.addresses[0] = address_of(o_.coordinator_host, static_cast<uint32_t>(::getpid()));
    arrived_[0] = true;
    int count = 1;

    Status failure;
    while (count < o_.size && failure.ok()) {
      std::vector<pollfd> fds;
      fds.push_back({listener.get(), POLLIN, 0});
      std::vector<size_t> reading;  // indices: accept_all() may grow conns_
      for (size_t i = 0; i < conns_.size(); ++i) {
        if (conns_[i].rank < 0 && !conns_[i].dead) {
          fds.push_back({conns_[i].fd.get(), POLLIN, 0});
          reading.push_back(i);
        }
      }
      const int timeout = detail::poll_timeout_ms(deadline_);
      const int r = timeout == 0 ? 0 : ::poll(fds.data(), fds.size(), timeout);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        failure = Status::IOError("bootstrap coordinator: poll: " + detail::errno_text(errno));
        break;
      }
      if (r == 0) {
        failure = missing_ranks_error(count);
        break;
      }
      if (fds[0].revents & POLLIN) accept_all(listener.get());
      for (size_t i = 1; i < fds.size() && failure.ok(); ++i) {
        if (fds[i].revents == 0) continue;
        failure = read_hello(conns_[reading[i - 1]], &count);
      }
    }
    listener.reset();
    if (!failure.ok()) {
      reply_all(kError, failure);
      return failure;
    }
    reply_all(kTable, Status::OK());
    return std::move(table_);
  }

 private:
  Result<Fd> listen() {
    TUTEL_ASSIGN_OR_RETURN(sockaddr_in addr, coordinator_sockaddr(o_));
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return Status::IOError("bootstrap: socket: " + detail::errno_text(errno));
    const int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // Another rank-0 may hold the port for a moment (a previous round closing); retry briefly.
    for (;;) {
      if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
      const int err = errno;
      if (err != EADDRINUSE || Clock::now() >= deadline_)
        return Status::Unavailable("bootstrap: " + o_.member + " 0 cannot listen on " + endpoint_name(o_) +
                                   ": " + detail::errno_text(err) +
                                   " (is another coordinator using this port?)");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (::listen(fd.get(), std::max(16, o_.size)) != 0)
      return Status::IOError("bootstrap: listen on " + endpoint_name(o_) + ": " +
                             detail::errno_text(errno));
    return fd;
  }

  void accept_all(int listener) {
    for (;;) {
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      conns_.push_back(Conn{Fd(fd), {}, -1, false});
    }
  }

  // Reads what is available; returns an error only for a mistake that dooms the whole group.
  Status read_hello(Conn& c, int* count) {
    char buf[65536];
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      c.dead = true;  // a rank that gave up and will retry, or a stray connection
      return Status::OK();
    }
    if (n < 0) return Status::OK();
    c.in.append(buf, static_cast<size_t>(n));
    if (c.in.size() < kHeaderBytes) return Status::OK();
    const Header h = decode_header(c.in.data());
    if (h.magic != kMagic || h.kind != kHello || h.round_len > kMaxRound ||
        h.body_len > kMaxPayload) {
      refuse(c, "not a tuteld bootstrap hello");
      return Status::OK();
    }
    if (c.in.size() < kHeaderBytes + h.round_len + h.body_len) return Status::OK();
    const std::string_view round(c.in.data() + kHeaderBytes, h.round_len);
    if (round != round_) {
      refuse(c, "the coordinator at " + endpoint_name(o_) + " runs round '" + round_ + "', not '" +
                    std::string(round) + "'");
      return Status::OK();
    }
    const std::string address = address_of(detail::peer_ip(c.fd.get()), h.pid);
    const int rank = static_cast<int>(h.rank);
    // A mistake that dooms the group: this connection hears the verdict too.
    auto fatal = [&c](std::string message) {
      c.rank = 0;
      return Status::InvalidArgument(std::move(message));
    };
    if (static_cast<int>(h.size) != o_.size || static_cast<int>(h.local_size) != o_.local_size)
      return fatal("bootstrap: " + o_.member + " " + std::to_string(rank) + " (" + address +
                   ") was started with size " + std::to_string(h.size) + ", local_size " +
                   std::to_string(h.local_size) + " but " + o_.member + " 0 with size " +
                   std::to_string(o_.size) + ", local_size " + std::to_string(o_.local_size) +
                   "; start every " + o_.member + " with the same group shape");
    if (rank <= 0 || rank >= o_.size)
      return fatal("bootstrap: a process (" + address + ") claims " + o_.member + " " + std::to_string(rank) +
                   ", outside [1, " + std::to_string(o_.size) + ")");
    if (arrived_[rank])
      return fatal("bootstrap: " + o_.member + " " + std::to_string(rank) + " arrived twice (" +
                   table_.addresses[rank] + " and " + address +
                   "); give every process its own " + o_.member);
    c.rank = rank;
    arrived_[rank] = true;
    table_.payloads[rank] = c.in.substr(kHeaderBytes + h.round_len, h.body_len);
    table_.addresses[rank] = address;
    c.in.clear();
    ++*count;
    return Status::OK();
  }

  void refuse(Conn& c, const std::string& why) {
    Header h;
    h.kind = kError;
    h.rank = static_cast<uint32_t>(StatusCode::kInvalidArgument);
    const std::string msg = encode(h, {}, why);
    (void)detail::send_all(c.fd.get(), msg.data(), msg.size(),
                           Clock::now() + std::chrono::milliseconds(200));
    c.dead = true;
    c.fd.reset();
  }

  Status missing_ranks_error(int count) const {
    std::vector<int> missing;
    for (int r = 0; r < o_.size; ++r)
      if (!arrived_[r]) missing.push_back(r);
    return Status::Timeout("bootstrap timed out after " + std::to_string(o_.timeout.count()) +
                           " ms: " + o_.member + (missing.size() > 1 ? "s " : " ") + rank_list(missing) +
                           " never reached the coordinator at " + endpoint_name(o_) + " (" +
                           std::to_string(count) + " of " + std::to_string(o_.size) +
                           " " + o_.member + "s arrived); start them or check their coordinator address");
  }

  void reply_all(uint32_t kind, const Status& failure) {
    Header h;
    h.kind = kind;
    h.size = static_cast<uint32_t>(o_.size);
    std::string msg;
    if (kind == kError) {
      h.rank = static_cast<uint32_t>(failure.code());
      msg = encode(h, {}, failure.message());
    } else {
      msg = encode(h, {}, encode_table(table_));
    }
    const auto send_deadline = Clock::now() + std::chrono::seconds(2);
    for (auto& c : conns_) {
      if (c.rank < 0 || c.dead) continue;
      Status s = detail::send_all(c.fd.get(), msg.data(), msg.size(), send_deadline);
      if (!s.ok())
        TUTEL_LOG(WARN) << "bootstrap: cannot answer rank " << c.rank << ": " << s.message();
    }
    conns_.clear();
  }

  const BootstrapOptions& o_;
  std::string round_;
  Clock::time_point deadline_;
  std::vector<Conn> conns_;
  BootstrapTable table_;
  std::vector<bool> arrived_;
};

// ---- ranks 1..size-1 ---------------------------------------------------------------------

Result<Fd> connect_once(const sockaddr_in& addr, Clock::time_point deadline) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Status::IOError("socket: " + detail::errno_text(errno));
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (errno != EINPROGRESS) return Status::Unavailable(detail::errno_text(errno));
  pollfd p{fd.get(), POLLOUT, 0};
  const int r = ::poll(&p, 1, detail::poll_timeout_ms(deadline));
  if (r <= 0) return Status::Unavailable("connect timed out");
  int err = 0;
  socklen_t len = sizeof err;
  ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) return Status::Unavailable(detail::errno_text(err));
  return fd;
}

Result<BootstrapTable> run_client(const BootstrapOptions& o, std::string_view round,
                                  std::string_view payload, Clock::time_point deadline) {
  TUTEL_ASSIGN_OR_RETURN(const sockaddr_in addr, coordinator_sockaddr(o));
  Header h;
  h.kind = kHello;
  h.rank = static_cast<uint32_t>(o.rank);
  h.size = static_cast<uint32_t>(o.size);
  h.local_size = static_cast<uint32_t>(o.local_size);
  h.pid = static_cast<uint32_t>(::getpid());
  const std::string hello = encode(h, round, payload);
  const std::string who = "bootstrap (" + o.member + " " + std::to_string(o.rank) + ")";
  const auto verdict_deadline = deadline + std::min<Clock::duration>(kVerdictGrace, o.timeout);

  std::string last_error = "nothing listens there";
  while (Clock::now() < deadline) {
    auto fd = connect_once(addr, std::min(deadline, Clock::now() + std::chrono::seconds(1)));
    if (!fd.ok()) {
      last_error = std::string(fd.status().message());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    Status s = detail::send_all(fd->get(), hello.data(), hello.size(), deadline);
    if (!s.ok()) {
      last_error = std::string(s.message());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    char head[kHeaderBytes];
    bool closed_early = false;
    s = detail::recv_exact(fd->get(), head, sizeof head, verdict_deadline, &closed_early);
    if (closed_early) {
      // A listener of an earlier round that closed before serving us: try again.
      last_error = "the coordinator closed the connection";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    if (!s.ok())
      return Status(
          s.code() == StatusCode::kTimeout ? StatusCode::kTimeout : StatusCode::kUnavailable,
          who + ": no answer from the coordinator at " + endpoint_name(o) + ": " +
              std::string(s.message()));
    const Header reply = decode_header(head);
    if (reply.magic != kMagic || reply.body_len > (kMaxPayload + 4096) * size_t(o.size) + 64)
      return Status::Corruption(who + ": malformed answer from " + endpoint_name(o));
    std::string body(reply.body_len, '\0');
    TUTEL_RETURN_IF_ERROR(detail::recv_exact(fd->get(), body.data(), body.size(), verdict_deadline)
                              .with_context(who + ": reading the coordinator's answer"));
    if (reply.kind == kError) {
      const auto code = static_cast<StatusCode>(reply.rank);
      return Status(code == StatusCode::kOk ? StatusCode::kInternal : code,
                    who + ": the coordinator at " + endpoint_name(o) + " says: " + body);
    }
    if (reply.kind != kTable || static_cast<int>(reply.size) != o.size)
      return Status::Corruption(who + ": unexpected answer from " + endpoint_name(o));
    return decode_table(body, o.size);
  }
  return Status::Timeout(who + ": could not reach the coordinator at " + endpoint_name(o) +
                         " within " + std::to_string(o.timeout.count()) + " ms (" + last_error +
                         "); is " + o.member + " 0 running with this address?");
}

}  // namespace

Status validate(const BootstrapOptions& o) {
  if (o.size < 1 || o.size > (1 << 20))
    return Status::InvalidArgument("group size " + std::to_string(o.size) +
                                   " is outside [1, 1048576]");
  if (o.rank < 0 || o.rank >= o.size)
    return Status::InvalidArgument("rank " + std::to_string(o.rank) + " is outside [0, " +
                                   std::to_string(o.size) + ")");
  if (o.local_size < 1 || o.local_size > o.size)
    return Status::InvalidArgument("local_size " + std::to_string(o.local_size) +
                                   " is outside [1, size=" + std::to_string(o.size) + "]");
  if (o.size > 1 && o.coordinator_port == 0)
    return Status::InvalidArgument("a coordinator port is required when size > 1");
  if (o.timeout.count() <= 0 || o.collective_timeout.count() <= 0)
    return Status::InvalidArgument("bootstrap and collective timeouts must be positive");
  if (o.spin.count() < 0) return Status::InvalidArgument("spin must not be negative");
  return Status::OK();
}

Result<BootstrapTable> coordinator_exchange(const BootstrapOptions& options, std::string_view round,
                                            std::string_view payload) {
  TUTEL_RETURN_IF_ERROR(validate(options));
  if (payload.size() > kMaxPayload)
    return Status::InvalidArgument("bootstrap payload of " + std::to_string(payload.size()) +
                                   " bytes exceeds 1 MiB");
  if (round.size() > kMaxRound) return Status::InvalidArgument("bootstrap round name too long");
  const auto deadline = Clock::now() + options.timeout;
  if (options.size == 1) {
    BootstrapTable t;
    t.payloads.emplace_back(payload);
    t.addresses.push_back(address_of(options.coordinator_host, static_cast<uint32_t>(::getpid())));
    return t;
  }
  if (options.rank == 0) return Coordinator(options, round, deadline).run(payload);
  return run_client(options, round, payload, deadline);
}

}  // namespace tutel::comm
