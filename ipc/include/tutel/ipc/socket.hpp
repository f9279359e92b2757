// Unix-socket plumbing shared by the daemon and the client: listening and connecting, frames
// with optional SCM_RIGHTS descriptors, and the peer's credentials.
// Thread-safety: functions are reentrant; one socket is used by one thread at a time.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/protocol.hpp"

struct msghdr;

namespace tutel::ipc {

// The time `timeout` from now, or none when it is negative or beyond what the clock can represent
// (std::chrono::milliseconds::max() as "forever" must not wrap into a deadline already past).
std::optional<std::chrono::steady_clock::time_point> deadline_after(std::chrono::milliseconds timeout);

// Creates a listening AF_UNIX stream socket at `path` with `mode` (e.g. 0660) and, when given,
// `group` as its group (this process must be root or a member). Refuses to replace a path
// that is not a socket; removes a stale socket nobody listens on.
Result<UniqueFd> listen_unix(const std::string& path, mode_t mode, int backlog = 64,
                             std::optional<gid_t> group = std::nullopt);
// Connects to the listener at `path`. A connect blocks while the listener's backlog is full (a
// stuck daemon that accepts nothing): with a positive `timeout` it gives up then, with Timeout.
Result<UniqueFd> connect_unix(const std::string& path,
                              std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));

struct PeerCredentials {
  pid_t pid;
  uid_t uid;
  gid_t gid;
};
Result<PeerCredentials> peer_credentials(int fd);  // SO_PEERCRED

// The most descriptors one frame may carry; send_frame refuses more, receivers close extras.
inline constexpr size_t kMaxFdsPerFrame = 4;

struct Frame {
  FrameHeader header;
  std::string body;        // JSON text
  std::vector<UniqueFd> fds;  // received with the frame (SCM_RIGHTS)
};

// Blocking send of one frame (header + body), with up to 4 descriptors attached to its first byte.
// Works on blocking and non-blocking sockets (it polls on EAGAIN). Unavailable when the peer has
// gone; Timeout when `timeout` (negative: none) passes first, after which the stream is unusable
// if part of the frame was already written.
Status send_frame(int fd, FrameType type, uint32_t request_id, std::string_view body,
                  const std::vector<int>& fds = {},
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));
// Frames for a non-blocking socket, written as the peer reads them, never waited for: for an
// event loop, which must not stall on one peer that stops reading. push() checks a frame as
// send_frame does and keeps its bytes and duplicates of its descriptors; write_some() writes
// what the socket takes now (descriptors with their frame's first byte) and leaves the rest for
// when the socket is writable again. One thread at a time.
class FrameQueue {
 public:
  Status push(FrameType type, uint32_t request_id, std::string_view body, const std::vector<int>& fds = {});
  // OK once nothing more can be written now (empty() tells whether all was); Unavailable when the
  // peer has gone, another error when the stream broke. After an error the stream is unusable.
  Status write_some(int fd);
  bool empty() const { return frames_.empty(); }
  size_t pending_bytes() const { return pending_bytes_; }  // not yet written

 private:
  struct Pending {
    std::string bytes;  // header and body
    std::vector<UniqueFd> fds;
    size_t sent = 0;
  };
  std::deque<Pending> frames_;
  size_t pending_bytes_ = 0;
};

// Points `msg` at `control` (at least CMSG_SPACE(sizeof(int) * fds.size()) bytes, aligned for
// cmsghdr) holding `fds` as one SCM_RIGHTS message, as send_frame attaches them; for senders
// that must write what send_frame refuses (tests of malformed streams).
void attach_fds(::msghdr* msg, void* control, std::span<const int> fds);
// Blocking receive of one frame. Unavailable on orderly EOF; Corruption / InvalidArgument on a
// bad header (the stream cannot be resynchronised after one: close it); Timeout when given.
Result<Frame> recv_frame(int fd, std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));

// Incremental frame decoding for non-blocking readers (the daemon's event loop): feed bytes as
// they arrive, take complete frames out. Descriptors arrive separately (see add_fd).
class FrameDecoder {
 public:
  // Appends bytes; a header error makes every later call fail with the same Status. Frames that
  // were complete before the bad header can still be taken with next().
  Status feed(const uint8_t* data, size_t n);
  // The next complete frame, if any.
  std::optional<Frame> next();
  // A descriptor that arrived with the bytes fed so far: it belongs to the frame holding the last
  // byte fed (the kernel ends a read at the message that carried descriptors, and send_frame
  // attaches them to a frame's first byte). A completed frame takes every pending descriptor
  // added before its end, up to kMaxFdsPerFrame; extras, and descriptors that arrive after an
  // error, are closed.
  void add_fd(UniqueFd fd);
  // Bytes held that next() has not returned yet.
  size_t buffered_bytes() const { return buffer_.size() - read_pos_; }
  const Status& error() const { return error_; }
  // True once read_available saw the peer close the stream.
  bool eof() const { return eof_; }
  void mark_eof() { eof_ = true; }

 private:
  struct PendingFd {
    uint64_t stream_pos;  // the stream offset of the last byte fed when it arrived
    UniqueFd fd;
  };
  std::string buffer_;
  size_t read_pos_ = 0;             // buffer_ offset of the next frame to return
  size_t scan_pos_ = 0;             // buffer_ offset of the next header to validate
  uint64_t buffer_stream_pos_ = 0;  // stream offset of buffer_[0]
  Status error_;
  bool eof_ = false;
  std::vector<PendingFd> pending_fds_;
};

// Reads what is available on a non-blocking socket into `decoder`, collecting SCM_RIGHTS
// descriptors. Returns the byte count (0 on EOF, and then decoder.eof() is true; a call that
// finds nothing to read also returns 0 but leaves eof() false), or an error (the decoder's
// sticky error, or the socket's). Reads until EAGAIN, or until the decoder holds
// kReadAvailableBudget unreturned bytes so one busy peer cannot starve an event loop (a
// level-triggered poller such as libuv's reports the socket readable again); always at least one
// read per call.
inline constexpr size_t kReadAvailableBudget = 4u << 20;
Result<size_t> read_available(int fd, FrameDecoder& decoder);

}  // namespace tutel::ipc
