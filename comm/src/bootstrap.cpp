// The TCP coordinator behind every bootstrap (see bootstrap.hpp), and the client side of both
// it and the rendezvous service (rendezvous.hpp). The wire format: bootstrap_wire.hpp.
#include "tutel/comm/bootstrap.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bootstrap_wire.hpp"
#include "socket_util.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::comm {
namespace {

using detail::Clock;
using detail::Fd;

using wire::address_of;
using wire::decode_header;
using wire::encode;
using wire::get_u32;
using wire::Header;
using wire::kAuthBytes;
using wire::kAuthenticated;
using wire::kChallenge;
using wire::kError;
using wire::kMacBytes;
using wire::kNonceBytes;
using wire::kHeaderBytes;
using wire::kHello;
using wire::kJoin;
using wire::kMagic;
using wire::kMaxBootstrapTimeout;
using wire::kMaxPayload;
using wire::kMaxRound;
using wire::kTable;
using wire::rank_list;

// After its hello is sent, a rank waits this much past its own deadline for the coordinator's
// verdict, so it hears which ranks are missing rather than a bare timeout of its own.
constexpr auto kVerdictGrace = std::chrono::milliseconds(2000);

// A connection to the coordinator has this long from its accept to its hello (the challenge
// included): a rank sends them as soon as it connects, so only a stalled or hostile client takes
// longer, and it would hold a descriptor and up to a hello's buffer until the deadline.
constexpr auto kHelloTime = std::chrono::seconds(10);
// The table goes to every rank at once; a rank that takes none of it for this long (stopped, or
// not reading) is given up, without holding the others' answers back.
constexpr auto kAnswerStall = std::chrono::seconds(2);
// An error answer's message, at most (the servers' own are a few hundred bytes).
constexpr size_t kMaxErrorBytes = 64 << 10;

std::string endpoint_name(const BootstrapOptions& o) {
  return o.coordinator_host + ":" + std::to_string(o.coordinator_port);
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

// ---- rank 0: the coordinator -------------------------------------------------------------

struct Conn {
  Fd fd;
  std::string in;
  int rank = -1;  // set once its hello is accepted
  bool dead = false;
  // With a peer secret: the rank's nonce (its challenge) and ours (the answer), once exchanged.
  std::string rank_nonce, server_nonce;
  Clock::time_point hello_by;  // its hello is due by then (kHelloTime after its accept)

  // Closed at once (a stream of such connections must not use up the descriptors) and erased
  // with what it had sent at the end of the poll round.
  void drop() {
    dead = true;
    fd.reset();
  }
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
      // Out of descriptors, the listener stays readable with nothing to accept: not polled for a
      // moment then, rather than spun on (the connections read meanwhile free some).
      const bool accepting = Clock::now() >= accept_paused_until_;
      fds.push_back({listener.get(), static_cast<short>(accepting ? POLLIN : 0), 0});
      std::vector<size_t> reading;  // indices: accept_all() may grow conns_
      Clock::time_point next_hello_due = deadline_;
      for (size_t i = 0; i < conns_.size(); ++i) {
        Conn& c = conns_[i];
        if (c.dead) continue;
        if (c.rank < 0 && Clock::now() >= c.hello_by) {
          // Too slow to be a rank: its descriptor and buffer go, and a real rank that stalled
          // will retry with a connection of its own.
          c.drop();
          continue;
        }
        if (c.rank < 0) next_hello_due = std::min(next_hello_due, c.hello_by);
        // An arrived rank sends nothing more: it is polled for its end (it gave up, was cancelled
        // or died), which takes it out of the table again.
        fds.push_back({c.fd.get(), POLLIN, 0});
        reading.push_back(i);
      }
      if (detail::cancelled(o_.cancel.get())) {
        failure = cancelled_error(count);
        break;
      }
      int timeout = detail::poll_timeout_ms(std::min(deadline_, next_hello_due), o_.cancel.get());
      if (!accepting) timeout = std::min(timeout, static_cast<int>(detail::kAcceptPause.count()));
      const int r = timeout == 0 ? 0 : ::poll(fds.data(), fds.size(), timeout);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        failure = Status::IOError("bootstrap coordinator: poll: " + detail::errno_text(errno));
        break;
      }
      if (r == 0 && Clock::now() >= deadline_) {
        failure = missing_ranks_error(count);
        break;
      }
      // Before the new connections: a rank that retries closes its old connection first, and its
      // end is read before its new hello (read_hello also checks, for an end not yet seen).
      for (size_t i = 1; i < fds.size() && failure.ok(); ++i) {
        if (fds[i].revents == 0) continue;
        Conn& c = conns_[reading[i - 1]];
        if (c.dead) continue;  // taken out earlier in this round (a duplicate replaced it)
        if (c.rank > 0)
          watch_arrived(c, &count);
        else
          failure = read_hello(c, &count);
      }
      if (failure.ok() && (fds[0].revents & POLLIN)) accept_all(listener.get());
      // All here: a rank whose end came after the last poll would be answered on a closed
      // connection (a small table fits in the socket's buffer) and counted as answered. Its end
      // is looked for once more, and the loop waits for it to come back.
      if (count == o_.size && failure.ok())
        for (Conn& c : conns_)
          if (c.rank > 0 && !c.dead && closed_by_peer(c)) leave(c, &count);
      // A refused or closed connection goes at once, with what it had sent (up to a whole
      // hello, 1 MiB): anyone who can reach the port may open many.
      std::erase_if(conns_, [](const Conn& c) { return c.dead; });
    }
    listener.reset();
    if (!failure.ok()) {
      (void)reply_all(kError, failure);  // the failure is what this rank says
      return failure;
    }
    TUTEL_RETURN_IF_ERROR(reply_all(kTable, Status::OK()));
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
      if (err != EADDRINUSE || Clock::now() >= deadline_ || detail::cancelled(o_.cancel.get()))
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

  // Connections without a hello yet, at most: the group's ranks twice over, and some more for
  // ranks retrying. Past it the oldest goes (a stalled or hostile client's, most likely: a rank
  // sends its hello at once), so a crowd of idle connections cannot keep the ranks out.
  size_t max_pending() const { return 2 * static_cast<size_t>(o_.size) + 32; }

  void accept_all(int listener) {
    for (;;) {
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (detail::out_of_descriptors(errno)) accept_paused_until_ = Clock::now() + detail::kAcceptPause;
        return;
      }
      size_t pending = 0;
      for (const Conn& c : conns_) pending += c.rank < 0 && !c.dead ? 1 : 0;
      if (pending >= max_pending()) {
        // conns_ is in accept order: the first pending one is the oldest.
        for (Conn& c : conns_)
          if (c.rank < 0 && !c.dead) {
            c.drop();
            ++dropped_pending_;
            break;
          }
      }
      detail::enable_keepalive(fd);  // an arrived rank waits silently for the others
      Conn c;
      c.fd = Fd(fd);
      c.hello_by = std::min(deadline_, Clock::now() + kHelloTime);
      conns_.push_back(std::move(c));
    }
  }

  // An arrived rank's connection became readable: its end (it gave up, was cancelled, or died)
  // takes it out of the table, so that it may arrive again; anything it sends instead breaks the
  // protocol, and it is taken out too.
  void watch_arrived(Conn& c, int* count) {
    char byte;
    const ssize_t n = ::recv(c.fd.get(), &byte, 1, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n > 0) warn_talked(c.rank, table_.addresses[c.rank]);
    leave(c, count);
  }

  void warn_talked(int rank, const std::string& address) const {
    TUTEL_LOG(WARN) << "bootstrap: " << o_.member << " " << rank << " (" << address
                    << ") sent more after its hello; dropping it until it arrives again";
  }

  void leave(Conn& c, int* count) {
    if (c.dead || c.rank <= 0) return;
    arrived_[c.rank] = false;
    left_.push_back(c.rank);
    table_.payloads[c.rank].clear();
    table_.addresses[c.rank].clear();
    --*count;
    c.rank = -1;
    c.drop();
  }

  // Whether the connection's peer has closed it (read without taking anything).
  static bool closed_by_peer(const Conn& c) {
    char byte;
    const ssize_t n = ::recv(c.fd.get(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }

  // Reads what is available; returns an error only for a mistake that dooms the whole group.
  Status read_hello(Conn& c, int* count) {
    char buf[65536];
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      c.drop();  // a rank that gave up and will retry, or a stray connection
      return Status::OK();
    }
    if (n < 0) return Status::OK();
    c.in.append(buf, static_cast<size_t>(n));
    if (c.in.size() < kHeaderBytes) return Status::OK();
    Header h = decode_header(c.in.data());
    const bool authenticated = (h.kind & kAuthenticated) != 0;
    const uint32_t kind = h.kind & ~kAuthenticated;
    if (h.magic == kMagic && kind == kChallenge && authenticated) return answer_challenge(c, h);
    if (h.magic == kMagic && kind == kJoin) {
      refuse(c, endpoint_name(o_) + " is a group's own bootstrap coordinator, not a rendezvous service");
      return Status::OK();
    }
    if (h.magic != kMagic || kind != kHello || h.round_len > wire::kMaxJoinRound ||
        h.body_len > kMaxPayload + (authenticated ? kAuthBytes : 0) ||
        (authenticated && h.body_len < kAuthBytes)) {
      refuse(c, "not a tuteld bootstrap hello");
      return Status::OK();
    }
    // Refused at the header, before a body of up to 1 MiB is read, where the secret rules it out.
    if (!o_.secret.empty() && !authenticated) {
      refuse_for_secret(c, h, "the coordinator at " + endpoint_name(o_) + " requires the peer secret, and this " +
                                  o_.member + "'s daemon has none: give every daemon the same [server] "
                                  "peer_secret_file");
      return Status::OK();
    }
    if (!o_.secret.empty() && c.server_nonce.empty()) {
      refuse_for_secret(c, h, "a hello to the coordinator at " + endpoint_name(o_) +
                                  " came without its challenge first: this " + o_.member +
                                  "'s daemon speaks another version of the bootstrap");
      return Status::OK();
    }
    if (o_.secret.empty() && authenticated) {
      refuse_for_secret(c, h, "the coordinator at " + endpoint_name(o_) + " has no peer secret, and this " +
                                  o_.member + "'s daemon has one: give every daemon the same [server] "
                                  "peer_secret_file (or none)");
      return Status::OK();
    }
    const size_t message_bytes = kHeaderBytes + h.round_len + h.body_len;
    if (c.in.size() < message_bytes) return Status::OK();
    if (authenticated) {
      if (!wire::verify_authenticated(std::string_view(c.in).substr(0, message_bytes), o_.secret, c.rank_nonce,
                                      c.server_nonce)) {
        refuse_for_secret(c, h, "the coordinator at " + endpoint_name(o_) + " refused the hello: this " + o_.member +
                                    "'s peer secret is not the coordinator's; give every daemon the same [server] "
                                    "peer_secret_file");
        return Status::OK();
      }
      h.body_len -= static_cast<uint32_t>(kAuthBytes);
    }
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
    if (c.in.size() > message_bytes) {
      // More after its hello, read with it: dropped as a rank that talks after arriving is
      // (watch_arrived), whether or not the two came in one read.
      warn_talked(rank, address);
      c.drop();
      return Status::OK();
    }
    if (arrived_[rank]) {
      // Its first connection may have ended without the end read yet (a rank that was cancelled
      // and retries): then this is the same rank again.
      for (Conn& other : conns_)
        if (&other != &c && other.rank == rank && !other.dead && closed_by_peer(other)) leave(other, count);
    }
    if (arrived_[rank])
      return fatal("bootstrap: " + o_.member + " " + std::to_string(rank) + " arrived twice (" +
                   table_.addresses[rank] + " and " + address +
                   "), both connected; give every process its own " + o_.member);
    c.rank = rank;
    arrived_[rank] = true;
    std::erase(left_, rank);
    table_.payloads[rank] = c.in.substr(kHeaderBytes + h.round_len, h.body_len);
    table_.addresses[rank] = address;
    c.in.clear();
    ++*count;
    return Status::OK();
  }

  // A rank's challenge (its nonce, before its hello): answered with ours, which its hello's mac
  // must cover. Refused where this coordinator has no secret, or for a second challenge.
  Status answer_challenge(Conn& c, const Header& h) {
    if (o_.secret.empty()) {
      refuse_for_secret(c, h, "the coordinator at " + endpoint_name(o_) + " has no peer secret, and this " +
                                  o_.member + "'s daemon has one: give every daemon the same [server] "
                                  "peer_secret_file (or none)");
      return Status::OK();
    }
    if (h.round_len != 0 || h.body_len != kNonceBytes || !c.server_nonce.empty()) {
      refuse(c, "malformed bootstrap challenge");
      return Status::OK();
    }
    if (c.in.size() < kHeaderBytes + kNonceBytes) return Status::OK();
    Result<std::string> nonce = random_bytes(kNonceBytes);
    if (!nonce.ok()) {
      refuse(c, "the coordinator cannot draw a nonce: " + std::string(nonce.status().message()), StatusCode::kInternal);
      return Status::OK();
    }
    c.rank_nonce = c.in.substr(kHeaderBytes, kNonceBytes);
    c.server_nonce = std::move(nonce).value();
    c.in.erase(0, kHeaderBytes + kNonceBytes);
    const std::string answer = wire::encode_challenge(c.server_nonce);
    if (!detail::send_all(c.fd.get(), answer.data(), answer.size(), Clock::now() + std::chrono::milliseconds(200))
             .ok()) {
      c.drop();
    }
    // The rank sends its hello once it has read this: nothing more can be waiting in c.in.
    return Status::OK();
  }

  // A connection refused for the peer secret (its challenge or its hello): logged and counted
  // here too, since the rank hears why but the group only sees that rank missing.
  void refuse_for_secret(Conn& c, const Header& h, const std::string& why) {
    TUTEL_LOG(WARN) << "bootstrap: refused a connection from " << detail::peer_ip(c.fd.get()) << ", pid " << h.pid
                    << ", claiming " << o_.member << " " << h.rank << ": " << why;
    ++refused_for_secret_;
    refuse(c, why, StatusCode::kPermissionDenied);
  }

  void refuse(Conn& c, const std::string& why, StatusCode code = StatusCode::kInvalidArgument) {
    Header h;
    h.kind = kError;
    h.rank = static_cast<uint32_t>(code);
    const std::string msg = encode(h, {}, why);
    (void)detail::send_all(c.fd.get(), msg.data(), msg.size(),
                           Clock::now() + std::chrono::milliseconds(200));
    c.drop();
  }

  Status missing_ranks_error(int count) const {
    std::vector<int> missing, gone;
    for (int r = 0; r < o_.size; ++r)
      if (!arrived_[r]) (std::find(left_.begin(), left_.end(), r) != left_.end() ? gone : missing).push_back(r);
    auto ranks = [&](const std::vector<int>& v) { return o_.member + (v.size() > 1 ? "s " : " ") + rank_list(v); };
    std::string why;
    if (!missing.empty())
      why = ranks(missing) + " never reached the coordinator at " + endpoint_name(o_) + " (" + std::to_string(count) +
            " of " + std::to_string(o_.size) + " " + o_.member +
            "s arrived); start them or check their coordinator address";
    if (!gone.empty())
      why += (why.empty() ? "" : "; ") + ranks(gone) + " reached " +
             (missing.empty() ? "the coordinator at " + endpoint_name(o_) : std::string("it")) +
             " and then hung up or were cut off; restart them, or check the network between them and " + o_.member +
             " 0";
    return Status::Timeout("bootstrap timed out after " + std::to_string(o_.timeout.count()) + " ms: " + why +
                           (refused_for_secret_ == 0
                                ? std::string()
                                : " (" + std::to_string(refused_for_secret_) +
                                      " connection(s) were refused for the peer secret: give every daemon the same "
                                      "[server] peer_secret_file)") +
                           (dropped_pending_ == 0
                                ? std::string()
                                : " (" + std::to_string(dropped_pending_) +
                                      " connection(s) without a hello were dropped for newer ones: something else "
                                      "connects to this port)"));
  }

  Status cancelled_error(int count) const {
    return Status::Aborted("bootstrap cancelled on " + o_.member + " 0 (the coordinator) with " + std::to_string(count) +
                           " of " + std::to_string(o_.size) + " " + o_.member + "s arrived");
  }

  // Sends the verdict (the table, or the group's failure) to every arrived rank at once: a rank
  // that takes nothing of it for kAnswerStall is given up without holding up the others. The
  // table's answer fails where a rank could not be sent it, so that rank 0 does not go on alone
  // with a group one of whose ranks never heard it.
  Status reply_all(uint32_t kind, const Status& failure) {
    Header h;
    h.kind = kind;
    h.size = static_cast<uint32_t>(o_.size);
    std::string msg;
    const bool authenticated = kind == kTable && !o_.secret.empty();
    Digest digest{};
    if (kind == kError) {
      h.rank = static_cast<uint32_t>(failure.code());
      msg = encode(h, {}, failure.message());
    } else {
      msg = wire::encode_table(table_.payloads, table_.addresses, authenticated);
      if (authenticated) digest = sha256(msg);
    }
    struct Answer {
      Conn* conn;
      std::string mac;  // after msg, with a peer secret
      size_t sent = 0;
      Clock::time_point stall_at;
    };
    std::vector<Answer> answers;
    for (Conn& c : conns_) {
      if (c.rank < 0 || c.dead) continue;
      Answer a{&c, {}, 0, Clock::now() + kAnswerStall};
      if (authenticated) a.mac = wire::table_mac(o_.secret, c.rank_nonce, c.server_nonce, digest);
      answers.push_back(std::move(a));
    }
    std::vector<int> unanswered;
    std::string why;
    auto give_up = [&](Answer& a, const std::string& reason) {
      TUTEL_LOG(WARN) << "bootstrap: cannot answer " << o_.member << " " << a.conn->rank << ": " << reason;
      if (unanswered.empty()) why = reason;
      unanswered.push_back(a.conn->rank);
      a.conn->drop();
    };
    for (;;) {
      std::vector<pollfd> fds;
      std::vector<Answer*> waiting;
      Clock::time_point first_stall = Clock::time_point::max();
      for (Answer& a : answers) {
        if (a.conn->dead || a.sent == msg.size() + a.mac.size()) continue;
        if (Clock::now() >= a.stall_at) {
          give_up(a, "it took none of the answer for " + std::to_string(kAnswerStall.count()) +
                         " s (stopped, or not reading)");
          continue;
        }
        fds.push_back({a.conn->fd.get(), POLLOUT, 0});
        waiting.push_back(&a);
        first_stall = std::min(first_stall, a.stall_at);
      }
      if (fds.empty()) break;
      const int r = ::poll(fds.data(), fds.size(), detail::poll_timeout_ms(first_stall));
      if (r < 0 && errno != EINTR) {
        for (Answer* a : waiting) give_up(*a, "poll: " + detail::errno_text(errno));
        break;
      }
      for (size_t i = 0; r > 0 && i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        Answer& a = *waiting[i];
        // As much as the socket takes: the message, then its mac.
        const size_t before = a.sent;
        const Result<bool> sent = detail::send_some(a.conn->fd.get(), msg, a.mac, &a.sent);
        if (a.sent > before) a.stall_at = Clock::now() + kAnswerStall;
        if (!sent.ok()) give_up(a, std::string(sent.status().message()));
      }
    }
    conns_.clear();
    if (unanswered.empty() || kind == kError) return Status::OK();
    std::sort(unanswered.begin(), unanswered.end());
    return Status::Unavailable("bootstrap: " + o_.member + (unanswered.size() > 1 ? "s " : " ") +
                               rank_list(unanswered) + " could not be sent the group's table (" + why +
                               "); the group cannot start without them: restart it");
  }

  const BootstrapOptions& o_;
  std::string round_;
  Clock::time_point deadline_;
  std::vector<Conn> conns_;
  BootstrapTable table_;
  std::vector<bool> arrived_;
  Clock::time_point accept_paused_until_{};
  int refused_for_secret_ = 0;
  int dropped_pending_ = 0;  // connections dropped for newer ones past max_pending()
  std::vector<int> left_;    // ranks that arrived and hung up, and have not arrived again
};

// ---- ranks 1..size-1 ---------------------------------------------------------------------

// One connection attempt, given until `deadline` (looking at `cancel` meanwhile).
Result<Fd> connect_once(const sockaddr_in& addr, Clock::time_point deadline, const std::atomic<bool>* cancel) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Status::IOError("socket: " + detail::errno_text(errno));
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (errno != EINPROGRESS) return Status::Unavailable(detail::errno_text(errno));
  int r = 0;
  do {
    if (detail::cancelled(cancel)) return Status::Aborted("cancelled while connecting");
    pollfd p{fd.get(), POLLOUT, 0};
    r = ::poll(&p, 1, detail::poll_timeout_ms(deadline, cancel));
  } while ((r == 0 && Clock::now() < deadline) || (r < 0 && errno == EINTR));
  if (r <= 0) return Status::Unavailable("connect timed out");
  int err = 0;
  socklen_t len = sizeof err;
  ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) return Status::Unavailable(detail::errno_text(err));
  return fd;
}

// "the coordinator at 127.0.0.1:7000", or "the rendezvous service at ... (node 0's daemon)".
std::string server_name(const BootstrapOptions& o) {
  if (o.rendezvous_group.empty()) return "the coordinator at " + endpoint_name(o);
  return "the rendezvous service at " + endpoint_name(o) +
         (o.rendezvous_owner.empty() ? "" : " (" + o.rendezvous_owner + ")");
}

// Every rank but a coordinator's rank 0: sends its hello (or its join, to a rendezvous service)
// and waits for the table or the error.
Result<BootstrapTable> run_client(const BootstrapOptions& o, std::string_view round,
                                  std::string_view payload, Clock::time_point deadline) {
  TUTEL_ASSIGN_OR_RETURN(const sockaddr_in addr, coordinator_sockaddr(o));
  const bool join = !o.rendezvous_group.empty();
  Header h;
  h.kind = join ? kJoin : kHello;
  h.rank = static_cast<uint32_t>(o.rank);
  h.size = static_cast<uint32_t>(o.size);
  h.local_size = static_cast<uint32_t>(o.local_size);
  h.pid = static_cast<uint32_t>(::getpid());
  std::string hello_round, hello_body;
  // A join tells the service how long its group may wait: what is left of this rank's own
  // deadline when it is sent (connecting may have taken a while), so that the group does not
  // outlast the rank and answer a rank that has given up.
  auto set_join_timeout = [&] {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    const uint32_t ms = static_cast<uint32_t>(std::clamp<int64_t>(left, 1, o.timeout.count()));
    std::string word;
    wire::put_u32(word, ms);
    hello_body.replace(0, word.size(), word);  // the body's first word
  };
  if (join) {
    wire::put_u32(hello_body, static_cast<uint32_t>(o.timeout.count()));
    hello_body.append(payload);
    hello_round = std::string(round) + "@" + o.rendezvous_group;
  } else {
    hello_body.assign(payload);
    hello_round.assign(round);
  }
  const bool authenticated = !o.secret.empty();
  std::string rank_nonce, server_nonce, hello;
  const std::string who = "bootstrap (" + o.member + " " + std::to_string(o.rank) +
                          (join ? " of group '" + o.rendezvous_group + "'" : std::string()) + ")";
  const std::string server = server_name(o);
  const auto verdict_deadline = deadline + std::min<Clock::duration>(kVerdictGrace, o.timeout);

  const std::atomic<bool>* cancel = o.cancel.get();
  std::string last_error = "nothing listens there";
  while (Clock::now() < deadline) {
    if (detail::cancelled(cancel))
      return Status::Aborted(who + ": cancelled while waiting for " + server + " (" + last_error + ")");
    auto fd = connect_once(addr, std::min(deadline, Clock::now() + std::chrono::seconds(1)), cancel);
    if (!fd.ok()) {
      last_error = std::string(fd.status().message());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    // One message from the server: its header (`head`, kept for the table's digest) and body;
    // closed_early when it hung up before a byte (a listener of an earlier round closing: the
    // caller tries again, with last_error set).
    char head[kHeaderBytes];
    std::string body;
    bool closed_early = false;
    auto read_answer = [&]() -> Result<Header> {
      Status s = detail::recv_exact(fd->get(), head, sizeof head, verdict_deadline, &closed_early, cancel);
      if (closed_early) {
        last_error = join ? "the service closed the connection before answering (restarting, or at its "
                            "connection limit)"
                          : "the coordinator closed the connection before answering (one of an earlier round "
                            "closing, or at its connection limit)";
        return Status::Unavailable(last_error);
      }
      if (!s.ok())
        return Status(s.code() == StatusCode::kTimeout || s.code() == StatusCode::kAborted ? s.code()
                                                                                           : StatusCode::kUnavailable,
                      who + ": no answer from " + server + ": " + std::string(s.message()));
      const Header reply = decode_header(head);
      // An error is a message (its body, unauthenticated: bounded, and shown escaped), a table
      // at most every rank's payload and address.
      const size_t most = reply.kind == kError ? kMaxErrorBytes : (kMaxPayload + 4096) * size_t(o.size) + 64;
      if (reply.magic != kMagic || reply.body_len > most)
        return Status::Corruption(who + ": malformed answer from " + server);
      // Grown as the bytes arrive, never to the announced length at once: a malformed or hostile
      // answer may announce gigabytes for a large group and send none of them.
      body.clear();
      while (body.size() < reply.body_len) {
        const size_t at = body.size();
        body.resize(at + std::min<size_t>(reply.body_len - at, size_t{1} << 20));
        TUTEL_RETURN_IF_ERROR(
            detail::recv_exact(fd->get(), body.data() + at, body.size() - at, verdict_deadline, nullptr, cancel)
                .with_context(who + ": reading the answer of " + server));
      }
      if (reply.kind == kError) {
        // A code this build does not know (another version, or not a tuteld) is an internal one.
        const bool known = reply.rank > static_cast<uint32_t>(StatusCode::kOk) &&
                           reply.rank <= static_cast<uint32_t>(StatusCode::kAborted);
        return Status(known ? static_cast<StatusCode>(reply.rank) : StatusCode::kInternal,
                      who + ": " + server + " says: " + escape_text(body));
      }
      return reply;
    };
    // Sends `message` and reads the answer; nullopt (and last_error) when the connection failed
    // before the message went or the coordinator hung up before answering: the caller retries.
    auto ask = [&](const std::string& message) -> std::optional<Result<Header>> {
      const Status sent = detail::send_all(fd->get(), message.data(), message.size(), deadline, cancel);
      if (!sent.ok()) {
        last_error = std::string(sent.message());
        return std::nullopt;
      }
      Result<Header> answer = read_answer();
      if (closed_early) return std::nullopt;
      return answer;
    };
    auto retry_later = [] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); };
    if (authenticated) {
      // Nonces both ways, fresh for this connection: the hello's mac covers the server's, the
      // table's mac both (bootstrap_wire.hpp).
      TUTEL_ASSIGN_OR_RETURN(rank_nonce, random_bytes(kNonceBytes));
      const std::optional<Result<Header>> challenge =
          ask(wire::encode_challenge(rank_nonce, h.rank, h.pid));
      if (!challenge) {
        retry_later();
        continue;
      }
      if (!challenge->ok()) return challenge->status();
      if ((*challenge)->kind != (kChallenge | kAuthenticated) || body.size() != kNonceBytes)
        return Status::PermissionDenied(who + ": " + server +
                                        " did not answer the challenge for the peer secret (it has none, or is not a "
                                        "tuteld of this version): give every daemon the same [server] peer_secret_file");
      server_nonce = body;
      if (join) set_join_timeout();
      hello = wire::encode_authenticated(h, hello_round, hello_body, o.secret, rank_nonce, server_nonce);
    } else {
      if (join) set_join_timeout();
      hello = encode(h, hello_round, hello_body);
    }
    const std::optional<Result<Header>> answer = ask(hello);
    if (!answer) {
      retry_later();
      continue;
    }
    if (!answer->ok()) return answer->status();
    const Header reply = **answer;
    if ((reply.kind & ~kAuthenticated) != kTable || static_cast<int>(reply.size) != o.size)
      return Status::Corruption(who + ": unexpected answer from " + server);
    const bool proven = (reply.kind & kAuthenticated) != 0;
    if (authenticated != proven)
      return Status::PermissionDenied(who + ": " + server + (authenticated ? " has no peer secret" : " has a peer secret") +
                                      " and this daemon " + (authenticated ? "has one" : "has none") +
                                      ": give every daemon the same [server] peer_secret_file");
    if (authenticated) {
      // The mac follows the table: proof that a holder of the secret answered this hello.
      std::string mac(kMacBytes, '\0');
      TUTEL_RETURN_IF_ERROR(detail::recv_exact(fd->get(), mac.data(), mac.size(), verdict_deadline, nullptr, cancel)
                                .with_context(who + ": reading the answer of " + server));
      const Digest digest = Sha256().update(head, sizeof head).update(body).finish();
      if (!constant_time_equal(mac, wire::table_mac(o.secret, rank_nonce, server_nonce, digest)))
        return Status::PermissionDenied(who + ": the table from " + server +
                                        " does not prove the peer secret (another secret, or not a tuteld): "
                                        "give every daemon the same [server] peer_secret_file");
    }
    return decode_table(body, o.size);
  }
  if (join)
    return Status::Timeout(who + ": could not reach " + server + " within " +
                           std::to_string(o.timeout.count()) + " ms (" + last_error +
                           "); is it running, and is this its address?");
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
  if (o.timeout > kMaxBootstrapTimeout)
    return Status::InvalidArgument("a bootstrap timeout of " + std::to_string(o.timeout.count()) +
                                   " ms is above the most a group may wait, " +
                                   std::to_string(kMaxBootstrapTimeout.count()) + " ms (an hour)");
  if (o.spin.count() < 0) return Status::InvalidArgument("spin must not be negative");
  if (!o.secret.empty() && (o.secret.size() < kMinSecretBytes || o.secret.size() > kMaxSecretBytes))
    return Status::InvalidArgument("a peer secret is " + std::to_string(kMinSecretBytes) + " to " +
                                   std::to_string(kMaxSecretBytes) + " bytes, not " + std::to_string(o.secret.size()));
  return Status::OK();
}

Result<BootstrapTable> coordinator_exchange(const BootstrapOptions& options, std::string_view round,
                                            std::string_view payload) {
  TUTEL_RETURN_IF_ERROR(validate(options));
  if (payload.size() > kMaxPayload)
    return Status::InvalidArgument("bootstrap payload of " + std::to_string(payload.size()) +
                                   " bytes exceeds 1 MiB");
  if (round.size() > kMaxRound) return Status::InvalidArgument("bootstrap round name too long");
  const std::string& group = options.rendezvous_group;
  if (group.size() > wire::kMaxGroupName || group.find('@') != std::string::npos)
    return Status::InvalidArgument("rendezvous group name '" + group +
                                   "' is longer than 190 bytes or holds '@'");
  const std::string& name = options.group_name;
  if (name.size() > wire::kMaxGroupName || name.find('@') != std::string::npos)
    return Status::InvalidArgument("group name '" + name + "' is longer than 190 bytes or holds '@'");
  // A named group's own coordinator runs the round under the name: "ucx@<tenant>/<group name>"
  // (the daemon passes the tenant and the [group] name; the layer's own name is not part of it).
  const std::string named_round =
      group.empty() && !name.empty() ? std::string(round) + "@" + name : std::string(round);
  const auto deadline = Clock::now() + options.timeout;
  if (options.size == 1) {
    BootstrapTable t;
    t.payloads.emplace_back(payload);
    t.addresses.push_back(address_of(options.coordinator_host, static_cast<uint32_t>(::getpid())));
    return t;
  }
  if (options.rank == 0 && group.empty()) return Coordinator(options, named_round, deadline).run(payload);
  return run_client(options, named_round, payload, deadline);
}

}  // namespace tutel::comm
