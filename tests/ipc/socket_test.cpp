#include "tutel/ipc/socket.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ipc_test_util.hpp"

namespace tutel::ipc {
namespace {

using namespace std::chrono_literals;
using testing::socket_pair;
using testing::TempDir;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// The bytes send_frame would write, for feeding decoders directly.
std::string encode(FrameType type, uint32_t request_id, const std::string& body) {
  FrameHeader h;
  h.type = static_cast<uint16_t>(type);
  h.body_length = static_cast<uint32_t>(body.size());
  h.request_id = request_id;
  std::string out(reinterpret_cast<const char*>(&h), sizeof h);
  return out + body;
}

std::string pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  std::mt19937 rng(seed);
  for (char& c : s) c = static_cast<char>('a' + rng() % 26);
  return s;
}

UniqueFd make_memfd(const std::string& content) {
  UniqueFd fd(::memfd_create("ipc-test", MFD_CLOEXEC));
  if (fd.valid() && !content.empty()) {
    if (::pwrite(fd.get(), content.data(), content.size(), 0) !=
        static_cast<ssize_t>(content.size())) {
      fd.reset();
    }
  }
  return fd;
}

std::string read_fd(int fd, size_t n) {
  std::string s(n, '\0');
  const ssize_t r = ::pread(fd, s.data(), n, 0);
  s.resize(r < 0 ? 0 : static_cast<size_t>(r));
  return s;
}

bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

// ---------------------------------------------------------------------------------------------
// Blocking frames over a socket pair

TEST(FrameTest, EmptyBodyRoundTrips) {
  auto [a, b] = socket_pair();
  ASSERT_TRUE(a.valid());
  ASSERT_TRUE(send_frame(a.get(), FrameType::kAdminStatus, 9, "").ok());
  Result<Frame> f = recv_frame(b.get(), 5000ms);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->header.magic, kFrameMagic);
  EXPECT_EQ(f->header.version, kProtocolVersion);
  EXPECT_EQ(f->header.type, static_cast<uint16_t>(FrameType::kAdminStatus));
  EXPECT_EQ(f->header.request_id, 9u);
  EXPECT_EQ(f->header.body_length, 0u);
  EXPECT_TRUE(f->body.empty());
  EXPECT_TRUE(f->fds.empty());
}

TEST(FrameTest, MaximumBodyRoundTrips) {
  auto [a, b] = socket_pair();
  const std::string body = pattern(kMaxFrameBody, 1);
  Status sent;
  // The body is larger than the socket buffer: the sender blocks until we read.
  std::thread sender(
      [&, fd = a.get()] { sent = send_frame(fd, FrameType::kCreateLayer, 77, body); });
  Result<Frame> f = recv_frame(b.get());
  sender.join();
  ASSERT_TRUE(sent.ok()) << sent;
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->header.request_id, 77u);
  EXPECT_EQ(f->body.size(), kMaxFrameBody);
  EXPECT_TRUE(f->body == body);
}

TEST(FrameTest, SeveralFramesArriveInOrder) {
  auto [a, b] = socket_pair();
  for (uint32_t i = 0; i < 20; ++i) {
    ASSERT_TRUE(
        send_frame(a.get(), FrameType::kStep, i, "{\"handle\":" + std::to_string(i) + "}").ok());
  }
  for (uint32_t i = 0; i < 20; ++i) {
    Result<Frame> f = recv_frame(b.get(), 5000ms);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->header.request_id, i);
    EXPECT_EQ(f->body, "{\"handle\":" + std::to_string(i) + "}");
  }
}

TEST(FrameTest, RefusesToSendOversizeBodiesTooManyFdsAndUnknownTypes) {
  auto [a, b] = socket_pair();
  const Status big = send_frame(a.get(), FrameType::kOk, 1, std::string(kMaxFrameBody + 1, 'x'));
  EXPECT_EQ(big.code(), StatusCode::kInvalidArgument);
  UniqueFd m = make_memfd("x");
  const std::vector<int> five(5, m.get());
  EXPECT_EQ(send_frame(a.get(), FrameType::kOk, 1, "{}", five).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(send_frame(a.get(), static_cast<FrameType>(99), 1, "{}").code(),
            StatusCode::kInvalidArgument);
  // Nothing was written: the stream still starts at a frame boundary.
  ASSERT_TRUE(send_frame(a.get(), FrameType::kOk, 2, "{}").ok());
  Result<Frame> f = recv_frame(b.get(), 5000ms);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->header.request_id, 2u);
}

TEST(FrameTest, PassesDescriptorsThatReferToTheSameFile) {
  auto [a, b] = socket_pair();
  UniqueFd memfd = make_memfd("written by the sender");
  ASSERT_TRUE(memfd.valid());
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  UniqueFd pipe_r(p[0]), pipe_w(p[1]);
  ASSERT_TRUE(send_frame(a.get(), FrameType::kHelloReply, 3, R"({"session":1})",
                         {memfd.get(), pipe_w.get()})
                  .ok());
  Result<Frame> f = recv_frame(b.get(), 5000ms);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->fds.size(), 2u);
  const int got = f->fds[0].get();
  EXPECT_NE(got, memfd.get());
  EXPECT_TRUE(::fcntl(got, F_GETFD) & FD_CLOEXEC);  // MSG_CMSG_CLOEXEC
  EXPECT_EQ(read_fd(got, 21), "written by the sender");
  const std::string reply = "written by the reader";
  ASSERT_EQ(::pwrite(got, reply.data(), reply.size(), 0), static_cast<ssize_t>(reply.size()));
  EXPECT_EQ(read_fd(memfd.get(), reply.size()), reply);
  // The second descriptor is the pipe's write end.
  ASSERT_EQ(::write(f->fds[1].get(), "!", 1), 1);
  char c = 0;
  ASSERT_EQ(::read(pipe_r.get(), &c, 1), 1);
  EXPECT_EQ(c, '!');
}

TEST(FrameTest, ReceiveTimesOutWhenNothingArrives) {
  auto [a, b] = socket_pair();
  Result<Frame> f = recv_frame(b.get(), 20ms);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kTimeout);
  EXPECT_TRUE(contains(f.status().message(), "no frame arrived")) << f.status();
}

TEST(FrameTest, ReceiveTimesOutMidFrameAndSaysTheStreamIsLost) {
  auto [a, b] = socket_pair();
  const std::string bytes = encode(FrameType::kOk, 1, "{}");
  ASSERT_EQ(::write(a.get(), bytes.data(), 5), 5);
  Result<Frame> f = recv_frame(b.get(), 20ms);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kTimeout);
  EXPECT_TRUE(contains(f.status().message(), "cannot be resynchronised")) << f.status();
}

TEST(FrameTest, EndOfStreamIsUnavailable) {
  auto [a, b] = socket_pair();
  a.reset();
  Result<Frame> f = recv_frame(b.get(), 5000ms);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kUnavailable);
}

TEST(FrameTest, EndOfStreamMidFrameIsUnavailable) {
  auto [a, b] = socket_pair();
  const std::string bytes = encode(FrameType::kOk, 1, "{\"x\":1}");
  ASSERT_EQ(::write(a.get(), bytes.data(), 20), 20);
  a.reset();
  Result<Frame> f = recv_frame(b.get());
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(contains(f.status().message(), "middle of a frame")) << f.status();
}

TEST(FrameTest, ReceiveRefusesABadHeader) {
  auto [a, b] = socket_pair();
  const char garbage[] = "GET / HTTP/1.1\r\n\r\n";
  ASSERT_EQ(::write(a.get(), garbage, sizeof garbage - 1),
            static_cast<ssize_t>(sizeof garbage - 1));
  Result<Frame> f = recv_frame(b.get(), 5000ms);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(f.status().message(), "not a tuteld peer")) << f.status();
}

TEST(FrameTest, SendToAClosedPeerIsUnavailableNotSigpipe) {
  auto [a, b] = socket_pair();
  b.reset();
  EXPECT_EQ(send_frame(a.get(), FrameType::kOk, 1, "{}").code(), StatusCode::kUnavailable);
}

TEST(FrameTest, SendTimesOutWhenThePeerDoesNotRead) {
  auto [a, b] = socket_pair();
  const Status s =
      send_frame(a.get(), FrameType::kOk, 1, std::string(kMaxFrameBody, 'x'), {}, 20ms);
  EXPECT_EQ(s.code(), StatusCode::kTimeout);
  EXPECT_TRUE(contains(s.message(), "unusable")) << s;
}

TEST(FrameTest, SendWorksOnANonBlockingSocket) {
  auto [a, b] = socket_pair();
  set_nonblocking(a.get());
  const std::string body = pattern(kMaxFrameBody, 2);
  Result<Frame> f = Status::Internal("not received");
  std::thread reader([&, fd = b.get()] { f = recv_frame(fd); });
  const Status s = send_frame(a.get(), FrameType::kOk, 4, body);
  reader.join();
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->body == body);
}

// ---------------------------------------------------------------------------------------------
// FrameQueue

// Frames queued faster than the peer reads: write_some() never waits, keeps what the socket does
// not take, and the peer gets every frame whole and in order, descriptors with theirs, however
// the writes were cut.
TEST(FrameQueueTest, WritesWhatTheSocketTakesAndTheRestLaterInOrder) {
  auto [a, b] = socket_pair();
  UniqueFd memfd = make_memfd("attached");
  FrameQueue q;
  constexpr uint32_t kFrames = 40;
  auto with_fd = [](uint32_t i) { return i % 7 == 3; };
  std::vector<std::string> bodies;
  for (uint32_t i = 0; i < kFrames; ++i) {
    bodies.push_back(pattern(100000 + i, i));
    // The caller's descriptor may be closed as soon as push returns: the queue holds its own.
    UniqueFd copy(::dup(memfd.get()));
    ASSERT_TRUE(q.push(FrameType::kOk, i, bodies.back(), with_fd(i) ? std::vector<int>{copy.get()} : std::vector<int>{})
                    .ok());
  }
  ASSERT_TRUE(q.write_some(a.get()).ok());
  ASSERT_FALSE(q.empty()) << "4 MB should not fit in a socket buffer nobody reads";
  const size_t left = q.pending_bytes();
  EXPECT_GT(left, 0u);
  EXPECT_LT(left, kFrames * (100000 + 16 + 40));
  std::vector<Frame> got;
  while (got.size() < kFrames) {
    Result<Frame> f = recv_frame(b.get(), 5000ms);
    ASSERT_TRUE(f.ok()) << f.status() << " after " << got.size() << " frames";
    got.push_back(std::move(*f));
    ASSERT_TRUE(q.write_some(a.get()).ok());
  }
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.pending_bytes(), 0u);
  for (uint32_t i = 0; i < kFrames; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].header.request_id, i);
    EXPECT_TRUE(got[i].body == bodies[i]);
    ASSERT_EQ(got[i].fds.size(), with_fd(i) ? 1u : 0u);
    if (with_fd(i)) {
      EXPECT_EQ(read_fd(got[i].fds[0].get(), 8), "attached");
    }
  }
}

TEST(FrameQueueTest, RefusesWhatSendFrameRefusesAndSaysWhenThePeerIsGone) {
  FrameQueue q;
  EXPECT_EQ(q.push(FrameType::kOk, 1, std::string(kMaxFrameBody + 1, 'x')).code(), StatusCode::kInvalidArgument);
  UniqueFd m = make_memfd("x");
  EXPECT_EQ(q.push(FrameType::kOk, 1, "{}", std::vector<int>(5, m.get())).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(q.push(static_cast<FrameType>(99), 1, "{}").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(q.push(FrameType::kOk, 1, "{}", {-1}).code(), StatusCode::kIOError) << "not a descriptor";
  EXPECT_TRUE(q.empty()) << "a refused frame is not queued";
  auto [a, b] = socket_pair();
  ASSERT_TRUE(q.push(FrameType::kOk, 2, "{}").ok());
  b.reset();
  EXPECT_EQ(q.write_some(a.get()).code(), StatusCode::kUnavailable);
}

// ---------------------------------------------------------------------------------------------
// FrameDecoder

struct Expected {
  FrameType type;
  uint32_t request_id;
  std::string body;
};

std::vector<Expected> sample_frames() {
  std::vector<Expected> frames;
  frames.push_back({FrameType::kHello, 1, R"({"client":"trainer","pid":42})"});
  frames.push_back({FrameType::kAdminStatus, 2, ""});
  frames.push_back({FrameType::kCreateLayer, 3, pattern(1000, 3)});
  frames.push_back({FrameType::kOk, 4, "{}"});
  frames.push_back({FrameType::kError, 5, pattern(17, 5)});
  frames.push_back({FrameType::kLoad, 6, pattern(100000, 6)});
  frames.push_back({FrameType::kStep, 7, "{\"handle\":1}"});
  return frames;
}

std::string encode_all(const std::vector<Expected>& frames) {
  std::string out;
  for (const Expected& e : frames) out += encode(e.type, e.request_id, e.body);
  return out;
}

void expect_frames(const std::vector<Frame>& got, const std::vector<Expected>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].header.type, static_cast<uint16_t>(want[i].type));
    EXPECT_EQ(got[i].header.request_id, want[i].request_id);
    EXPECT_TRUE(got[i].body == want[i].body);
    EXPECT_TRUE(got[i].fds.empty());
  }
}

TEST(FrameDecoderTest, ByteByByte) {
  const std::vector<Expected> want = sample_frames();
  const std::string stream = encode_all(want);
  FrameDecoder d;
  std::vector<Frame> got;
  for (size_t i = 0; i < stream.size(); ++i) {
    ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(&stream[i]), 1).ok());
    while (auto f = d.next()) got.push_back(std::move(*f));
  }
  expect_frames(got, want);
  EXPECT_EQ(d.buffered_bytes(), 0u);
}

TEST(FrameDecoderTest, RandomChunkSizes) {
  const std::vector<Expected> want = sample_frames();
  const std::string stream = encode_all(want);
  for (uint32_t seed = 1; seed <= 25; ++seed) {
    SCOPED_TRACE(seed);
    std::mt19937 rng(seed);
    const size_t max_chunk = seed % 5 == 0 ? 200000 : 1 + rng() % 600;
    FrameDecoder d;
    std::vector<Frame> got;
    size_t pos = 0;
    while (pos < stream.size()) {
      const size_t n = std::min<size_t>(stream.size() - pos, 1 + rng() % max_chunk);
      ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(stream.data() + pos), n).ok());
      pos += n;
      // Sometimes let frames pile up before draining.
      if (rng() % 3 != 0) {
        while (auto f = d.next()) got.push_back(std::move(*f));
      }
    }
    while (auto f = d.next()) got.push_back(std::move(*f));
    expect_frames(got, want);
  }
}

TEST(FrameDecoderTest, AllAtOnce) {
  const std::vector<Expected> want = sample_frames();
  const std::string stream = encode_all(want);
  FrameDecoder d;
  ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(stream.data()), stream.size()).ok());
  std::vector<Frame> got;
  while (auto f = d.next()) got.push_back(std::move(*f));
  expect_frames(got, want);
}

TEST(FrameDecoderTest, GarbageIsAStickyError) {
  for (uint32_t seed = 1; seed <= 10; ++seed) {
    SCOPED_TRACE(seed);
    const std::string garbage = pattern(64, seed);
    FrameDecoder d;
    const Status s = d.feed(reinterpret_cast<const uint8_t*>(garbage.data()), garbage.size());
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), StatusCode::kCorruption);
    const std::string good = encode(FrameType::kOk, 1, "{}");
    const Status again = d.feed(reinterpret_cast<const uint8_t*>(good.data()), good.size());
    EXPECT_EQ(again.code(), s.code());
    EXPECT_EQ(again.message(), s.message());
    EXPECT_FALSE(d.next().has_value());
  }
}

TEST(FrameDecoderTest, FramesBeforeABadHeaderAreStillDelivered) {
  std::string stream = encode(FrameType::kOk, 1, "{}") + encode(FrameType::kOk, 2, "{\"a\":1}");
  FrameHeader bad;
  bad.type = static_cast<uint16_t>(FrameType::kOk);
  bad.version = 7;
  stream.append(reinterpret_cast<const char*>(&bad), sizeof bad);
  FrameDecoder d;
  // Fed in two pieces so the bad header is found while the good frames are buffered.
  ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(stream.data()), 20).ok());
  const Status s = d.feed(reinterpret_cast<const uint8_t*>(stream.data() + 20), stream.size() - 20);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(s.message(), "protocol version 7")) << s;
  auto f1 = d.next();
  auto f2 = d.next();
  ASSERT_TRUE(f1 && f2);
  EXPECT_EQ(f1->header.request_id, 1u);
  EXPECT_EQ(f2->header.request_id, 2u);
  EXPECT_FALSE(d.next().has_value());
  EXPECT_EQ(d.error().code(), StatusCode::kInvalidArgument);
}

TEST(FrameDecoderTest, OversizeLengthIsRefusedBeforeBuffering) {
  FrameHeader h;
  h.type = static_cast<uint16_t>(FrameType::kOk);
  h.body_length = kMaxFrameBody + 1;
  FrameDecoder d;
  const Status s = d.feed(reinterpret_cast<const uint8_t*>(&h), sizeof h);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
}

TEST(FrameDecoderTest, DescriptorsJoinTheFrameTheyArrivedWith) {
  const std::string a = encode(FrameType::kOk, 1, "{}");
  const std::string b = encode(FrameType::kHelloReply, 2, R"({"session":3})");
  const std::string c = encode(FrameType::kOk, 3, "{}");
  const std::string ab = a + b;
  FrameDecoder d;
  // As from the kernel: one read returns all of A and the start of B, with B's descriptor.
  ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(ab.data()), a.size() + 1).ok());
  UniqueFd memfd = make_memfd("arena");
  const int raw = ::dup(memfd.get());
  d.add_fd(UniqueFd(raw));
  ASSERT_TRUE(
      d.feed(reinterpret_cast<const uint8_t*>(ab.data() + a.size() + 1), b.size() - 1).ok());
  ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(c.data()), c.size()).ok());
  auto fa = d.next();
  auto fb = d.next();
  auto fc = d.next();
  ASSERT_TRUE(fa && fb && fc);
  EXPECT_TRUE(fa->fds.empty());
  ASSERT_EQ(fb->fds.size(), 1u);
  EXPECT_EQ(fb->fds[0].get(), raw);
  EXPECT_TRUE(fc->fds.empty());
}

TEST(FrameDecoderTest, ExtraDescriptorsAreClosedNotLeaked) {
  const std::string a = encode(FrameType::kHelloReply, 1, "{}");
  FrameDecoder d;
  ASSERT_TRUE(d.feed(reinterpret_cast<const uint8_t*>(a.data()), a.size()).ok());
  UniqueFd memfd = make_memfd("x");
  std::vector<int> raws;
  for (int i = 0; i < 6; ++i) {
    raws.push_back(::dup(memfd.get()));
    d.add_fd(UniqueFd(raws.back()));
  }
  {
    auto f = d.next();
    ASSERT_TRUE(f);
    ASSERT_EQ(f->fds.size(), kMaxFdsPerFrame);
    for (size_t i = 0; i < kMaxFdsPerFrame; ++i) EXPECT_EQ(f->fds[i].get(), raws[i]);
    for (size_t i = kMaxFdsPerFrame; i < raws.size(); ++i) EXPECT_FALSE(fd_is_open(raws[i]));
  }
  for (int raw : raws) EXPECT_FALSE(fd_is_open(raw));

  // A decoder in error closes descriptors handed to it.
  FrameDecoder broken;
  const std::string garbage = pattern(16, 9);
  ASSERT_FALSE(broken.feed(reinterpret_cast<const uint8_t*>(garbage.data()), garbage.size()).ok());
  const int raw = ::dup(memfd.get());
  broken.add_fd(UniqueFd(raw));
  EXPECT_FALSE(fd_is_open(raw));
}

// ---------------------------------------------------------------------------------------------
// read_available on a non-blocking socket

TEST(ReadAvailableTest, DeliversFramesWithTheirDescriptors) {
  auto [a, b] = socket_pair();
  set_nonblocking(b.get());
  UniqueFd memfd = make_memfd("arena bytes");
  ASSERT_TRUE(send_frame(a.get(), FrameType::kOk, 1, "{}").ok());
  ASSERT_TRUE(
      send_frame(a.get(), FrameType::kHelloReply, 2, R"({"session":1})", {memfd.get()}).ok());
  ASSERT_TRUE(send_frame(a.get(), FrameType::kOk, 3, "{\"x\":3}").ok());
  FrameDecoder d;
  std::vector<Frame> got;
  for (int i = 0; i < 10 && got.size() < 3; ++i) {  // each read ends at a descriptor message
    Result<size_t> n = read_available(b.get(), d);
    ASSERT_TRUE(n.ok()) << n.status();
    while (auto f = d.next()) got.push_back(std::move(*f));
  }
  ASSERT_EQ(got.size(), 3u);
  EXPECT_TRUE(got[0].fds.empty());
  ASSERT_EQ(got[1].fds.size(), 1u);
  EXPECT_EQ(read_fd(got[1].fds[0].get(), 11), "arena bytes");
  EXPECT_TRUE(got[2].fds.empty());
  EXPECT_EQ(got[2].body, "{\"x\":3}");

  // Nothing more: 0 bytes and not EOF; after the peer closes, 0 bytes and EOF.
  Result<size_t> idle = read_available(b.get(), d);
  ASSERT_TRUE(idle.ok()) << idle.status();
  EXPECT_EQ(*idle, 0u);
  EXPECT_FALSE(d.eof());
  a.reset();
  Result<size_t> eof = read_available(b.get(), d);
  ASSERT_TRUE(eof.ok()) << eof.status();
  EXPECT_EQ(*eof, 0u);
  EXPECT_TRUE(d.eof());
}

TEST(ReadAvailableTest, AssemblesAMaximumFrame) {
  auto [a, b] = socket_pair();
  set_nonblocking(b.get());
  const std::string body = pattern(kMaxFrameBody, 8);
  Status sent;
  std::thread sender([&, fd = a.get()] { sent = send_frame(fd, FrameType::kSave, 11, body); });
  FrameDecoder d;
  std::optional<Frame> f;
  while (!f) {
    pollfd p{b.get(), POLLIN, 0};
    ASSERT_GE(::poll(&p, 1, 10000), 0);
    Result<size_t> n = read_available(b.get(), d);
    ASSERT_TRUE(n.ok()) << n.status();
    ASSERT_FALSE(d.eof());
    f = d.next();
  }
  sender.join();
  ASSERT_TRUE(sent.ok()) << sent;
  EXPECT_EQ(f->header.request_id, 11u);
  EXPECT_TRUE(f->body == body);
}

TEST(ReadAvailableTest, GarbageIsAnErrorThatSticks) {
  auto [a, b] = socket_pair();
  set_nonblocking(b.get());
  const std::string garbage = pattern(100, 4);
  ASSERT_EQ(::write(a.get(), garbage.data(), garbage.size()), static_cast<ssize_t>(garbage.size()));
  FrameDecoder d;
  Result<size_t> n = read_available(b.get(), d);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), StatusCode::kCorruption);
  Result<size_t> again = read_available(b.get(), d);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), StatusCode::kCorruption);
}

// ---------------------------------------------------------------------------------------------
// listen_unix / connect_unix / peer_credentials

TEST(UnixSocketTest, ListenConnectAndPeerCredentials) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.file("tuteld.sock");
  Result<UniqueFd> listener = listen_unix(path, 0660);
  ASSERT_TRUE(listener.ok()) << listener.status();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);

  Result<UniqueFd> client = connect_unix(path);
  ASSERT_TRUE(client.ok()) << client.status();
  UniqueFd server(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(server.valid());

  for (int fd : {server.get(), client->get()}) {
    Result<PeerCredentials> cred = peer_credentials(fd);
    ASSERT_TRUE(cred.ok()) << cred.status();
    EXPECT_EQ(cred->pid, ::getpid());
    EXPECT_EQ(cred->uid, ::getuid());
    EXPECT_EQ(cred->gid, ::getgid());
  }
  ASSERT_TRUE(send_frame(client->get(), FrameType::kHello, 1, R"({"client":"t","pid":1})").ok());
  Result<Frame> f = recv_frame(server.get(), 5000ms);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->header.type, static_cast<uint16_t>(FrameType::kHello));
}

// A listener that accepts nothing and whose backlog is full (a stuck daemon): a bounded connect
// gives up with Timeout instead of blocking for ever.
TEST(UnixSocketTest, ABoundedConnectToAFullBacklogTimesOut) {
  TempDir dir;
  const std::string path = dir.file("stuck.sock");
  Result<UniqueFd> listener = listen_unix(path, 0600, /*backlog=*/0);
  ASSERT_TRUE(listener.ok()) << listener.status();
  // Fill the backlog with connections nobody accepts.
  std::vector<UniqueFd> queued;
  for (int i = 0; i < 4; ++i) {
    Result<UniqueFd> c = connect_unix(path, 100ms);
    if (!c.ok()) {
      EXPECT_EQ(c.status().code(), StatusCode::kTimeout) << c.status();
      break;
    }
    queued.push_back(std::move(*c));
  }
  ASSERT_LT(queued.size(), 4u) << "the backlog never filled";
  Result<UniqueFd> late = connect_unix(path, 100ms);
  EXPECT_EQ(late.status().code(), StatusCode::kTimeout) << late.status();
  EXPECT_NE(late.status().message().find("accepted no connection"), std::string::npos) << late.status();
  // Once the listener accepts, connects go through again.
  UniqueFd accepted(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(accepted.valid());
  EXPECT_TRUE(connect_unix(path, 1000ms).ok());
}

TEST(UnixSocketTest, AdminModeIsApplied) {
  TempDir dir;
  const std::string path = dir.file("admin.sock");
  Result<UniqueFd> listener = listen_unix(path, 0600);
  ASSERT_TRUE(listener.ok()) << listener.status();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(UnixSocketTest, StaleSocketIsReplaced) {
  TempDir dir;
  const std::string path = dir.file("tuteld.sock");
  {
    Result<UniqueFd> first = listen_unix(path, 0660);
    ASSERT_TRUE(first.ok()) << first.status();
  }  // closed without unlinking, as after a crash
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(connect_unix(path).status().code(), StatusCode::kUnavailable);

  Result<UniqueFd> second = listen_unix(path, 0660);
  ASSERT_TRUE(second.ok()) << second.status();
  Result<UniqueFd> client = connect_unix(path);
  EXPECT_TRUE(client.ok()) << client.status();
}

TEST(UnixSocketTest, LiveSocketIsAlreadyExists) {
  TempDir dir;
  const std::string path = dir.file("tuteld.sock");
  Result<UniqueFd> first = listen_unix(path, 0660);
  ASSERT_TRUE(first.ok()) << first.status();
  Result<UniqueFd> second = listen_unix(path, 0660);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kAlreadyExists);
  EXPECT_TRUE(contains(second.status().message(), "another tuteld is listening on " + path))
      << second.status();
  // The first daemon keeps its socket.
  Result<UniqueFd> client = connect_unix(path);
  EXPECT_TRUE(client.ok()) << client.status();
}

TEST(UnixSocketTest, RefusesToReplaceANonSocket) {
  TempDir dir;
  const std::string path = dir.file("not-a-socket");
  { std::ofstream(path) << "precious"; }
  Result<UniqueFd> r = listen_unix(path, 0660);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kAlreadyExists);
  EXPECT_TRUE(contains(r.status().message(), "not a socket")) << r.status();
  std::ifstream in(path);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");

  EXPECT_FALSE(listen_unix(dir.path(), 0660).ok());  // a directory
}

TEST(UnixSocketTest, RefusesTooLongPaths) {
  const std::string path = "/tmp/" + std::string(200, 'p') + ".sock";
  Result<UniqueFd> l = listen_unix(path, 0660);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(l.status().message(), "limit is 107 bytes")) << l.status();
  Result<UniqueFd> c = connect_unix(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(listen_unix("", 0660).ok());
}

TEST(UnixSocketTest, ConnectToAMissingPathAsksWhetherTuteldRuns) {
  TempDir dir;
  const std::string path = dir.file("missing.sock");
  Result<UniqueFd> c = connect_unix(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(c.status().message(), "is tuteld running? (no socket at " + path + ")");
}

TEST(UnixSocketTest, MissingDirectoryIsNotFound) {
  TempDir dir;
  Result<UniqueFd> l = listen_unix(dir.file("no/such/dir.sock"), 0660);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace tutel::ipc
