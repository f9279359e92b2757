// The rendezvous service (rendezvous.hpp): one poll loop over the listener, a wake-up eventfd and
// every connection; the joins and answers of bootstrap_wire.hpp.
#include "tutel/comm/rendezvous.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "bootstrap_wire.hpp"
#include "socket_util.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::comm {
namespace {

using detail::Clock;
using detail::Fd;
using wire::Header;

constexpr uint32_t kMaxTimeoutMs = static_cast<uint32_t>(wire::kMaxBootstrapTimeout.count());
constexpr int kMaxGroupSize = 1 << 20;
// An answer that a peer does not read within this is dropped with the connection.
constexpr auto kWriteTimeout = std::chrono::seconds(5);

struct Peer {
  enum class State { kReading, kJoined, kWriting };
  Fd fd;
  State state = State::kReading;
  std::string in;
  // The answer: a group's members share one table (up to size × 1 MiB), never a copy each;
  // with a peer secret, each rank's own mac of it follows (out_mac).
  std::shared_ptr<const std::string> out;
  std::string out_mac;
  size_t out_pos = 0;  // over out, then out_mac
  // With a peer secret: the rank's nonce (its challenge) and ours (the answer), once exchanged.
  std::string rank_nonce, server_nonce;
  Clock::time_point deadline;  // for reading the join, or for writing the answer
  std::string address;         // "127.0.0.1, pid 42" once the join is read
  std::string group;           // the key "<round>@<group>" once joined
  int rank = -1;
};

struct Group {
  int size = 0, local_size = 0;
  Clock::time_point deadline;
  std::chrono::milliseconds timeout{0};  // the one that set `deadline`, for messages
  // The ranks that joined, sparse: a join claims a size (up to 2^20) before anyone else has
  // joined, and must not make the service allocate for all of them (it did: ~75 MB a join).
  struct Member {
    uint64_t peer;  // peer id
    std::string payload, address;
  };
  std::map<int, Member> joined;
  int count = 0;
  // Set when the group is doomed: kept until `deadline` to answer its late ranks alike.
  Status failure;
  bool failed = false;
};

class Service final : public RendezvousService {
 public:
  Service(RendezvousOptions o, Fd listener, Fd wake, uint16_t port)
      : o_(std::move(o)), listener_(std::move(listener)), wake_(std::move(wake)), port_(port) {
    thread_ = std::thread([this] { loop(); });
  }

  ~Service() override {
    stop_.store(true);
    const uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
    thread_.join();
  }

  const std::string& host() const override { return o_.host; }
  uint16_t port() const override { return port_; }
  RendezvousStats stats() const override {
    std::lock_guard lock(stats_mu_);
    return stats_;
  }

 private:
  std::string where() const { return o_.host + ":" + std::to_string(port_); }

  void loop() {
    std::vector<pollfd> fds;
    std::vector<uint64_t> ids;
    while (!stop_.load()) {
      fds.clear();
      ids.clear();
      fds.push_back({wake_.get(), POLLIN, 0});
      // Out of descriptors, the listener stays readable with nothing to accept: not polled for
      // a moment then, rather than spun on.
      const bool accepting = Clock::now() >= accept_paused_until_;
      fds.push_back({listener_.get(), static_cast<short>(accepting ? POLLIN : 0), 0});
      for (auto& [id, p] : peers_) {
        fds.push_back(
            {p.fd.get(), p.state == Peer::State::kWriting ? short(POLLOUT) : short(POLLIN), 0});
        ids.push_back(id);
      }
      int timeout = detail::poll_timeout_ms(next_deadline());
      if (!accepting) timeout = std::min(timeout, static_cast<int>(detail::kAcceptPause.count()));
      const int r = ::poll(fds.data(), fds.size(), timeout);
      if (r < 0 && errno != EINTR) {
        TUTEL_LOG(ERROR) << "rendezvous service at " << where()
                         << ": poll: " << detail::errno_text(errno);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (r > 0) {
        if (fds[1].revents & POLLIN) accept_all();
        for (size_t i = 2; i < fds.size(); ++i) {
          if (fds[i].revents == 0) continue;
          auto it = peers_.find(ids[i - 2]);
          if (it != peers_.end()) on_event(it->first, it->second, fds[i].revents);
        }
      }
      expire(Clock::now());
      publish();
    }
    // Shutting down: every rank waiting hears why (best effort, bounded).
    const std::string bye = wire::encode_error(
        Status::Unavailable("the rendezvous service at " + where() + " is shutting down"));
    for (auto& [id, p] : peers_)
      if (p.state == Peer::State::kJoined)
        (void)detail::send_all(p.fd.get(), bye.data(), bye.size(),
                               Clock::now() + std::chrono::milliseconds(100));
  }

  Clock::time_point next_deadline() const {
    auto next = Clock::now() + std::chrono::seconds(1);
    for (const auto& [key, g] : groups_) next = std::min(next, g.deadline);
    for (const auto& [id, p] : peers_)
      if (p.state != Peer::State::kJoined) next = std::min(next, p.deadline);
    return next;
  }

  void accept_all() {
    for (;;) {
      const int raw = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (raw < 0) {
        if (detail::out_of_descriptors(errno)) accept_paused_until_ = Clock::now() + detail::kAcceptPause;
        return;
      }
      Fd fd(raw);
      if (static_cast<int>(peers_.size()) >= o_.max_connections) {
        // Full: the oldest connection still reading its join goes (peers_ is in accept order),
        // not the newcomer. A rank sends its join as soon as it connects, so the oldest is a
        // stalled or hostile client's, most likely; refusing newcomers let a crowd of idle
        // connections, renewed every join_timeout, keep every group out. Ranks that joined and
        // wait for their group are never dropped for it.
        const auto oldest = std::find_if(peers_.begin(), peers_.end(),
                                         [](const auto& e) { return e.second.state == Peer::State::kReading; });
        count_refused();
        if (!limit_logged_) {
          limit_logged_ = true;
          TUTEL_LOG(WARN) << "rendezvous service at " << where() << ": " << o_.max_connections
                          << " connections open, its limit; dropping the oldest that has sent no join (something "
                          << "other than tuteld's ranks may be connecting to it)";
        }
        if (oldest == peers_.end()) continue;  // every one a rank that joined: the newcomer retries
        drop(oldest->first);
      } else if (static_cast<int>(peers_.size()) < o_.max_connections / 2) {
        limit_logged_ = false;  // logged again the next time it fills
      }
      detail::enable_keepalive(fd.get());  // a joined rank waits silently, maybe for long
      Peer p;
      p.fd = std::move(fd);
      p.deadline = Clock::now() + o_.join_timeout;
      peers_.emplace(next_id_++, std::move(p));
    }
  }

  void on_event(uint64_t id, Peer& p, short revents) {
    if (p.state == Peer::State::kWriting) {
      if (revents & (POLLERR | POLLHUP | POLLNVAL)) return drop(id);
      const Result<bool> sent = detail::send_some(p.fd.get(), *p.out, p.out_mac, &p.out_pos);
      if (!sent.ok()) return drop(id);
      if (!*sent) return;
      // Answered. Read what the peer sent past its message (a malformed one may have) so that the
      // close does not reset the connection before the peer read our answer.
      ::shutdown(p.fd.get(), SHUT_WR);
      char sink[4096];
      for (int i = 0; i < 16 && ::recv(p.fd.get(), sink, sizeof sink, MSG_DONTWAIT) > 0; ++i) {
      }
      return drop(id);
    }
    char buf[65536];
    if (p.state == Peer::State::kJoined) {
      // A joined rank says nothing more; hearing its end means it gave up (or died).
      const ssize_t n = ::recv(p.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))) return;
      withdraw(p);
      return drop(id);
    }
    // Reading a join: never more than the message announced in its header.
    size_t want = wire::kHeaderBytes;
    if (p.in.size() >= wire::kHeaderBytes) {
      const Header h = wire::decode_header(p.in.data());
      want = wire::kHeaderBytes + h.round_len + h.body_len;
    }
    const ssize_t n =
        ::recv(p.fd.get(), buf, std::min(sizeof buf, want - p.in.size()), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      if (!p.in.empty()) count_refused();  // truncated
      return drop(id);
    }
    if (n < 0) return;
    p.in.append(buf, static_cast<size_t>(n));
    if (p.in.size() < wire::kHeaderBytes) return;
    const Header h = wire::decode_header(p.in.data());
    const bool authenticated = (h.kind & wire::kAuthenticated) != 0;
    const uint32_t kind = h.kind & ~wire::kAuthenticated;
    const size_t auth_bytes = authenticated ? wire::kAuthBytes : 0;
    if (p.in.size() == wire::kHeaderBytes) {  // the header just completed: check it first
      if (h.magic != wire::kMagic) return refuse(p, "not a tuteld rendezvous join (bad magic)");
      if (kind == wire::kHello)
        return refuse(p, where() +
                             " is a rendezvous service, not a group's own coordinator: give the "
                             "group a name and no coordinator, or point it at its own coordinator");
      if (kind != wire::kJoin && !(kind == wire::kChallenge && authenticated))
        return refuse(p, "not a tuteld rendezvous join (kind " + std::to_string(h.kind) + ")");
      // Told before the body is read: it may be a megabyte.
      if (o_.secret.empty() && authenticated)
        return refuse_for_secret(p, h,
                                 "this service has no peer secret, and the joining daemon has one: give every "
                                 "daemon the same [server] peer_secret_file (or none)");
      if (!o_.secret.empty() && !authenticated)
        return refuse_for_secret(p, h,
                                 "this service requires the peer secret, and the joining daemon has none: give "
                                 "every daemon the same [server] peer_secret_file");
      if (kind == wire::kChallenge) {
        if (h.round_len != 0 || h.body_len != wire::kNonceBytes || !p.server_nonce.empty())
          return refuse(p, "malformed challenge");
      } else {
        if (authenticated && p.server_nonce.empty())
          return refuse_for_secret(p, h,
                                   "a join came without its challenge first: the joining daemon speaks another "
                                   "version of the bootstrap");
        if (h.round_len < 3 || h.round_len > wire::kMaxJoinRound)
          return refuse(p, "malformed join: group key of " + std::to_string(h.round_len) + " bytes");
        if (h.body_len < 4 + auth_bytes || h.body_len > wire::kMaxPayload + 4 + auth_bytes)
          return refuse(
              p, "malformed join: body of " + std::to_string(h.body_len) + " bytes exceeds 1 MiB");
      }
    }
    const size_t message_bytes = wire::kHeaderBytes + h.round_len + h.body_len;
    if (p.in.size() < message_bytes) return;
    if (kind == wire::kChallenge) return answer_challenge(id, p);
    if (authenticated) {
      if (!wire::verify_authenticated(p.in, o_.secret, p.rank_nonce, p.server_nonce))
        return refuse_for_secret(p, h,
                                 "the join does not prove this service's peer secret: give every daemon the "
                                 "same [server] peer_secret_file");
      p.in.resize(message_bytes - wire::kAuthBytes);
      Header stripped = h;
      stripped.body_len -= static_cast<uint32_t>(wire::kAuthBytes);
      return on_join(id, p, stripped);
    }
    on_join(id, p, h);
  }

  void on_join(uint64_t id, Peer& p, const Header& h) {
    std::string key = p.in.substr(wire::kHeaderBytes, h.round_len);
    const uint32_t timeout_ms = wire::get_u32(p.in.data() + wire::kHeaderBytes + h.round_len);
    const int size = static_cast<int>(h.size), rank = static_cast<int>(h.rank),
              local_size = static_cast<int>(h.local_size);
    const size_t at = key.find('@');
    if (at == std::string::npos || at == 0 || at + 1 == key.size())
      return refuse(
          p, "malformed join: group key '" + printable(key) + "' is not \"<round>@<group>\"");
    if (h.size < 1 || h.size > kMaxGroupSize || h.rank >= h.size || h.local_size < 1 ||
        h.local_size > h.size)
      return refuse(p, "malformed join: rank " + std::to_string(h.rank) + ", size " +
                           std::to_string(h.size) + ", local_size " + std::to_string(h.local_size));
    if (timeout_ms < 1 || timeout_ms > kMaxTimeoutMs)
      return refuse(p, "malformed join: a timeout of " + std::to_string(timeout_ms) + " ms, outside [1, " +
                           std::to_string(kMaxTimeoutMs) + "]");
    p.address = wire::address_of(detail::peer_ip(p.fd.get()), h.pid);
    std::string payload = p.in.substr(wire::kHeaderBytes + h.round_len + 4);
    p.in.clear();
    p.in.shrink_to_fit();
    const std::string group_name = printable(key.substr(at + 1));
    const auto now = Clock::now();
    const auto timeout = std::chrono::milliseconds(timeout_ms);

    auto it = groups_.find(key);
    if (it == groups_.end() && static_cast<int>(groups_.size()) >= o_.max_groups &&
        !drop_a_failed_group()) {
      count_refused();
      return answer(p, wire::encode_error(Status::ResourceExhausted(
                           "rendezvous service at " + where() + ": " +
                           std::to_string(groups_.size()) +
                           " groups are waiting for ranks, its limit; group '" + group_name +
                           "' cannot start now: try again once some have met or timed out")));
    }
    if (it == groups_.end()) {
      Group g;
      g.size = size;
      g.local_size = local_size;
      g.deadline = now + timeout;
      g.timeout = timeout;
      it = groups_.emplace(key, std::move(g)).first;
    }
    Group& g = it->second;
    if (g.failed) return answer(p, wire::encode_error(g.failure));
    if (now + timeout < g.deadline) {
      g.deadline = now + timeout;
      g.timeout = timeout;
    }
    if (size != g.size || local_size != g.local_size) {
      const int other = first_member(g);
      return doom(
          it, p,
          Status::InvalidArgument(
              "bootstrap: rank " + std::to_string(rank) + " (" + p.address + ") of group '" +
              group_name + "' was started with size " + std::to_string(size) + ", local_size " +
              std::to_string(local_size) + " but rank " + std::to_string(other) + " (" +
              address_of(g, other) + ") with size " + std::to_string(g.size) + ", local_size " +
              std::to_string(g.local_size) + "; start every rank with the same group shape"));
    }
    if (g.joined.count(rank) != 0)
      return doom(
          it, p,
          Status::InvalidArgument("bootstrap: rank " + std::to_string(rank) + " of group '" +
                                  group_name + "' arrived twice (" + address_of(g, rank) + " and " +
                                  p.address + "); give every process its own rank"));
    p.state = Peer::State::kJoined;
    p.group = key;
    p.rank = rank;
    g.joined.emplace(rank, Group::Member{id, std::move(payload), p.address});
    if (++g.count < g.size) return;
    // Every rank is here: the table is as large as what they sent.
    std::vector<std::string> payloads, addresses;
    payloads.reserve(g.joined.size());
    addresses.reserve(g.joined.size());
    for (auto& [r, m] : g.joined) {
      payloads.push_back(std::move(m.payload));
      addresses.push_back(m.address);
    }
    const bool authenticated = !o_.secret.empty();
    const auto table =
        std::make_shared<const std::string>(wire::encode_table(payloads, addresses, authenticated));
    const Digest digest = authenticated ? sha256(*table) : Digest{};
    for (const auto& [r, m] : g.joined) {
      Peer& member = peers_.at(m.peer);
      answer(member, table);
      if (authenticated) member.out_mac = wire::table_mac(o_.secret, member.rank_nonce, member.server_nonce, digest);
    }
    groups_.erase(it);
    std::lock_guard lock(stats_mu_);
    ++stats_.groups_completed;
  }

  // Drops the failed group nearest its deadline (its late ranks then wait for a group that is
  // no longer there, and time out); false when no group has failed.
  bool drop_a_failed_group() {
    auto victim = groups_.end();
    for (auto it = groups_.begin(); it != groups_.end(); ++it)
      if (it->second.failed && (victim == groups_.end() || it->second.deadline < victim->second.deadline))
        victim = it;
    if (victim == groups_.end()) return false;
    groups_.erase(victim);
    return true;
  }

  static int first_member(const Group& g) { return g.joined.empty() ? 0 : g.joined.begin()->first; }
  static std::string address_of(const Group& g, int rank) {
    auto m = g.joined.find(rank);
    return m == g.joined.end() ? std::string("?") : m->second.address;
  }

  // Fails the group on every rank that joined and on `p`; the group stays, failed, until its
  // deadline so that its late ranks hear the same.
  void doom(std::map<std::string, Group>::iterator it, Peer& p, Status failure) {
    Group& g = it->second;
    const auto msg = std::make_shared<const std::string>(wire::encode_error(failure));
    for (const auto& [r, m] : g.joined) answer(peers_.at(m.peer), msg);
    g.joined.clear();  // kept failed, it holds only its failure
    g.count = 0;
    g.failed = true;
    g.failure = std::move(failure);
    answer(p, msg);
    std::lock_guard lock(stats_mu_);
    ++stats_.groups_failed;
  }

  void expire(Clock::time_point now) {
    for (auto it = groups_.begin(); it != groups_.end();) {
      Group& g = it->second;
      if (now < g.deadline) {
        ++it;
        continue;
      }
      if (!g.failed) {
        // The first missing ranks only (the message names 16): a group may be 2^20 ranks large,
        // and many may expire at once on the service's one thread.
        std::vector<int> missing;
        const size_t total_missing = static_cast<size_t>(g.size - g.count);
        for (int r = 0; r < g.size && missing.size() < 16; ++r)
          if (g.joined.count(r) == 0) missing.push_back(r);
        std::string missing_text = wire::rank_list(missing);
        if (total_missing > missing.size()) missing_text += ", ... (" + std::to_string(total_missing) + " in all)";
        const std::string name = printable(it->first.substr(it->first.find('@') + 1));
        const auto msg = std::make_shared<const std::string>(wire::encode_error(Status::Timeout(
            "bootstrap of group '" + name + "' timed out after " +
            std::to_string(g.timeout.count()) + " ms: rank" + (total_missing > 1 ? "s " : " ") +
            missing_text + " never reached the rendezvous service at " + where() +
            " (" + std::to_string(g.count) + " of " + std::to_string(g.size) +
            " ranks arrived); start them, or check their group name and size")));
        for (const auto& [r, m] : g.joined) answer(peers_.at(m.peer), msg);
        std::lock_guard lock(stats_mu_);
        ++stats_.groups_failed;
      }
      it = groups_.erase(it);
    }
    std::vector<uint64_t> late;
    for (const auto& [id, p] : peers_)
      if (p.state != Peer::State::kJoined && now >= p.deadline) late.push_back(id);
    for (uint64_t id : late) {
      if (peers_.at(id).state == Peer::State::kReading) count_refused();
      drop(id);
    }
  }

  // A rank that hung up before its group completed: its place is free again.
  void withdraw(const Peer& p) {
    auto it = groups_.find(p.group);
    if (it == groups_.end() || it->second.failed) return;
    Group& g = it->second;
    if (g.joined.erase(p.rank) == 0) return;
    if (--g.count == 0) groups_.erase(it);
  }

  void answer(Peer& p, std::string message) { answer(p, std::make_shared<const std::string>(std::move(message))); }
  void answer(Peer& p, std::shared_ptr<const std::string> message) {
    p.state = Peer::State::kWriting;
    p.out = std::move(message);
    p.out_mac.clear();
    p.out_pos = 0;
    p.deadline = Clock::now() + kWriteTimeout;
  }

  // A rank's challenge (its nonce, before its join), answered with ours at once: 72 bytes into a
  // fresh connection's empty send buffer, so a send that does not take them whole means the
  // connection is gone. The peer then sends its join, read as any other.
  void answer_challenge(uint64_t id, Peer& p) {
    Result<std::string> nonce = random_bytes(wire::kNonceBytes);
    if (!nonce.ok()) {
      count_refused();
      p.in.clear();
      return answer(p, wire::encode_error(Status::Internal("rendezvous service at " + where() +
                                                           ": cannot draw a nonce: " +
                                                           std::string(nonce.status().message()))));
    }
    p.rank_nonce = p.in.substr(wire::kHeaderBytes, wire::kNonceBytes);
    p.server_nonce = std::move(nonce).value();
    p.in.clear();
    const std::string challenge = wire::encode_challenge(p.server_nonce);
    const ssize_t w = ::send(p.fd.get(), challenge.data(), challenge.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w != static_cast<ssize_t>(challenge.size())) drop(id);
  }

  // Logged too: the joining rank hears why, its group only sees that rank missing.
  void refuse_for_secret(Peer& p, const Header& h, const std::string& why) {
    TUTEL_LOG(WARN) << "rendezvous service at " << where() << ": refused a connection from "
                    << detail::peer_ip(p.fd.get()) << ", pid " << h.pid << ": " << why;
    refuse(p, why, StatusCode::kPermissionDenied);
  }

  void refuse(Peer& p, const std::string& why, StatusCode code = StatusCode::kInvalidArgument) {
    count_refused();
    p.in.clear();
    answer(p, wire::encode_error(Status(code, "rendezvous service at " + where() + ": " + why)));
  }

  void drop(uint64_t id) { peers_.erase(id); }
  bool limit_logged_ = false;  // a warning once each time the connections reach their limit

  void count_refused() {
    std::lock_guard lock(stats_mu_);
    ++stats_.refused;
  }

  void publish() {
    std::lock_guard lock(stats_mu_);
    stats_.pending_groups = groups_.size();
    stats_.failed_groups = static_cast<uint64_t>(
        std::count_if(groups_.begin(), groups_.end(), [](const auto& g) { return g.second.failed; }));
    stats_.connections = peers_.size();
  }

  // The key as sent may be any bytes: messages show it with non-printables replaced.
  static std::string printable(std::string s) {
    for (char& c : s)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
    return s;
  }

  const RendezvousOptions o_;
  Fd listener_, wake_;
  Clock::time_point accept_paused_until_{};  // accepting paused until then (out of descriptors)
  const uint16_t port_;
  std::atomic<bool> stop_{false};
  std::map<uint64_t, Peer> peers_;  // loop thread only
  std::map<std::string, Group> groups_;
  uint64_t next_id_ = 1;
  mutable std::mutex stats_mu_;
  RendezvousStats stats_;
  std::thread thread_;
};

}  // namespace

Result<std::unique_ptr<RendezvousService>> RendezvousService::start(const RendezvousOptions& o) {
  if (o.max_connections < 1 || o.max_groups < 1 || o.join_timeout.count() <= 0)
    return Status::InvalidArgument(
        "rendezvous: max_connections, max_groups and join_timeout must be positive");
  if (!o.secret.empty() && (o.secret.size() < kMinSecretBytes || o.secret.size() > kMaxSecretBytes))
    return Status::InvalidArgument("rendezvous: a peer secret is " + std::to_string(kMinSecretBytes) + " to " +
                                   std::to_string(kMaxSecretBytes) + " bytes");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(o.port);
  if (::inet_pton(AF_INET, o.host.c_str(), &addr.sin_addr) != 1)
    return Status::InvalidArgument("rendezvous host '" + o.host +
                                   "' is not a numeric IPv4 address");
  const std::string where = o.host + ":" + std::to_string(o.port);
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Status::IOError("rendezvous: socket: " + detail::errno_text(errno));
  const int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  // A coordinator that just closed this port (the cluster's join) may hold it for a moment.
  const auto bind_deadline = Clock::now() + std::chrono::seconds(1);
  while (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    if (err != EADDRINUSE || Clock::now() >= bind_deadline)
      return Status::Unavailable("rendezvous service cannot listen on " + where + ": " +
                                 detail::errno_text(err) +
                                 " (is another process using this port? set [cluster] rendezvous)");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (::listen(fd.get(), 256) != 0)
    return Status::IOError("rendezvous: listen on " + where + ": " + detail::errno_text(errno));
  socklen_t len = sizeof addr;
  if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    return Status::IOError("rendezvous: getsockname: " + detail::errno_text(errno));
  Fd wake(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake.valid()) return Status::IOError("rendezvous: eventfd: " + detail::errno_text(errno));
  return std::unique_ptr<RendezvousService>(
      new Service(o, std::move(fd), std::move(wake), ntohs(addr.sin_port)));
}

}  // namespace tutel::comm
