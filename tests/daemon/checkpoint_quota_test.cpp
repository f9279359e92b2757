// CheckpointQuota: a tenant's saved files against its max_checkpoint_bytes, measured from the
// directory, with the saves under way reserved.
#include "checkpoint_quota.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace tutel::daemon {
namespace {

namespace fs = std::filesystem;

class CheckpointQuotaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tuteld-quota-XXXXXX";
    root_ = ::mkdtemp(tmpl);
    dir_ = root_ / "checkpoints";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  void write(const fs::path& path, size_t bytes) {
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << std::string(bytes, 'x');
  }
  fs::path root_, dir_;
};

TEST_F(CheckpointQuotaTest, SavesUnderWayAndFilesOnDiskCountAgainstTheQuota) {
  CheckpointQuota quota("t", dir_.string(), 1000);
  // The directory does not exist yet: nothing is held.
  ASSERT_TRUE(quota.used_bytes().ok());
  EXPECT_EQ(*quota.used_bytes(), 0u);
  {
    auto first = quota.reserve((dir_ / "a.safetensors").string(), 600);
    ASSERT_TRUE(first.ok()) << first.status();
    // A second save at the same time does not fit beside the first.
    auto second = quota.reserve((dir_ / "b.safetensors").string(), 600);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().code(), StatusCode::kResourceExhausted);
    EXPECT_NE(second.status().message().find("tenant 't''s saved files to 1200 bytes, over its max_checkpoint_bytes 1000"),
              std::string_view::npos)
        << second.status();
    write(dir_ / "a.safetensors", 600);
  }  // the first save is done: its file counts instead
  EXPECT_EQ(*quota.used_bytes(), 600u);
  EXPECT_EQ(quota.reserve((dir_ / "b.safetensors").string(), 600).status().code(), StatusCode::kResourceExhausted);
  // A save over the file replaces it, so only what it adds counts.
  EXPECT_TRUE(quota.reserve((dir_ / "a.safetensors").string(), 1000).ok());
  EXPECT_FALSE(quota.reserve((dir_ / "a.safetensors").string(), 1001).ok());
}

TEST_F(CheckpointQuotaTest, DirectoriesCountAndTemporaryFilesDoNot) {
  const uint64_t dir_bytes = CheckpointQuota::kDirectoryBytes;
  CheckpointQuota quota("t", dir_.string(), 3 * dir_bytes);
  // Files in subdirectories count, and so does each directory.
  write(dir_ / "deep" / "er" / "c.safetensors", 300);
  EXPECT_EQ(*quota.used_bytes(), 2 * dir_bytes + 300);
  EXPECT_TRUE(quota.reserve((dir_ / "d.safetensors").string(), dir_bytes - 300).ok());
  EXPECT_FALSE(quota.reserve((dir_ / "e.safetensors").string(), dir_bytes - 299).ok());
  // A save's temporary file is covered by its reservation, not counted again; one a killed
  // daemon left behind is removed at the next start.
  write(dir_ / ".d.safetensors.tmp-0123456789abcdef", 5000);
  write(dir_ / "deep" / ".x.tmp-fedcba9876543210", 5000);
  EXPECT_EQ(*quota.used_bytes(), 2 * dir_bytes + 300);
  auto removed = quota.remove_interrupted_saves();
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, 2);
  EXPECT_FALSE(fs::exists(dir_ / ".d.safetensors.tmp-0123456789abcdef"));
  EXPECT_TRUE(fs::exists(dir_ / "deep" / "er" / "c.safetensors"));
}

TEST_F(CheckpointQuotaTest, LinksAreNeitherFollowedNorCounted) {
  CheckpointQuota quota("t", dir_.string(), 1000);
  write(root_ / "outside" / "big.bin", 5000);
  fs::create_directories(dir_);
  fs::create_symlink(root_ / "outside" / "big.bin", dir_ / "link.safetensors");
  fs::create_directory_symlink(root_ / "outside", dir_ / "linked_dir");
  ASSERT_TRUE(quota.used_bytes().ok());
  EXPECT_EQ(*quota.used_bytes(), 0u);
  // "Replacing" a link does not credit the size of what it points to.
  write(dir_ / "a.safetensors", 900);
  EXPECT_FALSE(quota.reserve((dir_ / "link.safetensors").string(), 200).ok());
}

}  // namespace
}  // namespace tutel::daemon
