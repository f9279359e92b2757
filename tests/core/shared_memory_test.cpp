// SharedMemory: sealed memfds shared between processes, and what a receiver must refuse.
#include "tutel/core/shared_memory.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

namespace tutel {
namespace {

TEST(SharedMemory, CreateRoundsToPagesSealsAndIsSharedWithAForkedReader) {
  auto m = SharedMemory::create(10000, "test region");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->bytes() % page_bytes(), 0u);
  EXPECT_GE(m->bytes(), 10000u);
  const int seals = ::fcntl(m->fd(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_NE(::ftruncate(m->fd(), 4096), 0);  // sealed: nobody can shrink it under a mapper
  for (size_t i = 0; i < m->bytes(); ++i) EXPECT_EQ(m->data()[i], 0) << i;  // fresh pages are zero

  // Another mapping of the same fd (what a receiving process makes) sees the writes both ways.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto other = SharedMemory::attach(UniqueFd(::dup(m->fd())), "the test memfd", m->bytes());
    if (!other.ok() || other->bytes() != m->bytes()) _exit(2);
    if (std::memcmp(other->data(), "parent", 7) != 0 && other->data()[0] != 0) _exit(3);
    std::memcpy(other->data() + 4096, "child", 6);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_STREQ(reinterpret_cast<const char*>(m->data() + 4096), "child");
}

// discard_pages frees the pages whoever else holds the memfd: a client that kept its session
// arena's or a region's descriptor after its session or region ended held the daemon's pages
// for good (12 arenas of 32 MiB: 384 MiB, counted nowhere). The holder's mapping stays valid
// and reads zeros; what it writes later is its own, and is kept. Without it, memory handed
// over (an exported state, whose descriptor its creator keeps) lives as long as its file.
TEST(SharedMemory, DiscardedPagesGoWhoeverHoldsTheMemfd) {
  auto m = SharedMemory::create(size_t{8} << 20, "lent memory");
  ASSERT_TRUE(m.ok()) << m.status();
  std::memset(m->data(), 0x5a, m->bytes());
  const UniqueFd kept(::dup(m->fd()));
  auto peer = SharedMemory::attach(UniqueFd(::dup(m->fd())), "the peer's mapping", m->bytes());
  ASSERT_TRUE(peer.ok()) << peer.status();
  struct stat st {};
  ASSERT_EQ(::fstat(kept.get(), &st), 0);
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, m->bytes());
  const size_t bytes = m->bytes();
  m->discard_pages();
  *m = SharedMemory();
  ASSERT_EQ(::fstat(kept.get(), &st), 0);
  EXPECT_EQ(st.st_size, static_cast<off_t>(bytes)) << "the file keeps its size";
  EXPECT_EQ(st.st_blocks, 0) << "the discarded pages are still held";
  EXPECT_EQ(peer->data()[4096], 0);
  peer->data()[4096] = 7;
  auto again = SharedMemory::attach(UniqueFd(::dup(kept.get())), "another mapping", bytes);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->data()[4096], 7);
  auto handed = SharedMemory::create(size_t{1} << 20, "handed-over memory");
  ASSERT_TRUE(handed.ok()) << handed.status();
  std::memset(handed->data(), 0x33, handed->bytes());
  const UniqueFd file(handed->take_fd().release());
  *handed = SharedMemory();
  unsigned char byte = 0;
  ASSERT_EQ(::pread(file.get(), &byte, 1, 4096), 1);
  EXPECT_EQ(byte, 0x33);
}

TEST(SharedMemory, AttachRefusesWhatCouldBeTruncatedOrIsNotAMemfd) {
  EXPECT_EQ(SharedMemory::attach(UniqueFd(), "x", 4096).status().code(), StatusCode::kInvalidArgument);
  // Unsealed: the sender could truncate it and crash this process with SIGBUS.
  UniqueFd unsealed(::memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(unsealed.valid());
  ASSERT_EQ(::ftruncate(unsealed.get(), 4096), 0);
  auto r = SharedMemory::attach(std::move(unsealed), "the test memfd", 4096);
  EXPECT_EQ(r.status().code(), StatusCode::kPermissionDenied) << r.status();
  EXPECT_NE(r.status().message().find("the test memfd is not sealed"), std::string::npos) << r.status();
  // Sealed, but not a whole number of pages.
  UniqueFd odd(::memfd_create("odd", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(::ftruncate(odd.get(), 4097), 0);
  ASSERT_EQ(::fcntl(odd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
  EXPECT_EQ(SharedMemory::attach(std::move(odd), "x", 4097).status().code(), StatusCode::kInvalidArgument);
  // Sealed and empty.
  UniqueFd empty(::memfd_create("empty", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(::fcntl(empty.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
  EXPECT_EQ(SharedMemory::attach(std::move(empty), "x", 0).status().code(), StatusCode::kInvalidArgument);
  // Not a regular file.
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  UniqueFd write_end(pipe_fds[1]);
  EXPECT_EQ(SharedMemory::attach(UniqueFd(pipe_fds[0]), "x", 4096).status().code(), StatusCode::kInvalidArgument);
  // A file that cannot be sealed (not a memfd).
  char path[] = "/tmp/shared-memory-test-XXXXXX";
  UniqueFd file(::mkstemp(path));
  ASSERT_TRUE(file.valid());
  ::unlink(path);
  ASSERT_EQ(::ftruncate(file.get(), 4096), 0);
  EXPECT_EQ(SharedMemory::attach(std::move(file), "x", 4096).status().code(), StatusCode::kInvalidArgument);
}

// The sender chooses the size, and a mapping faults every page in: a memfd of other than the
// announced size is refused before anything is mapped. A sparse 1 TiB memfd costs nothing to make
// and would take the machine's memory (or fail to map, as ResourceExhausted) if it were mapped.
TEST(SharedMemory, AttachRefusesAnotherSizeThanAnnouncedBeforeMapping) {
  auto sealed_memfd = [](off_t bytes) {
    UniqueFd fd(::memfd_create("sized", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(::ftruncate(fd.get(), bytes), 0);
    EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    return fd;
  };
  auto huge = SharedMemory::attach(sealed_memfd(off_t{1} << 40), "the huge memfd", 65536);
  EXPECT_EQ(huge.status().code(), StatusCode::kInvalidArgument) << huge.status();
  EXPECT_NE(huge.status().message().find("holds 1099511627776 bytes, not the 65536 announced"), std::string::npos)
      << huge.status();
  auto small = SharedMemory::attach(sealed_memfd(4096), "the small memfd", 65536);
  EXPECT_EQ(small.status().code(), StatusCode::kInvalidArgument) << small.status();
  auto exact = SharedMemory::attach(sealed_memfd(65536), "the exact memfd", 65536);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(exact->bytes(), 65536u);
}

TEST(SharedMemory, CreateRefusesEmptyAndAbsurdSizes) {
  EXPECT_EQ(SharedMemory::create(0, "x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedMemory::create(~size_t{0}, "x").status().code(), StatusCode::kInvalidArgument);
}

// What a daemon takes from a client to read or write: a file in ordinary memory, never one on
// a disk (which could be on a network or FUSE mount), a pipe, or nothing.
TEST(CheckMemoryFile, TakesMemfdsAndTmpfsFilesOnly) {
  const UniqueFd memfd(::memfd_create("check", MFD_CLOEXEC));
  ASSERT_TRUE(memfd.valid());
  EXPECT_TRUE(check_memory_file(memfd.get(), "the state").ok());
  // This test's own binary: a file on a disk, wherever the build is (refused only where it is
  // not on tmpfs).
  const UniqueFd disk(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(disk.valid());
  struct statfs disk_fs {};
  ASSERT_EQ(::fstatfs(disk.get(), &disk_fs), 0);
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  const UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  for (int fd : {disk_fs.f_type == TMPFS_MAGIC ? -1 : disk.get(), pipe_read.get(), -1}) {
    const Status st = check_memory_file(fd, "the state");
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << fd << ": " << st;
    EXPECT_NE(st.message().find("the state"), std::string_view::npos) << st;
  }
  // A hugetlb memfd, where the kernel makes one (it needs no huge pages to exist yet).
  const UniqueFd huge(::memfd_create("check", MFD_CLOEXEC | MFD_HUGETLB));
  if (huge.valid()) {
    EXPECT_EQ(check_memory_file(huge.get(), "the state").code(), StatusCode::kInvalidArgument);
  }
  struct statfs fs {};
  if (::statfs("/dev/shm", &fs) == 0 && fs.f_type == TMPFS_MAGIC) {
    char in_shm[] = "/dev/shm/tutel_check_memory_file_XXXXXX";
    const UniqueFd shm(::mkstemp(in_shm));
    ASSERT_TRUE(shm.valid());
    ::unlink(in_shm);
    EXPECT_TRUE(check_memory_file(shm.get(), "the state").ok());
  }
}

TEST(UniqueFd, CloseReportsAndMoveTransfersOwnership) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  UniqueFd a(fds[0]), b(fds[1]);
  UniqueFd moved = std::move(a);
  EXPECT_FALSE(a.valid());
  EXPECT_EQ(moved.get(), fds[0]);
  EXPECT_EQ(moved.close(), 0);
  EXPECT_FALSE(moved.valid());
  EXPECT_EQ(moved.close(), 0);  // nothing held: nothing to report
}

}  // namespace
}  // namespace tutel
