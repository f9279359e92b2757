#include "tutel/ipc/arena.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "ipc_test_util.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::ipc {
namespace {

using namespace std::chrono_literals;
using testing::Child;
using testing::socket_pair;
using testing::TempDir;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

constexpr uint64_t kArenaBytes = 1 << 20;

// A memfd of `size` bytes whose start is a copy of `header_page`, sealed with `seals` (0: none).
UniqueFd make_memfd(uint64_t size, const std::vector<uint8_t>& header_page, int seals,
                    bool allow_sealing = true) {
  UniqueFd fd(::memfd_create("arena-test", MFD_CLOEXEC | (allow_sealing ? MFD_ALLOW_SEALING : 0)));
  if (!fd.valid()) return fd;
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return UniqueFd();
  const size_t n = std::min<size_t>(header_page.size(), size);
  if (n > 0 && ::pwrite(fd.get(), header_page.data(), n, 0) != static_cast<ssize_t>(n)) {
    return UniqueFd();
  }
  if (seals != 0 && ::fcntl(fd.get(), F_ADD_SEALS, seals) != 0) return UniqueFd();
  return fd;
}

std::vector<uint8_t> header_page_of(const Arena& a) {
  return std::vector<uint8_t>(a.base(), a.base() + 4096);
}

Result<Arena> attach_dup(const Arena& a) { return Arena::attach(UniqueFd(::dup(a.fd())), a.layout().arena_bytes); }

TEST(ArenaTest, CreateWritesTheHeaderAndEmptyRings) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok()) << r.status();
  const Arena& a = *r;
  Result<ArenaLayout> want = arena_layout(kArenaBytes);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(a.layout().arena_bytes, want->arena_bytes);
  EXPECT_EQ(a.layout().data_offset, want->data_offset);

  ArenaHeader h;
  std::memcpy(&h, a.base(), sizeof h);
  EXPECT_EQ(h.magic, kArenaMagic);
  EXPECT_EQ(h.version, kProtocolVersion);
  EXPECT_EQ(h.arena_bytes, want->arena_bytes);
  EXPECT_EQ(h.request_ring_offset, want->request_ring_offset);
  EXPECT_EQ(h.completion_ring_offset, want->completion_ring_offset);
  EXPECT_EQ(h.data_offset, want->data_offset);
  EXPECT_EQ(h.data_bytes, want->data_bytes);

  for (RingControl* c : {a.request_control(), a.completion_control()}) {
    EXPECT_EQ(c->head.load(), 0u);
    EXPECT_EQ(c->tail.load(), 0u);
    EXPECT_EQ(c->doorbell.load(), 0u);
    EXPECT_EQ(c->consumer_waiting.load(), 0u);
  }
  EXPECT_EQ(reinterpret_cast<uint8_t*>(a.request_slots()),
            a.base() + want->request_ring_offset + sizeof(RingControl));
  EXPECT_EQ(reinterpret_cast<uint8_t*>(a.completion_slots()),
            a.base() + want->completion_ring_offset + sizeof(RingControl));
  EXPECT_EQ(a.data(), a.base() + want->data_offset);
  EXPECT_TRUE(::fcntl(a.fd(), F_GETFD) & FD_CLOEXEC);
  // The whole data region is mapped and writable.
  std::memset(a.data(), 0x5A, a.layout().data_bytes);
  EXPECT_EQ(a.data()[a.layout().data_bytes - 1], 0x5A);
}

TEST(ArenaTest, CreateRefusesBadSizes) {
  Result<Arena> tiny = Arena::create(4096);
  ASSERT_FALSE(tiny.ok());
  EXPECT_TRUE(contains(tiny.status().message(), "minimum")) << tiny.status();
  EXPECT_FALSE(Arena::create(uint64_t{1} << 40).ok());
}

TEST(ArenaTest, SealsForbidResizingAndFurtherSeals) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok()) << r.status();
  const int seals = ::fcntl(r->fd(), F_GET_SEALS);
  ASSERT_GE(seals, 0);
  EXPECT_TRUE(seals & F_SEAL_SHRINK);
  EXPECT_TRUE(seals & F_SEAL_GROW);
  EXPECT_TRUE(seals & F_SEAL_SEAL);
  errno = 0;
  EXPECT_NE(::ftruncate(r->fd(), kArenaBytes / 2), 0);
  EXPECT_EQ(errno, EPERM);
  EXPECT_NE(::ftruncate(r->fd(), kArenaBytes * 2), 0);
  EXPECT_NE(::fcntl(r->fd(), F_ADD_SEALS, F_SEAL_FUTURE_WRITE), 0);
}

TEST(ArenaTest, AttachInAForkedChildSeesTheDaemonsWrites) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok()) << r.status();
  Arena& daemon = *r;
  const char greeting[] = "written by the daemon";
  std::memcpy(daemon.data(), greeting, sizeof greeting);
  auto [daemon_end, client_end] = socket_pair();
  ASSERT_TRUE(daemon_end.valid());

  Child child([&, fd = client_end.get()]() -> int {
    // The client's view: the arena arrives over the socket, as in the hello reply.
    Result<Frame> hello = recv_frame(fd, 10000ms);
    if (!hello.ok() || hello->fds.size() != 1) return 2;
    Result<Arena> mine = Arena::attach(std::move(hello->fds[0]), daemon.layout().arena_bytes);
    if (!mine.ok()) return 3;
    if (mine->base() == daemon.base()) return 4;  // a mapping of its own
    if (mine->layout().data_offset != daemon.layout().data_offset) return 5;
    if (std::memcmp(mine->data(), greeting, sizeof greeting) != 0) return 6;
    const char reply[] = "written by the client";
    std::memcpy(mine->data() + 4096, reply, sizeof reply);
    return 0;
  });
  ASSERT_TRUE(child.started());
  ASSERT_TRUE(send_frame(daemon_end.get(), FrameType::kHelloReply, 1, "{}", {daemon.fd()}).ok());
  EXPECT_EQ(child.wait(), 0);
  EXPECT_STREQ(reinterpret_cast<const char*>(daemon.data() + 4096), "written by the client");
}

TEST(ArenaTest, AttachRefusesAnUnsealedMemfd) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok());
  const std::vector<uint8_t> page = header_page_of(*r);

  UniqueFd unsealed = make_memfd(r->layout().arena_bytes, page, 0);
  ASSERT_TRUE(unsealed.valid());
  Result<Arena> a = Arena::attach(std::move(unsealed), r->layout().arena_bytes);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(contains(a.status().message(), "not sealed")) << a.status();

  UniqueFd shrink_only = make_memfd(r->layout().arena_bytes, page, F_SEAL_SHRINK);
  ASSERT_TRUE(shrink_only.valid());
  EXPECT_FALSE(Arena::attach(std::move(shrink_only), r->layout().arena_bytes).ok());

  UniqueFd no_sealing = make_memfd(r->layout().arena_bytes, page, 0, /*allow_sealing=*/false);
  ASSERT_TRUE(no_sealing.valid());
  EXPECT_FALSE(Arena::attach(std::move(no_sealing), r->layout().arena_bytes).ok());

  // The same bytes, properly sealed, attach.
  UniqueFd sealed = make_memfd(r->layout().arena_bytes, page, F_SEAL_SHRINK | F_SEAL_GROW);
  ASSERT_TRUE(sealed.valid());
  Result<Arena> good = Arena::attach(std::move(sealed), r->layout().arena_bytes);
  EXPECT_TRUE(good.ok()) << good.status();
}

TEST(ArenaTest, AttachRefusesThingsThatAreNotMemfds) {
  EXPECT_EQ(Arena::attach(UniqueFd(), kArenaBytes).status().code(), StatusCode::kInvalidArgument);
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  UniqueFd w(p[1]);
  Result<Arena> pipe_arena = Arena::attach(UniqueFd(p[0]), kArenaBytes);
  ASSERT_FALSE(pipe_arena.ok());
  EXPECT_TRUE(contains(pipe_arena.status().message(), "not a memfd")) << pipe_arena.status();

  TempDir dir;
  ASSERT_TRUE(dir.ok());
  UniqueFd file(::open(dir.file("arena").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(file.valid());
  ASSERT_EQ(::ftruncate(file.get(), kArenaBytes), 0);
  EXPECT_FALSE(Arena::attach(std::move(file), kArenaBytes).ok());
}

TEST(ArenaTest, AttachRefusesAWrongSize) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok());
  const std::vector<uint8_t> page = header_page_of(*r);
  const int seals = F_SEAL_SHRINK | F_SEAL_GROW;

  // Not a whole number of pages.
  UniqueFd ragged = make_memfd(kArenaBytes + 100, page, seals);
  ASSERT_TRUE(ragged.valid());
  Result<Arena> a = Arena::attach(std::move(ragged), kArenaBytes + 100);
  ASSERT_FALSE(a.ok());
  EXPECT_TRUE(contains(a.status().message(), "pages")) << a.status();

  // Below the minimum.
  UniqueFd tiny = make_memfd(8192, page, seals);
  ASSERT_TRUE(tiny.valid());
  Result<Arena> b = Arena::attach(std::move(tiny), 8192);
  ASSERT_FALSE(b.ok());
  EXPECT_TRUE(contains(b.status().message(), "minimum")) << b.status();

  // Larger than the header says (and than announced: the announced size must match too).
  UniqueFd grown = make_memfd(kArenaBytes * 2, page, seals);
  ASSERT_TRUE(grown.valid());
  Result<Arena> c = Arena::attach(UniqueFd(::dup(grown.get())), kArenaBytes * 2);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(c.status().message(), "arena_bytes")) << c.status();
  Result<Arena> d = Arena::attach(std::move(grown), kArenaBytes);
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(contains(d.status().message(), "not the " + std::to_string(kArenaBytes) + " announced")) << d.status();

  // Announced beyond the maximum: refused before the descriptor is even looked at.
  Result<Arena> e = Arena::attach(UniqueFd(), uint64_t{1} << 40);
  ASSERT_FALSE(e.ok());
  EXPECT_TRUE(contains(e.status().message(), "maximum")) << e.status();
}

TEST(ArenaTest, AttachRefusesACorruptHeader) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok());
  auto* h = reinterpret_cast<ArenaHeader*>(r->base());
  const ArenaHeader good = *h;

  h->magic = 0xDEADBEEF;
  Result<Arena> bad_magic = attach_dup(*r);
  ASSERT_FALSE(bad_magic.ok());
  EXPECT_EQ(bad_magic.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(bad_magic.status().message(), "not a tuteld arena")) << bad_magic.status();
  *h = good;

  h->version = 9;
  Result<Arena> bad_version = attach_dup(*r);
  ASSERT_FALSE(bad_version.ok());
  EXPECT_TRUE(contains(bad_version.status().message(), "version 9")) << bad_version.status();
  *h = good;

  h->data_offset += 4096;
  Result<Arena> bad_offset = attach_dup(*r);
  ASSERT_FALSE(bad_offset.ok());
  EXPECT_TRUE(contains(bad_offset.status().message(), "data_offset")) << bad_offset.status();
  *h = good;

  h->completion_ring_offset = 0;
  EXPECT_FALSE(attach_dup(*r).ok());
  *h = good;

  Result<Arena> ok = attach_dup(*r);
  EXPECT_TRUE(ok.ok()) << ok.status();
}

TEST(ArenaTest, MovesTransferTheMapping) {
  Result<Arena> r = Arena::create(kArenaBytes);
  ASSERT_TRUE(r.ok());
  Arena a = std::move(*r);
  uint8_t* base = a.base();
  const int fd = a.fd();
  Arena b(std::move(a));
  EXPECT_EQ(a.base(), nullptr);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b.base(), base);
  EXPECT_EQ(b.fd(), fd);
  Result<Arena> other = Arena::create(kArenaBytes);
  ASSERT_TRUE(other.ok());
  b = std::move(*other);
  EXPECT_NE(b.base(), nullptr);
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);  // the first arena's fd was closed
  b.data()[0] = 1;
}

}  // namespace
}  // namespace tutel::ipc
