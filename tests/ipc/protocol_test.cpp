#include "tutel/ipc/protocol.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

namespace tutel::ipc {
namespace {

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

FrameHeader good_header() {
  FrameHeader h;
  h.type = static_cast<uint16_t>(FrameType::kHello);
  h.body_length = 10;
  h.request_id = 7;
  return h;
}

TEST(ProtocolTest, FrameTypesHaveNamesAndUnknownOnesAreRejected) {
  const uint16_t known[] = {1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14,
                            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 64, 65, 66, 67};
  for (uint16_t t : known) {
    SCOPED_TRACE(t);
    EXPECT_TRUE(is_known_frame_type(t));
    EXPECT_NE(frame_type_name(static_cast<FrameType>(t)), "Unknown");
  }
  for (uint16_t t : {0, 15, 31, 42, 63, 68, 0xFFFF}) {
    SCOPED_TRACE(t);
    EXPECT_FALSE(is_known_frame_type(static_cast<uint16_t>(t)));
  }
  EXPECT_EQ(frame_type_name(FrameType::kHelloReply), "HelloReply");
  EXPECT_EQ(frame_type_name(FrameType::kError), "Error");
}

TEST(ProtocolTest, ValidHeaderPasses) {
  EXPECT_TRUE(validate_header(good_header()).ok());
  FrameHeader h = good_header();
  h.body_length = kMaxFrameBody;
  EXPECT_TRUE(validate_header(h).ok());
  h.body_length = 0;
  EXPECT_TRUE(validate_header(h).ok());
}

TEST(ProtocolTest, WrongMagicSaysNotATuteldPeer) {
  FrameHeader h = good_header();
  h.magic = 0x50545448;  // "HTTP"
  const Status s = validate_header(h);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(s.message(), "not a tuteld peer")) << s;
}

TEST(ProtocolTest, WrongVersionSaysWhichVersionsAndToUpgrade) {
  FrameHeader h = good_header();
  h.version = 2;
  const Status s = validate_header(h);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(s.message(), "protocol version 2")) << s;
  EXPECT_TRUE(contains(s.message(), "speaks 1")) << s;
  EXPECT_TRUE(contains(s.message(), "upgrade")) << s;
}

TEST(ProtocolTest, UnknownTypeIsRefused) {
  FrameHeader h = good_header();
  h.type = 99;
  const Status s = validate_header(h);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(s.message(), "unknown frame type 99")) << s;
}

TEST(ProtocolTest, OversizeBodyIsRefused) {
  FrameHeader h = good_header();
  h.body_length = kMaxFrameBody + 1;
  Status s = validate_header(h);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(s.message(), "exceeds the limit")) << s;
  h.body_length = std::numeric_limits<uint32_t>::max();
  EXPECT_FALSE(validate_header(h).ok());
}

TEST(ArenaLayoutTest, RegionsAreAlignedOrderedAndFillTheArena) {
  for (uint64_t bytes : {uint64_t{64} << 10, uint64_t{1} << 20, (uint64_t{1} << 20) + 1,
                         uint64_t{3} << 30, uint64_t{64} << 30}) {
    SCOPED_TRACE(bytes);
    Result<ArenaLayout> r = arena_layout(bytes);
    ASSERT_TRUE(r.ok()) << r.status();
    const ArenaLayout& l = *r;
    EXPECT_GE(l.arena_bytes, bytes);
    EXPECT_LT(l.arena_bytes - bytes, 4096u);
    EXPECT_EQ(l.arena_bytes % 4096, 0u);
    EXPECT_GE(l.request_ring_offset, sizeof(ArenaHeader));
    EXPECT_EQ(l.request_ring_offset % kCacheLine, 0u);
    EXPECT_EQ(l.completion_ring_offset % kCacheLine, 0u);
    EXPECT_GE(l.completion_ring_offset,
              l.request_ring_offset + sizeof(RingControl) + kRingSlots * sizeof(RequestDescriptor));
    EXPECT_EQ(l.data_offset % 4096, 0u);
    EXPECT_GE(l.data_offset, l.completion_ring_offset + sizeof(RingControl) +
                                 kRingSlots * sizeof(CompletionDescriptor));
    EXPECT_GT(l.data_bytes, 0u);
    EXPECT_EQ(l.data_offset + l.data_bytes, l.arena_bytes);
  }
}

TEST(ArenaLayoutTest, RefusesTooSmallAndTooLargeArenas) {
  for (uint64_t bytes : {uint64_t{0}, uint64_t{4096}, (uint64_t{64} << 10) - 1}) {
    Result<ArenaLayout> r = arena_layout(bytes);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(), "minimum")) << r.status();
  }
  for (uint64_t bytes : {(uint64_t{64} << 30) + 1, std::numeric_limits<uint64_t>::max()}) {
    Result<ArenaLayout> r = arena_layout(bytes);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "maximum")) << r.status();
  }
}

class DataRangeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<ArenaLayout> r = arena_layout(1 << 20);
    ASSERT_TRUE(r.ok());
    l_ = *r;
    end_ = l_.data_offset + l_.data_bytes;
  }
  ArenaLayout l_{};
  uint64_t end_ = 0;
};

TEST_F(DataRangeTest, AcceptsRangesInsideTheDataRegion) {
  EXPECT_TRUE(check_data_range(l_, l_.data_offset, 64, "input").ok());
  EXPECT_TRUE(check_data_range(l_, l_.data_offset, l_.data_bytes, "input").ok());
  EXPECT_TRUE(check_data_range(l_, end_ - 4, 4, "input").ok());
}

TEST_F(DataRangeTest, AcceptsZeroBytesInsideIncludingTheEnd) {
  // A rank with no tokens this step still takes part in the group's collectives.
  EXPECT_TRUE(check_data_range(l_, l_.data_offset, 0, "input").ok());
  EXPECT_TRUE(check_data_range(l_, end_, 0, "input").ok());
  EXPECT_FALSE(check_data_range(l_, end_ + 4, 0, "input").ok());
  EXPECT_FALSE(check_data_range(l_, 0, 0, "input").ok());
}

TEST_F(DataRangeTest, RefusesRangesOutsideAndNamesThem) {
  const Status before = check_data_range(l_, l_.data_offset - 4, 8, "output");
  EXPECT_EQ(before.code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(contains(before.message(), "output")) << before;
  EXPECT_FALSE(check_data_range(l_, l_.request_ring_offset, 4, "output").ok());
  EXPECT_FALSE(check_data_range(l_, end_ - 4, 8, "output").ok());
  EXPECT_FALSE(check_data_range(l_, l_.data_offset, l_.data_bytes + 4, "output").ok());
}

TEST_F(DataRangeTest, OffsetPlusBytesCannotWrapAround) {
  const uint64_t max = std::numeric_limits<uint64_t>::max();
  const uint64_t near_max = max - 3;  // 4-byte aligned
  EXPECT_EQ(check_data_range(l_, near_max, 8, "input").code(), StatusCode::kOutOfRange);
  EXPECT_EQ(check_data_range(l_, near_max, 0, "input").code(), StatusCode::kOutOfRange);
  // offset + bytes would wrap to a small number inside the region.
  EXPECT_EQ(
      check_data_range(l_, l_.data_offset, near_max - l_.data_offset + 4 + 64, "input").code(),
      StatusCode::kOutOfRange);
  EXPECT_EQ(check_data_range(l_, l_.data_offset + 64, near_max, "input").code(),
            StatusCode::kOutOfRange);
}

TEST_F(DataRangeTest, RefusesMisalignment) {
  const Status off = check_data_range(l_, l_.data_offset + 2, 8, "dy");
  EXPECT_EQ(off.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(off.message(), "dy")) << off;
  EXPECT_TRUE(contains(off.message(), "multiples of 4")) << off;
  EXPECT_EQ(check_data_range(l_, l_.data_offset, 6, "dy").code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tutel::ipc
