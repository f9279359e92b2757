#include "tutel/ipc/socket.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

namespace tutel::ipc {
namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(int err) { return std::strerror(err); }

constexpr size_t kSunPathMax = sizeof(sockaddr_un{}.sun_path);

Status make_address(const std::string& path, sockaddr_un* addr) {
  if (path.empty()) return Status::InvalidArgument("the unix socket path is empty");
  if (path.size() >= kSunPathMax) {
    return Status::InvalidArgument("unix socket path '" + path + "' is " +
                                   std::to_string(path.size()) + " bytes; the limit is " +
                                   std::to_string(kSunPathMax - 1) +
                                   " bytes (choose a shorter path, e.g. under /run)");
  }
  if (path.find('\0') != std::string::npos) {
    return Status::InvalidArgument("unix socket path contains a NUL byte");
  }
  *addr = sockaddr_un{};
  addr->sun_family = AF_UNIX;
  std::memcpy(addr->sun_path, path.data(), path.size());
  return Status::OK();
}

int connect_retrying(int fd, const sockaddr_un& addr) {
  int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  while (rc != 0 && errno == EINTR) {
    // An interrupted connect completes in the background; a retry reports how it ended.
    rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
    if (rc != 0 && errno == EISCONN) rc = 0;
  }
  return rc;
}

// Milliseconds left before `deadline` (-1 = no deadline), for poll().
int poll_timeout_ms(const std::optional<Clock::time_point>& deadline) {
  if (!deadline) return -1;
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
}


// Moves the SCM_RIGHTS descriptors of a received message into `out` (closing any beyond `cap`).
void collect_fds(msghdr* msg, std::vector<UniqueFd>* out, size_t cap) {
  for (cmsghdr* c = CMSG_FIRSTHDR(msg); c != nullptr; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int raw;
      std::memcpy(&raw, CMSG_DATA(c) + i * sizeof(int), sizeof raw);
      UniqueFd fd(raw);
      if (out->size() < cap) out->push_back(std::move(fd));
    }
  }
}

// Room for more descriptors than a frame may carry, so extras are received and closed here
// rather than left to the kernel's truncation.
constexpr size_t kControlFds = 16;
union ControlBuffer {
  char buf[CMSG_SPACE(sizeof(int) * kControlFds)];
  cmsghdr align;
};

// Receives exactly n bytes, polling until `deadline`. `done` counts the bytes of the whole
// frame read so far (for messages).
Status recv_exact(int fd, uint8_t* data, size_t n, const std::optional<Clock::time_point>& deadline,
                  std::chrono::milliseconds timeout, size_t* done, size_t frame_bytes,
                  std::vector<UniqueFd>* fds) {
  size_t got = 0;
  while (got < n) {
    iovec iov{data + got, n - got};
    ControlBuffer control;
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    const ssize_t r = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (r > 0) {
      collect_fds(&msg, fds, kMaxFdsPerFrame);
      got += static_cast<size_t>(r);
      *done += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) {
      if (*done == 0) return Status::Unavailable("the peer closed the connection");
      return Status::Unavailable("the peer closed the connection in the middle of a frame (" +
                                 std::to_string(*done) + " bytes received)");
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == ECONNRESET) return Status::Unavailable("connection reset by the peer");
    if (err != EAGAIN && err != EWOULDBLOCK) return Status::IOError("recvmsg: " + errno_text(err));
    pollfd p{fd, POLLIN, 0};
    const int pr = ::poll(&p, 1, poll_timeout_ms(deadline));
    if (pr < 0 && errno != EINTR) return Status::IOError("poll: " + errno_text(errno));
    if (pr == 0) {
      if (*done == 0) {
        return Status::Timeout("no frame arrived within " + std::to_string(timeout.count()) +
                               " ms");
      }
      return Status::Timeout("the peer stopped in the middle of a frame (" + std::to_string(*done) +
                             " of " + std::to_string(frame_bytes) + " bytes) for " +
                             std::to_string(timeout.count()) +
                             " ms; the stream cannot be resynchronised: close it");
    }
  }
  return Status::OK();
}

FrameHeader read_header(const char* p) {
  FrameHeader h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

}  // namespace

std::optional<Clock::time_point> deadline_after(std::chrono::milliseconds timeout) {
  if (timeout.count() < 0) return std::nullopt;
  const Clock::time_point now = Clock::now();
  // Compared in milliseconds: `now + timeout` in the clock's nanoseconds would overflow first.
  if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - now))
    return std::nullopt;
  return now + timeout;
}

Result<UniqueFd> listen_unix(const std::string& path, mode_t mode, int backlog, std::optional<gid_t> group) {
  sockaddr_un addr;
  TUTEL_RETURN_IF_ERROR(make_address(path, &addr));

  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::AlreadyExists("'" + path +
                                   "' exists and is not a socket; refusing to replace it "
                                   "(remove it or choose another socket path)");
    }
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!probe.valid()) return Status::IOError("socket: " + errno_text(errno));
    // Non-blocking, so a listener with a full backlog answers EAGAIN instead of stalling us.
    if (connect_retrying(probe.get(), addr) == 0 || errno == EAGAIN) {
      return Status::AlreadyExists("another tuteld is listening on " + path +
                                   "; stop it or choose another socket path");
    }
    if (errno != ECONNREFUSED && errno != ENOENT) {
      return Status::IOError("probing the existing socket " + path + ": " + errno_text(errno));
    }
    // Nobody listens: a stale socket left by a daemon that did not shut down cleanly.
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::IOError("removing the stale socket " + path + ": " + errno_text(errno));
    }
  } else if (errno != ENOENT) {
    return Status::IOError("checking " + path + ": " + errno_text(errno));
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::IOError("socket: " + errno_text(errno));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    if (err == EADDRINUSE) {
      return Status::AlreadyExists(path + " appeared while binding (is another tuteld starting?)");
    }
    if (err == EACCES) {
      return Status::PermissionDenied("cannot create the socket " + path + ": " + errno_text(err) +
                                      " (check the directory's permissions)");
    }
    if (err == ENOENT || err == ENOTDIR) {
      return Status::NotFound("cannot create the socket " + path +
                              ": its directory does not exist");
    }
    return Status::IOError("bind " + path + ": " + errno_text(err));
  }
  // Permissions are set before listen(): until then every connect is refused, so no peer can
  // slip in through the umask's mode or the directory's group.
  if (group && ::chown(path.c_str(), static_cast<uid_t>(-1), *group) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return Status::PermissionDenied("cannot give the socket " + path + " the group " + std::to_string(*group) + ": " +
                                    errno_text(err) + " (the process must run as root or as a member of the group)");
  }
  if (::chmod(path.c_str(), mode) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return Status::IOError("chmod " + path + ": " + errno_text(err));
  }
  if (::listen(fd.get(), backlog) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return Status::IOError("listen on " + path + ": " + errno_text(err));
  }
  return fd;
}

Result<UniqueFd> connect_unix(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un addr;
  TUTEL_RETURN_IF_ERROR(make_address(path, &addr));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::IOError("socket: " + errno_text(errno));
  // A unix socket's connect waits for room in the listener's backlog up to the send timeout
  // (EAGAIN then); set for the connect alone.
  const bool bounded = timeout.count() > 0 && timeout < std::chrono::hours(24 * 365);
  auto set_send_timeout = [&](std::chrono::milliseconds t) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(t.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  };
  if (bounded) set_send_timeout(timeout);
  const int rc = connect_retrying(fd.get(), addr);
  const int connect_errno = errno;
  if (bounded) set_send_timeout(std::chrono::milliseconds(0));
  if (rc != 0) {
    const int err = connect_errno;
    switch (err) {
      case EAGAIN:
        return Status::Timeout("tuteld at " + path + " accepted no connection within " +
                               std::to_string(timeout.count()) +
                               " ms (its backlog is full: is it stuck? see its log)");
      case ENOENT:
        return Status::Unavailable("is tuteld running? (no socket at " + path + ")");
      case ECONNREFUSED: {
        // A socket nobody listens on is a daemon gone; a file or a directory is a wrong path.
        struct stat st {};
        if (::stat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode))
          return Status::InvalidArgument(path + " is not a socket (" +
                                         (S_ISDIR(st.st_mode)    ? "a directory"
                                          : S_ISFIFO(st.st_mode) ? "a FIFO"
                                          : S_ISREG(st.st_mode)  ? "a file"
                                                                 : "a device") +
                                         "): give the path of tuteld's socket, as its config names it");
        return Status::Unavailable("is tuteld running? (" + path + " exists but nobody is listening on it)");
      }
      case EACCES:
      case EPERM:
        return Status::PermissionDenied(
            "permission denied connecting to " + path +
            "; run as a user the socket's mode and group admit (the daemon's [server] client_socket_mode and "
            "client_socket_group)");
      default:
        return Status::IOError("connect " + path + ": " + errno_text(err));
    }
  }
  return fd;
}

Result<PeerCredentials> peer_credentials(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return Status::IOError("SO_PEERCRED: " + errno_text(errno));
  }
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

Status send_frame(int fd, FrameType type, uint32_t request_id, std::string_view body,
                  const std::vector<int>& fds, std::chrono::milliseconds timeout) {
  if (!is_known_frame_type(static_cast<uint16_t>(type))) {
    return Status::InvalidArgument("send_frame: unknown frame type " +
                                   std::to_string(static_cast<unsigned>(type)));
  }
  if (body.size() > kMaxFrameBody) {
    return Status::InvalidArgument("send_frame: a " + std::string(frame_type_name(type)) +
                                   " body of " + std::to_string(body.size()) +
                                   " bytes exceeds the limit of " + std::to_string(kMaxFrameBody) +
                                   " bytes");
  }
  if (fds.size() > kMaxFdsPerFrame) {
    return Status::InvalidArgument("send_frame: " + std::to_string(fds.size()) +
                                   " descriptors, at most " + std::to_string(kMaxFdsPerFrame) +
                                   " per frame");
  }
  FrameHeader h;
  h.type = static_cast<uint16_t>(type);
  h.body_length = static_cast<uint32_t>(body.size());
  h.request_id = request_id;

  iovec iov[2] = {{&h, sizeof h}, {const_cast<char*>(body.data()), body.size()}};
  size_t iov_index = 0;
  const size_t total = sizeof h + body.size();
  size_t sent = 0;
  ControlBuffer control;
  bool fds_pending = !fds.empty();
  const auto deadline = deadline_after(timeout);
  while (sent < total) {
    msghdr msg{};
    msg.msg_iov = &iov[iov_index];
    msg.msg_iovlen = (iov[1].iov_len == 0 ? 1 : 2) - iov_index;
    if (fds_pending) attach_fds(&msg, control.buf, fds);
    const ssize_t r = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) {
      fds_pending = false;  // the kernel attached them to the first byte written
      sent += static_cast<size_t>(r);
      size_t left = static_cast<size_t>(r);
      while (left > 0 && iov_index < 2) {
        const size_t step = std::min(left, iov[iov_index].iov_len);
        iov[iov_index].iov_base = static_cast<char*>(iov[iov_index].iov_base) + step;
        iov[iov_index].iov_len -= step;
        left -= step;
        if (iov[iov_index].iov_len == 0) ++iov_index;
      }
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) {
      return Status::Unavailable("the peer closed the connection");
    }
    if (err != EAGAIN && err != EWOULDBLOCK) return Status::IOError("sendmsg: " + errno_text(err));
    pollfd p{fd, POLLOUT, 0};
    const int pr = ::poll(&p, 1, poll_timeout_ms(deadline));
    if (pr < 0 && errno != EINTR) return Status::IOError("poll: " + errno_text(errno));
    if (pr == 0) {
      return Status::Timeout("the peer did not read a " + std::string(frame_type_name(type)) +
                             " frame within " + std::to_string(timeout.count()) + " ms" +
                             (sent > 0 ? "; the stream is now unusable: close it" : ""));
    }
  }
  return Status::OK();
}

Status FrameQueue::push(FrameType type, uint32_t request_id, std::string_view body, const std::vector<int>& fds) {
  if (!is_known_frame_type(static_cast<uint16_t>(type)))
    return Status::InvalidArgument("FrameQueue: unknown frame type " + std::to_string(static_cast<unsigned>(type)));
  if (body.size() > kMaxFrameBody)
    return Status::InvalidArgument("FrameQueue: a " + std::string(frame_type_name(type)) + " body of " +
                                   std::to_string(body.size()) + " bytes exceeds the limit of " +
                                   std::to_string(kMaxFrameBody) + " bytes");
  if (fds.size() > kMaxFdsPerFrame)
    return Status::InvalidArgument("FrameQueue: " + std::to_string(fds.size()) + " descriptors, at most " +
                                   std::to_string(kMaxFdsPerFrame) + " per frame");
  Pending p;
  for (int fd : fds) {
    // The caller may close its own once push returns; these stay until the frame is written.
    UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!copy.valid()) return Status::IOError("FrameQueue: dup: " + errno_text(errno));
    p.fds.push_back(std::move(copy));
  }
  p.bytes = encode_frame(type, request_id, body);
  pending_bytes_ += p.bytes.size();
  frames_.push_back(std::move(p));
  return Status::OK();
}

Status FrameQueue::write_some(int fd) {
  while (!frames_.empty()) {
    Pending& p = frames_.front();
    iovec iov{p.bytes.data() + p.sent, p.bytes.size() - p.sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    ControlBuffer control;
    std::vector<int> raw;
    if (p.sent == 0 && !p.fds.empty()) {
      for (const UniqueFd& f : p.fds) raw.push_back(f.get());
      attach_fds(&msg, control.buf, raw);
    }
    const ssize_t r = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return Status::OK();
      if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) return Status::Unavailable("the peer closed the connection");
      return Status::IOError("sendmsg: " + errno_text(err));
    }
    p.sent += static_cast<size_t>(r);
    pending_bytes_ -= static_cast<size_t>(r);
    p.fds.clear();  // the kernel attached them to the first byte written
    if (p.sent == p.bytes.size()) frames_.pop_front();
  }
  return Status::OK();
}

void attach_fds(msghdr* msg, void* control, std::span<const int> fds) {
  const size_t space = CMSG_SPACE(sizeof(int) * fds.size());
  std::memset(control, 0, space);
  msg->msg_control = control;
  msg->msg_controllen = space;
  cmsghdr* c = CMSG_FIRSTHDR(msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
}

Result<Frame> recv_frame(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = deadline_after(timeout);
  Frame frame;
  size_t done = 0;
  char header[sizeof(FrameHeader)];
  TUTEL_RETURN_IF_ERROR(recv_exact(fd, reinterpret_cast<uint8_t*>(header), sizeof header, deadline,
                                   timeout, &done, sizeof header, &frame.fds));
  frame.header = read_header(header);
  TUTEL_RETURN_IF_ERROR(validate_header(frame.header));
  frame.body.resize(frame.header.body_length);
  TUTEL_RETURN_IF_ERROR(recv_exact(fd, reinterpret_cast<uint8_t*>(frame.body.data()),
                                   frame.body.size(), deadline, timeout, &done,
                                   sizeof header + frame.body.size(), &frame.fds));
  return frame;
}

Status FrameDecoder::feed(const uint8_t* data, size_t n) {
  if (!error_.ok()) return error_;
  if (read_pos_ > 0 && (read_pos_ == buffer_.size() || read_pos_ >= (64u << 10))) {
    buffer_.erase(0, read_pos_);
    buffer_stream_pos_ += read_pos_;
    scan_pos_ -= read_pos_;
    read_pos_ = 0;
  }
  if (n > 0) buffer_.append(reinterpret_cast<const char*>(data), n);
  while (scan_pos_ + sizeof(FrameHeader) <= buffer_.size()) {
    const FrameHeader h = read_header(buffer_.data() + scan_pos_);
    if (Status s = validate_header(h); !s.ok()) {
      error_ = std::move(s);
      return error_;
    }
    scan_pos_ += sizeof(FrameHeader) + h.body_length;
  }
  return Status::OK();
}

std::optional<Frame> FrameDecoder::next() {
  // Only frames whose header was validated (they start before scan_pos_) are returned.
  if (read_pos_ >= scan_pos_) return std::nullopt;
  if (buffer_.size() - read_pos_ < sizeof(FrameHeader)) return std::nullopt;
  const FrameHeader h = read_header(buffer_.data() + read_pos_);
  const size_t frame_bytes = sizeof(FrameHeader) + h.body_length;
  if (buffer_.size() - read_pos_ < frame_bytes) return std::nullopt;

  Frame frame;
  frame.header = h;
  frame.body.assign(buffer_, read_pos_ + sizeof(FrameHeader), h.body_length);
  read_pos_ += frame_bytes;
  const uint64_t frame_end = buffer_stream_pos_ + read_pos_;
  auto it = pending_fds_.begin();
  for (; it != pending_fds_.end() && it->stream_pos < frame_end; ++it) {
    if (frame.fds.size() < kMaxFdsPerFrame) frame.fds.push_back(std::move(it->fd));
  }
  pending_fds_.erase(pending_fds_.begin(), it);  // extras close here
  return frame;
}

void FrameDecoder::add_fd(UniqueFd fd) {
  if (!error_.ok()) return;  // closed: no frame will ever take it
  const uint64_t fed = buffer_stream_pos_ + buffer_.size();
  // Bounded: a peer cannot make us hold descriptors for frames it never completes.
  if (pending_fds_.size() >= 4 * kMaxFdsPerFrame) return;
  pending_fds_.push_back(PendingFd{fed == 0 ? 0 : fed - 1, std::move(fd)});
}

Result<size_t> read_available(int fd, FrameDecoder& decoder) {
  if (!decoder.error().ok()) return decoder.error();
  uint8_t buf[64 << 10];
  size_t total = 0;
  do {
    iovec iov{buf, sizeof buf};
    ControlBuffer control;
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    const ssize_t r = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) break;
      if (err == ECONNRESET) {
        if (total > 0) break;  // hand over what arrived; the next read reports the end
        return Status::Unavailable("connection reset by the peer");
      }
      return Status::IOError("recvmsg: " + errno_text(err));
    }
    std::vector<UniqueFd> fds;
    collect_fds(&msg, &fds, kControlFds);
    if (r == 0) {  // descriptors without data cannot occur on a stream socket
      decoder.mark_eof();
      break;
    }
    total += static_cast<size_t>(r);
    TUTEL_RETURN_IF_ERROR(decoder.feed(buf, static_cast<size_t>(r)));
    for (UniqueFd& f : fds) decoder.add_fd(std::move(f));
  } while (decoder.buffered_bytes() < kReadAvailableBudget);
  return total;
}

}  // namespace tutel::ipc
