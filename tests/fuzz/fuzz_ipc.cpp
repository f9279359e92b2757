// libFuzzer target: the client/daemon wire protocol (ipc/).
//
// Mode (first byte % 4):
//   0  FrameDecoder: the rest is a byte stream fed in chunks (sizes drawn from the stream), with
//      descriptors attached now and then, exactly as read_available does; every frame taken is
//      then decoded the way the daemon and the client decode bodies (parse_body, get_int,
//      get_string, get_layout, status_from_error_body, reply_body, the daemon's copy of the body
//      and dump_body).
//   1  The same stream written to a socketpair and read back with recv_frame (blocking reader)
//      until it fails.
//   2  The same stream sent over a socketpair in several messages, some carrying SCM_RIGHTS
//      descriptors, read with read_available + FrameDecoder::next (the daemon's event loop).
//   3  Range checks: arena_layout, check_range and check_data_range
//      on values taken from the bytes; every OK answer is checked to really lie
//      inside the range without wrapping.
// Invariants checked beyond "no crash": every frame returned has a valid header and a body of
// body_length bytes; at most kMaxFdsPerFrame descriptors per frame; no descriptor leaks.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tutel/ipc/json_body.hpp"
#include "fuzz_check.hpp"
#include "tutel/ipc/protocol.hpp"
#include "tutel/ipc/socket.hpp"

using namespace tutel;
using nlohmann::json;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n;
  size_t pos = 0;
  uint8_t byte() { return pos < n ? p[pos++] : 0; }
  uint64_t u64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{byte()} << (8 * i);
    return v;
  }
  size_t left() const { return n - pos; }
};

int count_open_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n;
}

int devnull() {
  static const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  return fd;
}

// What the daemon and the client do with a frame's body.
void decode_frame(const ipc::Frame& f) {
  FUZZ_CHECK(ipc::validate_header(f.header).ok());
  FUZZ_CHECK(f.body.size() == f.header.body_length);
  FUZZ_CHECK(f.fds.size() <= ipc::kMaxFdsPerFrame);
  (void)ipc::frame_type_name(static_cast<ipc::FrameType>(f.header.type));
  Result<json> body = ipc::parse_body(f);
  for (auto expected : {ipc::FrameType::kOk, ipc::FrameType::kHelloReply, ipc::FrameType::kLayerInfo}) {
    Result<json> r = ipc::reply_body(f, expected);
    if (r.ok()) FUZZ_CHECK(r->is_object());
  }
  if (!body.ok()) {
    FUZZ_CHECK(body.status().code() == StatusCode::kInvalidArgument);
    return;
  }
  const json& b = *body;
  FUZZ_CHECK(b.is_object());
  for (const char* key : {"handle", "rank", "bytes", "region", "pid", "session", "spin_us", "step", "code",
                          "experts", "model_dim", "output_dim", "hidden", "k"})
    (void)ipc::get_int(b, key);
  for (const char* key : {"spec", "name", "path", "client", "tenant", "kind", "device", "message", "layer"})
    (void)ipc::get_string(b, key);
  (void)ipc::get_layout(b);
  (void)ipc::status_from_error_body(b);
  // The daemon copies a client request's body into the closures that run it
  // (handle_client_frame: `const json b = *body;`), and dumps replies.
  const json copy = b;
  (void)ipc::dump_body(copy);
  (void)ipc::error_body(ipc::status_from_error_body(b));
  json layout_body = b;
  if (auto l = ipc::arena_layout(ipc::kMaxFrameBody); l.ok()) ipc::put_layout(layout_body, *l);
}

void run_decoder(Reader& in) {
  ipc::FrameDecoder dec;
  size_t fed = 0, taken = 0;
  while (in.left() > 0) {
    const uint8_t ctl = in.byte();
    size_t chunk = ctl & 0x3f;
    if (ctl & 0x40) chunk = chunk * 97 + 1;
    chunk = std::min(chunk, in.left());
    const bool accepting = dec.error().ok();  // after an error, feed() drops the bytes
    const Status st = dec.feed(in.p + in.pos, chunk);
    in.pos += chunk;
    if (accepting) fed += chunk;
    if (ctl & 0x80) dec.add_fd(UniqueFd(::dup(devnull())));
    if (!st.ok()) FUZZ_CHECK(!dec.error().ok());
    while (auto f = dec.next()) {
      taken += sizeof(ipc::FrameHeader) + f->body.size();
      decode_frame(*f);
    }
    FUZZ_CHECK(taken + dec.buffered_bytes() == fed);
    if (!dec.error().ok()) {
      // Sticky: every later feed fails the same way.
      FUZZ_CHECK(!dec.feed(nullptr, 0).ok());
    }
  }
}

bool make_pair(int sv[2]) {
  return ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0;
}

void run_recv_frame(Reader& in) {
  int sv[2];
  if (!make_pair(sv)) return;
  UniqueFd a(sv[0]), b(sv[1]);
  const size_t n = std::min<size_t>(in.left(), 100000);  // fits the socket buffer
  size_t off = 0;
  while (off < n) {
    const ssize_t w = ::send(a.get(), in.p + in.pos + off, n - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w <= 0) break;
    off += static_cast<size_t>(w);
  }
  ::shutdown(a.get(), SHUT_WR);
  for (int i = 0; i < 1000; ++i) {
    Result<ipc::Frame> f = ipc::recv_frame(b.get(), std::chrono::milliseconds(50));
    if (!f.ok()) break;
    decode_frame(*f);
  }
}

void run_read_available(Reader& in) {
  int sv[2];
  if (!make_pair(sv)) return;
  UniqueFd a(sv[0]), b(sv[1]);
  ::fcntl(b.get(), F_SETFL, O_NONBLOCK);
  size_t total = 0;
  while (in.left() > 0 && total < 100000) {
    const uint8_t ctl = in.byte();
    const size_t chunk = std::min<size_t>(((ctl & 0x1f) + 1) * ((ctl & 0x20) ? 53 : 1), in.left());
    const int nfds = (ctl >> 6) * 3;  // 0, 3, 6 or 9 descriptors
    iovec iov{const_cast<uint8_t*>(in.p + in.pos), chunk};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
      char buf[CMSG_SPACE(sizeof(int) * 9)];
      cmsghdr align;
    } control{};
    std::vector<int> fds;
    if (nfds > 0) {
      for (int i = 0; i < nfds; ++i) fds.push_back(::dup(devnull()));
      ipc::attach_fds(&msg, control.buf, fds);
    }
    const ssize_t w = ::sendmsg(a.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    for (int fd : fds) ::close(fd);
    if (w <= 0) break;
    in.pos += static_cast<size_t>(w);
    total += static_cast<size_t>(w);
  }
  ::shutdown(a.get(), SHUT_WR);
  ipc::FrameDecoder dec;
  for (int i = 0; i < 100000; ++i) {
    Result<size_t> r = ipc::read_available(b.get(), dec);
    while (auto f = dec.next()) decode_frame(*f);
    if (!r.ok() || dec.eof()) break;
  }
}

void run_ranges(Reader& in) {
  const uint64_t arena_bytes = in.u64() >> (in.byte() % 64);
  Result<ipc::ArenaLayout> layout = ipc::arena_layout(arena_bytes);
  if (layout.ok()) {
    const ipc::ArenaLayout& l = *layout;
    FUZZ_CHECK(l.arena_bytes >= arena_bytes);
    FUZZ_CHECK(l.data_offset + l.data_bytes == l.arena_bytes);
    FUZZ_CHECK(l.request_ring_offset < l.completion_ring_offset && l.completion_ring_offset < l.data_offset);
  }
  while (in.left() >= 16) {
    const uint64_t begin = in.u64() >> (in.byte() % 64), end = in.u64() >> (in.byte() % 64);
    const uint64_t offset = in.u64() >> (in.byte() % 64), bytes = in.u64() >> (in.byte() % 64);
    if (ipc::check_range(begin, end, offset, bytes, "x", "fuzz").ok()) {
      FUZZ_CHECK(offset >= begin && offset <= end && bytes <= end - offset);
      FUZZ_CHECK(offset % 4 == 0 && bytes % 4 == 0);
    }
    if (layout.ok() && ipc::check_data_range(*layout, offset, bytes, "x").ok()) {
      FUZZ_CHECK(offset >= layout->data_offset);
      FUZZ_CHECK(offset + bytes <= layout->arena_bytes && offset + bytes >= offset);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  (void)devnull();
  const int baseline = count_open_fds();  // per input: libFuzzer itself opens files between inputs
  Reader in{data + 1, size - 1};
  switch (data[0] % 4) {
    case 0: run_decoder(in); break;
    case 1: run_recv_frame(in); break;
    case 2: run_read_available(in); break;
    case 3: run_ranges(in); break;
  }
  const int now = count_open_fds();
  if (now != baseline) {
    std::fprintf(stderr, "descriptor leak: %d open, %d before\n", now, baseline);
    std::abort();
  }
  return 0;
}
